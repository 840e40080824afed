"""DrasCLR's location-conditioned 3D CNN (shared/methods/drasclr.md section 1; NDHWC).

Every convolution is a CondConv3D: E expert 3x3x3 kernels mixed by a sigmoid router of
the patch's atlas location, r(l) = sigmoid(l A + a), W(l) = sum_e r_e(l) W_e, one shared
bias. The routing sees only the location, never the image, so all patches at one location
share one kernel: inputs come grouped by location, x [G, n, D, H, W, C] with locations
l [G, 3], the G mixed kernels are made with one einsum and applied by a convolution
vmapped over G (no loop over samples; the reference loops per sample, defect D1).

BatchNorm normalises "ghost groups" (the reference's per-GPU batches, spec 4.2): the n
samples of each location group are cut into consecutive chunks of `ghost` samples, and
ghost group j is chunk j of every location group together (the anchors' neighbour pass:
the 2 x 32 neighbour patches of 32 anchors). ghost = n gives plain full-batch statistics.
The running averages move once per call with the mean of the groups' means and of their
unbiased variances (PyTorch's running-variance convention), momentum 0.1 (Flax: 0.9).

Parameter tree, for each layer L of LAYERS (conv1, conv2, block{1,2,3}_{a,b,c}, conv3,
conv4): encoder/L_cond/{kernel [E, 3, 3, 3, Cin, Cout], bias [Cout], router/{kernel [3, E],
bias [E]}}, encoder/L_bn/{scale, bias} and batch_stats encoder/L_bn/{mean, var}; the
projection head head/{hidden, out}/{kernel, bias}.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# (name, output channels, stride) of the 13 conditioned convolutions (spec 1.2).
LAYERS = (("conv1", 8, 1), ("conv2", 8, 2),
          ("block1_a", 16, 1), ("block1_b", 16, 1), ("block1_c", 16, 2),
          ("block2_a", 32, 1), ("block2_b", 32, 1), ("block2_c", 32, 2),
          ("block3_a", 64, 1), ("block3_b", 64, 1), ("block3_c", 64, 2),
          ("conv3", 128, 1), ("conv4", 128, 2))
FEATURES = LAYERS[-1][1]
BN_MOMENTUM = 0.9   # PyTorch momentum 0.1
BN_EPSILON = 1e-5


def per_expert_uniform(key, shape, dtype=jnp.float32):
  """U(+-1/sqrt(27 C_in)) for [E, 3, 3, 3, C_in, C_out]: each expert initialised as one
  ordinary convolution (spec 1.1; the reference's fan-in also counted C_out, D6)."""
  bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class CondConv3D(nn.Module):
  features: int
  strides: int = 1
  num_experts: int = 8
  dtype: jnp.dtype = jnp.float32     # convolution dtype; mixing stays float32

  @nn.compact
  def __call__(self, x, loc):
    """x [G, n, D, H, W, C_in], loc [G, 3] -> [G, n, D', H', W', features]."""
    kernels = self.param("kernel", per_expert_uniform,
                         (self.num_experts, 3, 3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    routing = nn.sigmoid(nn.Dense(self.num_experts, name="router")(loc.astype(jnp.float32)))
    mixed = jnp.einsum("ge,e...->g...", routing, kernels).astype(self.dtype)

    def convolve(group, kernel):
      return jax.lax.conv_general_dilated(
          group.astype(self.dtype), kernel, (self.strides,) * 3, [(1, 1)] * 3,
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return jax.vmap(convolve)(x, mixed) + bias.astype(self.dtype)


class GhostBatchNorm(nn.Module):
  """BatchNorm over ghost groups of `ghost` samples per location group (module doc)."""

  @nn.compact
  def __call__(self, x, train: bool, ghost: int):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    mean_var = self.variable("batch_stats", "mean", jnp.zeros, (channels,))
    var_var = self.variable("batch_stats", "var", jnp.ones, (channels,))
    x32 = x.astype(jnp.float32)
    if train:
      groups, n = x.shape[0], x.shape[1]
      if n % ghost:
        raise ValueError(f"BatchNorm ghost groups of {ghost} do not divide the {n} samples "
                         "per location")
      chunks = x32.reshape(groups, n // ghost, ghost, -1, channels)
      axes = (0, 2, 3)
      mean = jnp.mean(chunks, axes, keepdims=True)
      var = jnp.mean(jnp.square(chunks - mean), axes, keepdims=True)
      y = ((chunks - mean) * jax.lax.rsqrt(var + BN_EPSILON)).reshape(x.shape)
      if not self.is_initializing():
        count = groups * ghost * chunks.shape[3]
        unbiased = var * count / max(count - 1, 1)
        mean_var.value = (BN_MOMENTUM * mean_var.value
                          + (1 - BN_MOMENTUM) * jnp.mean(mean, axis=(0, 1, 2, 3)))
        var_var.value = (BN_MOMENTUM * var_var.value
                         + (1 - BN_MOMENTUM) * jnp.mean(unbiased, axis=(0, 1, 2, 3)))
    else:
      y = (x32 - mean_var.value) * jax.lax.rsqrt(var_var.value + BN_EPSILON)
    return (y * scale + bias).astype(x.dtype)


class DrasCLREncoder(nn.Module):
  """f(x; l): 13 CondConv3D + BN + ELU layers, [G, n, S, S, S, 1] -> h [G, n, 128]."""
  num_experts: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, loc, train: bool = False, ghost: int = 0):
    for name, features, strides in LAYERS:
      x = CondConv3D(features, strides, self.num_experts, self.dtype, name=f"{name}_cond")(x, loc)
      x = GhostBatchNorm(name=f"{name}_bn")(x, train, ghost or x.shape[1])
      x = nn.elu(x)
    if x.shape[2:5] != (1, 1, 1):
      raise ValueError(f"patches of {x.shape[2:5]} after the encoder: its five stride-2 "
                       "layers take 32^3 patches (or 16^3, 8^3) to one voxel")
    return x.reshape(x.shape[:2] + (FEATURES,)).astype(jnp.float32)


class ProjectionHead(nn.Module):
  """g: Dense 128 -> 128, ReLU, Dense 128 -> 128 (not normalised here)."""
  features: int = 128

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.features, name="out")(nn.relu(nn.Dense(self.features, name="hidden")(h)))


class DrasCLRNetwork(nn.Module):
  """Encoder and projection head: (patches [G, n, ...], locations [G, 3]) -> (h, z)."""
  num_experts: int = 8
  projection_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.encoder = DrasCLREncoder(self.num_experts, self.dtype)
    self.head = ProjectionHead(self.projection_dim)

  def __call__(self, x, loc, train: bool = False, ghost: int = 0):
    h = self.encoder(x, loc, train, ghost)
    return h, self.head(h)
