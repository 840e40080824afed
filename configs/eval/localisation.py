r"""Protocol 2: anomaly localisation learnt from image-level labels only.

A classifier is trained on the image-level finding labels of the train split
(localisation.label_fraction of it): a linear probe on the frozen encoder (`linear`)
and/or the fine-tuned network (`finetune`). Its maps for each finding, on test images
that have it, are scored against the true masks and boxes, which no training step saw:
- gradcam: Grad-CAM on the last block's tokens;
- evidence: the classifier's linear head applied to each final patch token;
- prior (reference): the mean training mask of the finding, i.e. location alone.
Metrics per finding and their mean: pointing game (map maximum inside the mask, or
within localisation.pointing_tolerance pixels), and IoU / Dice / box IoU of the map
thresholded at the level with the best validation IoU.

  python -m anatjax.evaluate --config=configs/eval/localisation.py:runlocal --init=RUN_DIR
  python -m anatjax.evaluate --config=configs/eval/localisation.py:runlocal --init=random
  # with a fine-tuned classifier too (slower):
  python -m anatjax.evaluate --config=configs/eval/localisation.py:runlocal,finetune --init=RUN_DIR

Arguments: variant=, num_seeds=, runlocal, tiny (configs/eval/common.py), finetune (add
the fine-tuned classifier; the full-size default has both). Writes OUT/results.json,
OUT/results.md, OUT/figures/anomaly_maps_<classifier>.png.

What to expect from runlocal on 2 CPU cores: under a minute. Cardiomegaly and pleural
effusion sit in fixed places, so the prior is a strong reference there; small nodules
are where maps must beat it. Box IoU uses one box per finding (e.g. both effusions).
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("localisation", arg, finetune=False)
  c.localisation = dict(
      classifiers=("linear", "finetune"),
      label_fraction=1.0,        # image-level labels used to train the classifier
      pointing_tolerance=0.0,    # pixels; 0: the maximum must fall inside the mask
  )
  if arg.runlocal or arg.tiny:
    c.localisation.classifiers = ("linear", "finetune") if arg.finetune else ("linear",)
  c.lock()
  return c
