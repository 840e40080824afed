"""Tiny variants of the real configs, shared by the tests."""

from configs import afire_vitb


def tiny_config(**overrides):
  """The runlocal recipe shrunk further: 32 px, a 1-block ViT, 4 steps per epoch."""
  c = afire_vitb.get_config("runlocal")
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
  c.model.num_prototypes = 8
  c.model.head_hidden_dim = 32
  c.model.head_bottleneck_dim = 16
  c.model.decoder = dict(width=16, depth=1, num_heads=2, mlp_dim=32)
  c.mesh = dict(data=1, fsdp=1)
  c.checkpoint.every = "4st"
  for key, value in overrides.items():
    c[key] = value
  c.lock()
  return c
