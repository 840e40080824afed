"""Tiny variants of the real configs, shared by the tests."""

from configs import afire_vitb, dino_vitb, mae_vitb

RECIPES = {"afire": afire_vitb, "mae": mae_vitb, "dino": dino_vitb}


def tiny_config(method: str = "afire", **overrides):
  """A method's runlocal recipe shrunk further: 32 px, a 1-block ViT, 4 steps per epoch."""
  c = RECIPES[method].get_config("runlocal")
  c.unlock()
  c.batch_size = 16
  c.duration = "12st"
  c.log_every = 1
  c.data.image_size = 32
  c.data.num_examples = 64
  c.data.repeats_per_epoch = 1
  c.data.num_workers = 0
  c.model.variant = "mu/8"
  c.model.depth = 0
  c.mesh = dict(data=1, fsdp=1)
  c.checkpoint.every = "4st"
  if "decoder" in c.model:
    c.model.decoder = dict(width=16, depth=1, num_heads=2, mlp_dim=32)
  if method == "afire":
    c.model.update(num_prototypes=8, head_hidden_dim=32, head_bottleneck_dim=16)
  if method == "dino":
    c.model.update(out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16)
    c.dino.update(num_local_crops=2, local_size=16)
  for key, value in overrides.items():
    c[key] = value
  c.lock()
  return c
