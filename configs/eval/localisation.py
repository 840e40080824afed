r"""Protocol 2: anomaly localisation learnt from image-level labels only.

A classifier is trained on the image-level finding labels of the train split
(localisation.label_fraction of it): a linear probe on the frozen encoder (`linear`)
and/or the fine-tuned network (`finetune`). Its maps for each finding, on test images
that have it, are scored against the true masks and boxes, which no training step saw:
- gradcam: Grad-CAM on the last block's tokens;
- evidence: the classifier's linear head applied to each final patch token, minus its
  mean at that position over training images;
- prior (reference): the mean training mask of the finding, i.e. location alone.
Metrics per finding and their mean: pointing game (map maximum inside the mask, or
within localisation.pointing_tolerance pixels), and IoU / Dice / box IoU of the map
thresholded at the level with the best validation IoU.

  python -m anatjax.evaluate --config=configs/eval/localisation.py:runlocal --init=RUN_DIR
  python -m anatjax.evaluate --config=configs/eval/localisation.py:runlocal --init=random
  # with a fine-tuned classifier too (slower):
  python -m anatjax.evaluate --config=configs/eval/localisation.py:runlocal,finetune --init=RUN_DIR

Real data: source=nih_cxr14 (or rsna_pneumonia) with --config.data.root=DIR scores the
maps against the collection's boxes (filled), on the test images that have them; NIH has
boxes only there, so half of their patients choose the thresholds (a note says so).

Arguments: variant=, num_seeds=, source=, runlocal, tiny (configs/eval/common.py),
finetune (add the fine-tuned classifier; the full-size default has both). Writes OUT/results.json,
OUT/results.md, OUT/figures/anomaly_maps_<classifier>.png.

What to expect from runlocal on 2 CPU cores: about 25 s (with finetune about 75-100 s).
The prior is a strong reference (pointing 0.46, IoU 0.30: cardiomegaly and effusions sit
in fixed places). For the runlocal AFiRe run the evidence map scores pointing 0.16 / IoU
0.09, Grad-CAM 0.01 / 0.05; for a random Ti/8, 0.18 / 0.10 and 0.03 / 0.06. Box IoU uses
one box per finding (e.g. around both effusions).
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("localisation", arg, finetune=False)
  c.localisation = dict(
      classifiers=("linear", "finetune"),
      label_fraction=1.0,        # image-level labels used to train the classifier
      pointing_tolerance=0.0,    # pixels; 0: the maximum must fall inside the mask
      baseline_images=1024,      # train images whose mean evidence map is subtracted
  )
  if arg.runlocal or arg.tiny:
    c.localisation.classifiers = ("linear", "finetune") if arg.finetune else ("linear",)
  c.lock()
  return c
