r"""LD's segmentation transfer protocol (anatjax/evaluate/unet_transfer.py; spec 6) on the
synthetic heart, lungs and clavicles (the published JSRT/SCR tasks' structures).

An LD run's U-Net encoder (or a fresh one: --init=random, the published baseline) under a
new U-Net decoder, one binary structure at a time: soft Dice loss, Adam 1e-3 constant,
batch 2, 100 epochs with the encoder frozen then 100 fine-tuning everything, the best
epoch by the validation Dice loss (the first 20 % of the training list), rotations of
+-30 degrees; test Dice per image at threshold 0.5, from 20 / 40 / 60 / 80 / 100 % of
the training masks. (AFiRe's ViT encoder has no U-Net skips: its transfer is
configs/eval/segmentation.py.)

  python -m anatjax.evaluate --config=configs/eval/ld_segmentation.py:runlocal --init=runs/ld2
  python -m anatjax.evaluate --config=configs/eval/ld_segmentation.py:runlocal --init=random

Arguments: num_seeds=, runlocal (64 px, 200 training images, 6 epochs per phase,
20 % and 100 % of the masks), tiny (tests).
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("ld_segmentation", arg)
  c.model = dict(channels=1, image_size=448, dtype="auto")   # --init=random's encoder
  c.label_fractions = (0.2, 0.4, 0.6, 0.8, 1.0)
  c.data.num_train, c.data.num_val, c.data.num_test = 247, 0, 123   # JSRT/SCR's sizes
  c.transfer = dict(
      structures=("heart", "lungs", "clavicles"),
      epochs=100,                # per phase
      batch_size=2,
      lr=1e-3,
      val_fraction=0.2,          # the first 20 % of the training list validate
      rotation=30.0,             # degrees
      figure_images=4,
  )
  if arg.runlocal or arg.tiny:
    c.model.image_size = 64
    c.data.num_train, c.data.num_val, c.data.num_test = 200, 0, 100
    c.label_fractions = (0.2, 1.0)
    c.transfer.epochs = 6
  if arg.tiny:
    c.model.image_size = 32
    c.data.num_train, c.data.num_test = 10, 6
    c.label_fractions = (1.0,)
    c.transfer.update(epochs=1, structures=("heart", "lungs"), figure_images=2)
  c.lock()
  return c
