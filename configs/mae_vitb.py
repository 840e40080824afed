r"""MAE baseline: masked-patch reconstruction pretraining of the same ViT-B/16 on the same
radiographs (anatjax/methods/mae.py; He et al., "Masked Autoencoders Are Scalable Vision
Learners", 2022).

The default is MAE's published ViT-B recipe: 75% of the patches hidden, per-patch
normalised pixel targets, a 512-wide 8-block decoder, batch 4096, AdamW with base lr
1.5e-4 x batch/256, betas (0.9, 0.95), weight decay 0.05, 40 warm-up epochs then cosine,
800 epochs, random resized crops (scale 0.2-1) with horizontal flips.

  # a small model on small images, 2 CPU cores, about 2 minutes:
  python -m anatjax.main --config=configs/mae_vitb.py:runlocal
  # the published recipe (accelerators):
  python -m anatjax.main --config=configs/mae_vitb.py

Arguments: variant=NAME/PATCH, runlocal (the sizes of configs/afire_vitb.py:runlocal:
a 4-block ViT-Ti/8 at 64 px, batch 32, 200 steps).

What to expect from runlocal on 2 CPU cores: the loss (MSE of per-patch normalised
pixels on the hidden patches) falling from ~1.6 to ~0.95.
"""

from anatjax.config import parse_arg
from configs.common import make_runlocal, pretraining_config


def get_config(arg=None):
  arg = parse_arg(arg, variant="B/16", runlocal=False)
  c = pretraining_config("mae", arg.variant)
  c.batch_size = 4096
  c.duration = "800ep"
  c.model.decoder = dict(width=512, depth=8, num_heads=16, mlp_dim=2048)
  c.mae = dict(
      mask_ratio=0.75,
      norm_pix_loss=True,      # targets: each patch's pixels normalised by its own mean/std
      crop_scale=(0.2, 1.0),   # random resized crop, fraction of the image's area
      p_flip=0.5,
  )
  c.optim = dict(
      base_lr=1.5e-4, base_batch_size=256, warmup="40ep", min_lr=0.0,
      weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8,
      mu_dtype="float32",      # Adam's first moment: float32 or bfloat16 (memory)
  )

  if arg.runlocal:
    make_runlocal(c)
    c.model.decoder = dict(width=96, depth=2, num_heads=4, mlp_dim=384)
    c.optim.warmup = "1ep"

  c.lock()
  return c
