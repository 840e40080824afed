r"""AFiRe pretraining of a ViT-B/16 on chest radiographs (shared/methods/afire.md).

The default is the published recipe: ViT-B/16 at 224 px, 3 input channels, global batch
1024, peak lr 5e-4 x batch/256 with 10 warm-up epochs then cosine to 1e-6, weight decay
0.04 -> 0.4 (cosine), per-tensor clipping at 3.0, teacher EMA 0.996 -> 1, prototypes frozen
for the first epoch, 400 epochs of 9 lesion variants per normal image. Without
`data.source` it trains on the embedded synthetic radiographs (81,117 normal patients,
the size of the published MIMIC-CXR normal set).

  # a small model on small images, 2 CPU cores, about 2.5 minutes:
  python -m anatjax.main --config=configs/afire_vitb.py:runlocal
  # the published recipe (accelerators; workdir defaults to workdirs/afire_vitb):
  python -m anatjax.main --config=configs/afire_vitb.py
  # other sizes and overrides:
  python -m anatjax.main --config=configs/afire_vitb.py:variant=S/16 \
      --config.batch_size=256 --config.duration=100ep --workdir=runs/afire_s16

Arguments (after the colon, comma-separated): variant=Ti/16|S/16|B/16|L/16 (any NAME/PATCH
of anatjax.models.vit.VARIANTS), runlocal (a 4-block ViT-Ti/8 at 64 px, batch 32, 200 steps).
Durations (duration, optim.warmup, afire.freeze_prototypes, checkpoint.every) take
'<n>ep' (epochs), '<n>st' (steps) or '<n>ex' (examples).

What to expect from runlocal on 2 CPU cores (measured: 2 min 33 s wall, ~50 img/s): the
total loss falling from ~5.5 to ~3.4, the prototype term (cst) from ~3.2 to ~2.6 and the
restoration term (rec) from ~2.2 to ~0.8; data wait ~3%.
"""

from anatjax.config import parse_arg
from configs.common import dino_optim, make_runlocal, pretraining_config


def get_config(arg=None):
  arg = parse_arg(arg, variant="B/16", runlocal=False)
  c = pretraining_config("afire", arg.variant)
  c.data.repeats_per_epoch = 9  # an epoch shows each normal image with 9 lesion draws
  c.data.selection = "normal_frontal"  # real sources: AFiRe pretrains on normal images
  c.slm = dict(                # synthetic lesion masks, pixels on the 224 grid (rescaled)
      max_lesions=4, min_size=16, max_size=128, crop_radius=30, ceiling=235,
      p_no_lesion=0.0)

  c.model.update(
      num_prototypes=256,
      head_hidden_dim=1024,
      head_bottleneck_dim=256,
      decoder=dict(width=512, depth=8, num_heads=16, mlp_dim=2048),
  )
  c.afire = dict(
      student_temp=0.1,
      sinkhorn_epsilon=0.05,
      sinkhorn_iters=3,
      prototype_momentum=0.75,
      teacher_momentum=0.996,
      restoration_weight=1.0,
      freeze_prototypes="1ep",
  )
  c.optim = dino_optim()

  if arg.runlocal:
    make_runlocal(c)
    c.model.num_prototypes = 64
    c.model.head_hidden_dim = 256
    c.model.head_bottleneck_dim = 64
    c.model.decoder = dict(width=96, depth=2, num_heads=4, mlp_dim=384)
    c.optim.warmup = "1ep"

  c.lock()
  return c
