r"""Protocol 4: segmentation transfer — anatomy segmentation from 10 % and 100 % of the masks.

The encoder plus a light SETR-PUP decoder (per stage 3x3 conv -> LayerNorm -> ReLU -> 2x
bilinear upsampling, segmentation.decoder_channels channels halved at each stage; then a
1x1 conv to the 12 anatomy labels of the synthetic phantom), trained on the pixel label
maps of a seeded subset of the train split (the label subsets of protocol 1, written to
OUT/splits/) with pixel cross-entropy + segmentation.dice_weight x soft Dice. Modes:
- finetune: encoder and decoder end to end (the fine-tuning recipe of protocol 1: AdamW,
  warm-up + cosine, layer-wise lr decay; finetune.head_init is not read);
- frozen: the decoder only, on the fixed encoder.
The evaluation point with the best validation mean Dice is kept. Metric: test Dice per
structure (pixels pooled over the test split) and its mean over the 11 structures
(background is recorded, not averaged).

  python -m anatjax.evaluate --config=configs/eval/segmentation.py:runlocal --init=RUN_DIR
  python -m anatjax.evaluate --config=configs/eval/segmentation.py:runlocal --init=random
  # the full protocol, 3 seeds (accelerators):
  python -m anatjax.evaluate --config=configs/eval/segmentation.py:num_seeds=3 --init=RUN_DIR

Arguments: variant=, num_seeds=, runlocal, tiny (configs/eval/common.py), finetune_only
(skip the frozen-encoder mode). Writes OUT/results.json, OUT/results.md,
OUT/figures/segmentation_examples.png (test images: the true anatomy and each mode's
prediction at the largest mask fraction, overlaid).

What to expect from runlocal on 2 CPU cores: about 2.5-3 minutes (2 min 44 s wall, 162 s
in the evaluation, with other work on the machine); fine-tuning at 100 % is most of it.
A random Ti/8 encoder scores test mean Dice finetune 0.30 / 0.37 and frozen 0.30 / 0.31
at 10 / 100 % of the masks (60 and 96 steps, every run still improving at its last
step). The large structures are learnt first (abdomen 0.91, heart 0.87, soft tissue
0.81, ribs 0.63 fine-tuned at 100 %); the lungs, which the ribs cover in stripes, stay
below 0.2, and the thin trachea and clavicles, the mediastinum and the humeri at 0 in so
short a run: compare encoders on the mean and the large structures at this size.
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("segmentation", arg, finetune_only=False)
  c.label_fractions = (0.1, 1.0)   # of the train masks
  c.modes = ("finetune",) if arg.finetune_only else ("finetune", "frozen")
  c.segmentation = dict(
      decoder_channels=128,      # of the first stage, halved at each next one
      dice_weight=1.0,           # loss = cross-entropy + dice_weight x (1 - soft Dice)
      figure_images=4,           # test images in the figure
  )
  # A decoder trained from scratch on dense labels: a higher lr and more steps than a
  # classification head needs (the encoder still gets layer-decayed fractions of it).
  c.finetune.update(epochs=20, min_steps=300, base_lr=4e-3)
  if arg.runlocal:
    c.segmentation.decoder_channels = 32
    # ~100 steps: a 4x higher lr than the full recipe's gets the decoder further.
    c.finetune.update(epochs=6, min_steps=60, num_evals=3, base_lr=1.6e-2)
  if arg.tiny:
    c.segmentation.decoder_channels = 16
    c.finetune.update(epochs=1, min_steps=4, num_evals=2)
  c.lock()
  return c
