r"""DrasCLR downstream: emphysema on the synthetic CT phantom from frozen patch features
(anatjax/evaluate/ct_emphysema.py has the protocol): patient severity (ridge, R^2 and
Spearman), presence (logistic, AUROC) and per-patch emphysema (logistic, AUROC), from 8,
16 and all training subjects' labels, with a mean-HU / LAA-950 reference.

  python -m anatjax.evaluate.ct_emphysema --config=configs/eval/ct_emphysema.py:runlocal \
      --init=runs/drasclr --workers=2
  python -m anatjax.evaluate.ct_emphysema --config=configs/eval/ct_emphysema.py:runlocal \
      --init=random --store=STORE_OF_THE_RUN
  # one cohort cache for both encoders (registration is the slow part):
  ... --config.cohort.cache_dir=workdirs/ct_emphysema_cohort

Arguments: runlocal (40 subjects, 2 CPU cores), tiny (8 subjects, the tests), repeats=N
(default 5; runlocal 3, tiny 1).

What to expect from runlocal on 2 CPU cores (the 4 mm, 16^3-patch store of
configs/drasclr_cnn3d.py:runlocal, 71 locations): mapping the 40 subjects about 165 s with
--workers=2 (once per cache), encoding 15-40 s, the probes about 2 minutes. The intensity
reference reaches R^2 0.99 and dense AUROC 0.96 (the phantom's emphysema is a HU
threshold); a 2-epoch runlocal DrasCLR run and a random encoder both stay near chance per
patient (R^2 < 0, AUROC 0.4-0.5) and score dense AUROC 0.58-0.61.
"""

import ml_collections

from anatjax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, tiny=False, repeats=0)
  c = ml_collections.ConfigDict()
  c.protocol = "ct_emphysema"
  c.seed = 0                   # --init=random: the initialisation key
  c.num_experts = 8            # --init=random: CondConv experts (a run brings its own)
  c.which = "auto"             # a run's encoder: auto = query (f_q) | key (f_k)
  c.cohort = dict(
      population_seed=1,       # phantom population; the store's source_seed is refused
      first_index=0,
      num_subjects=64,
      cache_dir="",            # '' = OUT/cohort; keyed by store and population
  )
  c.features = dict(
      locations_per_batch=8,   # G locations per encoder call (one kernel mix each)
      subjects_per_batch=8,    # n subjects per call; calls are padded to [G, n]
  )
  c.probe = dict(
      seed=0,                  # folds and label draws
      repeats=arg.repeats or 5,   # of the whole cross-validation
      folds=5,                 # outer, over subjects, stratified by presence
      inner_folds=5,           # over the labelled subjects, for the regularisation
      label_counts=(8, 16, 0),   # labelled subjects per training part; 0 = all of them
      ridge_alphas=(1e4, 1e3, 1e2, 1e1, 1.0, 1e-1, 1e-2),   # strongest first
      logistic_cs=(1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2),
  )
  c.dense = dict(
      threshold=0.01,          # a patch is emphysematous above this fraction of voxels
      cs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),   # logistic C of the patch classifier
  )
  if arg.runlocal:
    c.cohort.num_subjects = 40
    c.features.subjects_per_batch = 20
    c.probe.repeats = arg.repeats or 3
  if arg.tiny:
    c.cohort.num_subjects = 8
    c.probe.update(repeats=arg.repeats or 1, folds=2, inner_folds=2, label_counts=(3, 0))
    c.dense.cs = (1e-2, 1.0)
  c.lock()
  return c
