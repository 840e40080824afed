r"""Protocol 1: multi-label finding classification from 1 %, 10 % and 100 % of the labels.

Five synthetic findings (nodule, consolidation, pleural_effusion, cardiomegaly,
pneumothorax) on disjoint train / val / test index ranges of the labelled synthetic
split. Label subsets are nested prefixes of one seeded permutation of the train split
(written to OUT/splits/ as `file_name l0 ... l4` files). For each seed and fraction:
- linear: a linear probe on frozen mean-pooled patch tokens (linear.features), weight
  decay chosen on the validation mean AUROC;
- finetune: the whole encoder + a linear head on the mean of the patch tokens, BCE,
  AdamW with layer-wise lr decay, the best validation checkpoint.
Metric: test AUROC per finding and its mean.

  # 2 CPU cores, a runlocal AFiRe run vs no pretraining:
  python -m anatjax.main --config=configs/afire_vitb.py:runlocal --workdir=runs/afire_local
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:runlocal --init=runs/afire_local
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:runlocal --init=random
  # the full protocol, 3 seeds (accelerators):
  python -m anatjax.evaluate --config=configs/eval/cxr_probe.py:num_seeds=3 --init=RUN_DIR

Arguments: variant=, num_seeds=, runlocal, tiny (configs/eval/common.py), and
linear_only (skip fine-tuning). Writes OUT/results.json, OUT/results.md,
OUT/figures/auroc_vs_labels.png (default OUT: RUN_DIR/eval/cxr_probe..., or
workdirs/eval/cxr_probe..._random).

What to expect from runlocal on 2 CPU cores: about 3 minutes (rendering, features, 6
probes/fine-tunings; fine-tuning at 100 % takes most of it). With 512 train images the
1 % subset has 5 images, so its AUROCs are near chance and vary a lot between seeds.
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("cxr_probe", arg, linear_only=False)
  c.label_fractions = (0.01, 0.1, 1.0)
  c.modes = ("linear",) if arg.linear_only else ("linear", "finetune")
  c.lock()
  return c
