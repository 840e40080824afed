r"""Alice downstream: multi-organ segmentation on the synthetic CT phantom by fine-tuning a
3-D Swin encoder under a new light decoder (anatjax/evaluate/ct_organs.py has the
protocol): test Dice of 8 organs with 10 % and 100 % of the training volumes.

  python -m anatjax.evaluate.ct_organs --config=configs/eval/ct_organs.py:runlocal \
      --init=runs/alice
  python -m anatjax.evaluate.ct_organs --config=configs/eval/ct_organs.py:runlocal \
      --init=random
  python -m anatjax.evaluate.ct_organs --config=configs/eval/ct_organs.py:runlocal \
      --init=alice_swinvit.safetensors          # any MONAI swinViT export
  # one cohort cache for every encoder:
  ... --config.data.cache_dir=workdirs/ct_organs_cohort

Arguments: runlocal (2 CPU cores), tiny (the tests; numbers meaningless), num_seeds=N
(seeds 0..N-1, default 1).

The default is the spec's recipe on an accelerator: 2.0 x 1.5 x 1.5 mm (z, y, x), 96^3
crops, 4 per volume, feature size 48, AdamW 1e-4 / 1e-5 for 30k steps, validation every
500 steps, on 24 / 6 / 10 subjects. `model` is the encoder of --init=random; a run or a
weights file brings its own geometry (runlocal's is configs/alice_swin3d.py:runlocal's).

What to expect from runlocal on 2 CPU cores (4 mm, 32^3 crops, the runlocal Alice Swin:
feature size 12, window 4; 16 / 3 / 6 subjects of about 100 x 55 x 80 voxels; 300 steps
of 2 crops per fraction): 8 min 20 s for --init=random on a shared machine (load 4-5;
rendering the cohort 8 s once per cache, compilation about 40 s, 100 steps + a
validation about 55 s, segmenting one volume about 6 s), 1.9 GB. Random init, both
fractions: test Dice liver 0.45-0.49, lungs 0.79-0.85, heart 0.00, the small organs
0.00, mean 0.16: 300 steps learn the large organs only, and 2 or 16
training volumes make no difference at so few steps: the label-efficiency question
needs the full recipe. The default has not been run (no accelerator here).
"""

import ml_collections

from anatjax.config import parse_arg
from configs import alice_swin3d

SWIN_KEYS = ("feature_size", "depths", "num_heads", "window_size", "patch_size",
             "downsample")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, tiny=False, num_seeds=1)
  c = ml_collections.ConfigDict()
  c.protocol = "ct_organs"
  c.seeds = tuple(range(arg.num_seeds))   # fine-tuning initialisation, subsets, crops
  c.fractions = (0.1, 1.0)     # of the training volumes (at least one volume)
  c.which = "auto"             # a run's encoder: auto (= teacher) | teacher | student
  # The encoder of --init=random: the Swin of the Alice recipe it is compared with
  # (configs/alice_swin3d.py, its runlocal variant here for runlocal), so that random and
  # pretrained differ only in their weights; also the window / patch merge of a weights
  # file whose metadata does not name them. Matmul dtype: auto = float32 on CPU,
  # bfloat16 elsewhere.
  pretraining = alice_swin3d.get_config("runlocal" if arg.runlocal else None).model
  c.model = dict({k: pretraining[k] for k in SWIN_KEYS}, dtype="auto")
  c.data = dict(
      population_seed=1,       # phantom population; a run's pretraining one is refused
      first_index=0,
      num_train=24, num_val=6, num_test=10,   # consecutive subjects, in this order
      synthetic_size=256,      # the phantom's grid per axis before resampling
      spacing_mm=(2.0, 1.5, 1.5),   # (z, y, x)
      cache_dir="",            # '' = OUT/cohort; keyed by the options above
  )
  c.train = dict(
      crop_size=96,
      crops_per_volume=4,      # organ- and background-centred in turn (1:1)
      volumes_per_step=1,      # batch = volumes_per_step x crops_per_volume
      flip_prob=0.1,           # per axis, as MONAI's SwinUNETR BTCV recipe
      lr=1e-4,                 # AdamW, constant
      weight_decay=1e-5,
      steps=30_000,
      eval_every=500,          # validation mean Dice; the best parameters are tested
  )
  c.eval = dict(
      overlap=0.5,             # sliding windows of train.crop_size
      sigma_scale=0.125,       # Gaussian blending weight: sigma = 0.125 x the window
      batch_size=4,            # windows per forward pass
  )
  if arg.runlocal:
    c.data.update(num_train=16, num_val=3, num_test=6, synthetic_size=100,
                  spacing_mm=(4.0, 4.0, 4.0))
    # lr 1e-3: a few hundred steps at the recipe's 1e-4 hardly move a new decoder
    # (training loss 2.4 at 1e-4 vs 1.6 at 1e-3 after 200 steps, measured).
    c.train.update(crop_size=32, crops_per_volume=2, steps=300, eval_every=100, lr=1e-3)
    c.eval.batch_size = 8
  if arg.tiny:   # 3 stages (MONAI's have 4; the protocol takes any): a faster compile
    c.model.update(feature_size=12, depths=(1, 1, 1), num_heads=(3, 6, 12), window_size=4)
    c.data.update(num_train=2, num_val=1, num_test=1, synthetic_size=40,
                  spacing_mm=(12.0, 12.0, 12.0))
    c.fractions = (0.5, 1.0)
    c.train.update(crop_size=16, crops_per_volume=2, steps=4, eval_every=2, lr=1e-3)
    c.eval.batch_size = 2
  c.lock()
  return c
