"""The shape-prior discriminator of LD's shape-guided variant (shared/methods/ld.md 7.2).

masks [N, H, W, 1] in [0, 1] -> the probability [N] that each is a real reference shape:
  Conv 1->16, act, maxpool 2; Conv 16->32, act, pool; 3 x [Conv 32->32, act, pool]
  (H / 32: 14 x 14 at 448), Conv 3x3 *valid* 32->32, act, Conv 3x3 valid, act (10 x 10),
  global average pool, 1x1 conv 32->32, act, 1x1 conv 32->1, sigmoid.
Convolutions are 3 x 3 'same' unless marked, with bias, PyTorch's default initialisation.
act = LeakyReLU with slope 0.2 (decision 5); `slope=1.0` reproduces the reference, whose
activation was the identity (defect D4). H and W must be at least 160 (the two valid
convolutions need 5 x 5 after the five poolings) and multiples of 32.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from anatjax.models.unet import torch_default_inits

MIN_SIZE = 160


class ShapeDiscriminator(nn.Module):
  slope: float = 0.2
  dtype: jnp.dtype = jnp.float32

  def _conv(self, x, features: int, kernel: int, padding: str, name: str):
    kernel_init, bias_init = torch_default_inits(kernel * kernel * x.shape[-1])
    return nn.Conv(features, (kernel, kernel), padding=padding, dtype=self.dtype,
                   kernel_init=kernel_init, bias_init=bias_init, name=name)(x)

  @nn.compact
  def __call__(self, masks):
    height, width = masks.shape[1:3]
    if min(height, width) < MIN_SIZE or height % 32 or width % 32:
      raise ValueError(f"shape discriminator input {height}x{width}: needs multiples of 32 "
                       f"of at least {MIN_SIZE} (set ld.crop_size accordingly)")
    act = lambda x: nn.leaky_relu(x, self.slope)
    x = masks.astype(self.dtype)
    for i, features in enumerate((16, 32, 32, 32, 32)):
      x = nn.max_pool(act(self._conv(x, features, 3, "SAME", f"conv{i}")), (2, 2), (2, 2))
    x = act(self._conv(x, 32, 3, "VALID", "valid0"))
    x = act(self._conv(x, 32, 3, "VALID", "valid1"))
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = act(self._conv(x, 32, 1, "VALID", "fc0"))
    x = self._conv(x, 1, 1, "VALID", "fc1")
    return nn.sigmoid(x.astype(jnp.float32)).reshape(masks.shape[0])
