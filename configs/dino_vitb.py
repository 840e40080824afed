r"""DINO baseline: CLS-token self-distillation over multi-crop views, the same ViT-B/16 on
the same radiographs (anatjax/methods/dino.py; Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", 2021).

The default follows DINO's reference training script: a 65,536-way head (3-layer MLP of
width 2048, bottleneck 256, weight-normalised last layer frozen for the first epoch),
2 global crops (224 px, scale 0.4-1) and 8 local crops (96 px, scale 0.05-0.4), student
temperature 0.1, teacher temperature warmed from 0.04 to 0.07 over 30 epochs, centre
momentum 0.9, teacher momentum 0.996 -> 1 (cosine), global batch 1024, AdamW with lr
5e-4 x batch/256 after 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4,
per-tensor gradient clipping at 3.0, 100 epochs. Radiographs are greyscale, so colour
jitter keeps its brightness and contrast parts only (anatjax/data/views.py).

  # a small model on small images, 2 CPU cores:
  python -m anatjax.main --config=configs/dino_vitb.py:runlocal
  # the reference recipe (accelerators):
  python -m anatjax.main --config=configs/dino_vitb.py

Arguments: variant=NAME/PATCH, runlocal (the encoder, images, batch and steps of
configs/afire_vitb.py:runlocal; 32 px local crops, 4 of them; a 1024-way head).

What to expect from runlocal on 2 CPU cores (measured with other work sharing the cores,
185 of 200 steps): the loss *rises* from ~5.8 to ~7.1 while the teacher's entropy climbs
to ~6.8, near log 1024 = 6.93: at batch 32 and lr 6e-5 DINO spends these steps in its
known near-uniform start (centring wins over sharpening); it needs far longer runs.
"""

from anatjax.config import parse_arg
from configs.common import dino_optim, make_runlocal, pretraining_config


def get_config(arg=None):
  arg = parse_arg(arg, variant="B/16", runlocal=False)
  c = pretraining_config("dino", arg.variant)
  c.duration = "100ep"
  c.model.update(out_dim=65_536, head_hidden_dim=2048, head_bottleneck_dim=256)
  c.dino = dict(
      num_local_crops=8,
      local_size=96,
      global_scale=(0.4, 1.0),   # crop area as a fraction of the image's
      local_scale=(0.05, 0.4),
      student_temp=0.1,
      teacher_temp=0.07,
      warmup_teacher_temp=0.04,
      warmup_teacher_temp_duration="30ep",
      center_momentum=0.9,
      teacher_momentum=0.996,
      freeze_last_layer="1ep",
  )
  c.optim = dino_optim()

  if arg.runlocal:
    make_runlocal(c)
    c.model.update(out_dim=1024, head_hidden_dim=256, head_bottleneck_dim=64)
    c.dino.update(num_local_crops=4, local_size=32, warmup_teacher_temp_duration="3ep")
    c.optim.warmup = "1ep"

  c.lock()
  return c
