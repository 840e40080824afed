r"""Protocol 1: multi-label finding classification from 1 %, 10 % and 100 % of the labels.

Five synthetic findings (nodule, consolidation, pleural_effusion, cardiomegaly,
pneumothorax) on disjoint train / val / test index ranges of the labelled synthetic
split. Label subsets are nested prefixes of one seeded permutation of the train split
(written to OUT/splits/ as `file_name l0 ... l4` files). For each seed and fraction:
- linear: a linear probe on frozen mean-pooled patch tokens (linear.features), weight
  decay chosen on the validation mean AUROC;
- finetune: the whole encoder + a linear head on the mean of the patch tokens, BCE,
  AdamW with layer-wise lr decay; the head starts at that subset's linear probe (LP-FT;
  finetune.head_init='zeros' starts from scratch), the best validation checkpoint is
  kept (step 0, i.e. the probe itself, included).
Metric: test AUROC per finding and its mean.

  # 2 CPU cores, a runlocal AFiRe run vs no pretraining:
  python -m anatjax.main --config=configs/afire_vitb.py:runlocal --workdir=runs/afire_local
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:runlocal --init=runs/afire_local
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:runlocal --init=random
  # the full protocol, 3 seeds (accelerators):
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:num_seeds=3 --init=RUN_DIR
  # NIH ChestX-ray14's 14 findings (official test list, val carved by patient), with the
  # literature's label subsets; decoded splits kept for the next run:
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:source=nih_cxr14 \
      --config.data.root=/data/nih --config.data.cache_dir=/data/cache \
      --config.data.subsets_dir=/data/nih/splits \
      --config.data.subset_pattern='train_{percent}percent_split.txt' --init=RUN_DIR

Arguments: variant=, num_seeds=, source=, runlocal, tiny (configs/eval/common.py), and
linear_only (skip fine-tuning). Writes OUT/results.json, OUT/results.md,
OUT/figures/auroc_vs_labels.png (default OUT: RUN_DIR/eval/cxr_probe..., or
workdirs/eval/cxr_probe..._random).

What to expect from runlocal on 2 CPU cores: 1.5-2 minutes (fine-tuning at 100 % is most
of it). With 512 train images the 1 % subset is 5 images: no finding has both labels,
AUROCs sit near chance (a note says so). For the 200-step runlocal AFiRe run, test mean
AUROC linear 0.46 / 0.55 / 0.70 and finetune 0.46 / 0.55 / 0.70 at 1 / 10 / 100 %; a random
Ti/8 scores 0.47 / 0.56 / 0.72 and 0.47 / 0.57 / 0.73 (such a short pretraining does not
beat random features here; cardiomegaly is easy, nodules at 64 px near chance).
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("cxr_probe", arg, linear_only=False)
  c.label_fractions = (0.01, 0.1, 1.0)
  c.modes = ("linear",) if arg.linear_only else ("linear", "finetune")
  c.lock()
  return c
