"""A dense anatomical embedding network for CT: a 3-D ResNet-18-style encoder with a
feature pyramid, giving two L2-normalised fields (shared/methods/alice.md 2.4, provider (a)).

  x [n, D, H, W, 1] -> (fine [n, D/f, H/f, W/f, fine_dim], coarse [n, D/c, H/c, W/c, coarse_dim])

Encoder: a 3^3 stem convolution of stride `stem_stride`, then stages of BasicBlocks (two
3^3 convolutions and a shortcut, 1^3 projection where the shape changes); stage k has
`widths[k]` channels and stride stem_stride * 2^k (the first stage keeps the stem's
resolution, each later one halves it), ResNet-18's (2, 2, 2, 2) blocks by default. Only the
stages up to the coarse field's stride are built. FPN: a 1^3 lateral projection of every
stage from the fine to the coarse level to `fpn_width` channels, summed top-down with the
level above (nearest-neighbour x2 upsampling); each field is a 3^3 convolution + norm + ReLU
and a 1^3 projection of its level, normalised to unit length in float32.

The spec's strides (fine 4, coarse 16 on 2 mm CT: 8 mm and 32 mm cells) come from
stem_stride 2, fine at stage 1 and coarse at stage 3; on 4 mm CT the same physical cells
are fine stride 2 and coarse stride 8 (runlocal: stem_stride 2, stages 0 and 2).

Decision: inside the network the [0, 1] input is first standardised to (x - 0.25) / 0.1
(water at 0, +-400 HU at +-1, air at -2.5, 3071 HU at 7.5), and the stem convolution's bias
starts random (normal, std 1). Without a bias, convolutions, ReLUs and per-voxel norms make
the network blind to a uniform region's intensity (f(a x) = f(x) for a > 0): at
initialisation liver and fat would look alike, and learning the biases first is slow.

Decision (spec silent): the normalisation is LayerNorm over the channels of each voxel
(ConvNeXt-style), not BatchNorm or GroupNorm. BatchNorm would carry running statistics as
method state and behave differently at inference; GroupNorm (like BatchNorm) pools
statistics over space, so a voxel's embedding would depend on the extent of the input, and
the provider computes fields of whole volumes with a network trained on crops. A per-voxel
norm has no state and keeps the network a purely local, translation-equivariant function:
a whole-volume field equals the fields of crops cut at multiples of the coarse stride,
away from their borders.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

NORM_EPSILON = 1e-6
INPUT_CENTRE, INPUT_SCALE = 0.25, 0.1   # (x - centre) / scale, x = (HU + 1024) / 4095


def levels(widths, blocks, stem_stride: int, fine_stride: int, coarse_stride: int):
  """(fine stage, coarse stage) for the fields' strides; a clear error if the stages'
  widths and block counts differ in number, a stride is not a stage's (stem_stride * 2^k)
  or fine is not finer than coarse."""
  if len(widths) != len(blocks):
    raise ValueError(f"config model.widths={tuple(widths)} and model.blocks="
                     f"{tuple(blocks)} must have one entry per stage")
  num_stages = len(widths)
  strides = [stem_stride * 2 ** k for k in range(num_stages)]
  for name, stride in (("fine_stride", fine_stride), ("coarse_stride", coarse_stride)):
    if stride not in strides:
      raise ValueError(f"config model.{name}={stride} is not the stride of a stage; with "
                       f"model.stem_stride={stem_stride} and {num_stages} stages the "
                       f"stages have strides {strides}")
  fine, coarse = strides.index(fine_stride), strides.index(coarse_stride)
  if fine >= coarse:
    raise ValueError(f"config model.fine_stride={fine_stride} must be smaller than "
                     f"model.coarse_stride={coarse_stride}")
  return fine, coarse


def unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _conv(features, kernel, strides=1, dtype=jnp.float32, name=None):
  return nn.Conv(features, (kernel,) * 3, strides=(strides,) * 3, padding="SAME",
                 dtype=dtype, name=name)


def _norm(name=None):
  return nn.LayerNorm(epsilon=NORM_EPSILON, dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.relu(_norm("norm1")(_conv(self.features, 3, self.strides, self.dtype,
                                     "conv1")(x)))
    y = _norm("norm2")(_conv(self.features, 3, 1, self.dtype, "conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _norm("shortcut_norm")(_conv(self.features, 1, self.strides, self.dtype,
                                       "shortcut")(x))
    return nn.relu(x + y).astype(self.dtype)


def _upsample2(x):
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class Embed3D(nn.Module):
  """The two-field embedding network (module doc)."""
  widths: tuple = (32, 64, 128, 256)
  blocks: tuple = (2, 2, 2, 2)
  stem_stride: int = 2
  fpn_width: int = 128
  fine_stride: int = 4
  fine_dim: int = 64
  coarse_stride: int = 16
  coarse_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fine, coarse = levels(self.widths, self.blocks, self.stem_stride, self.fine_stride,
                          self.coarse_stride)
    x = ((x - INPUT_CENTRE) / INPUT_SCALE).astype(self.dtype)
    stem = nn.Conv(self.widths[0], (3,) * 3, strides=(self.stem_stride,) * 3,
                   padding="SAME", dtype=self.dtype, bias_init=nn.initializers.normal(1.0),
                   name="stem")
    x = nn.relu(_norm("stem_norm")(stem(x))).astype(self.dtype)
    stages = []
    for k in range(coarse + 1):
      for b in range(self.blocks[k]):
        x = BasicBlock(self.widths[k], 2 if (k and not b) else 1, self.dtype,
                       name=f"stage{k}_block{b}")(x)
      stages.append(x)
    pyramid = {coarse: _conv(self.fpn_width, 1, dtype=self.dtype,
                             name=f"lateral{coarse}")(stages[coarse])}
    for k in range(coarse - 1, fine - 1, -1):
      pyramid[k] = (_conv(self.fpn_width, 1, dtype=self.dtype, name=f"lateral{k}")(stages[k])
                    + _upsample2(pyramid[k + 1]))

    def field(level, dim, name):
      y = nn.relu(_norm(f"{name}_norm")(_conv(self.fpn_width, 3, dtype=self.dtype,
                                              name=f"{name}_conv")(pyramid[level])))
      return unit(_conv(dim, 1, dtype=self.dtype, name=f"{name}_out")(y.astype(self.dtype)))
    return field(fine, self.fine_dim, "fine"), field(coarse, self.coarse_dim, "coarse")
