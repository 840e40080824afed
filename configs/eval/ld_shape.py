r"""What a shape-guided LD run segments without labels (anatjax/evaluate/shape_prior.py;
spec 7.2, test): the run's prior channel against the structure its reference shapes were
(the phantom's lungs by default), Dice per test image, as the assignment A_c > 0.5 and
through the image's own region embeddings.

  python -m anatjax.evaluate --config=configs/eval/ld_shape.py:runlocal --init=runs/ld_shape

Arguments: runlocal (100 test images), tiny (tests). The image size is the run's crops'.
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("ld_shape", arg)
  c.model = dict(channels=1, image_size=448, dtype="auto")
  c.data.num_train, c.data.num_val, c.data.num_test = 0, 0, 500
  if arg.runlocal:
    c.data.num_test = 100
  if arg.tiny:
    c.data.num_test = 4
  c.lock()
  return c
