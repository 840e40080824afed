"""The 3-D Swin encoder of MONAI's `SwinUNETR.swinViT`, in Flax (NDHWC).

Specification: shared/methods/alice.md section 1.1. The encoder reproduces MONAI's forward
pass (`swinViT(x, normalize=True)`, `use_v2=False`) so that exported weights load into MONAI
with strict=True and give the same hidden states:
  x [n, D, H, W, C_in] -> [h0, ..., h4], h_s [n, D / (p 2^s), H / ..., W / ..., F 2^s],
F = feature_size, p = patch_size (sizes rounded up where MONAI pads). h0 is the patch
embedding; h_s (s >= 1) is stage s's output after its patch merge. Each stage consumes the
un-normalised output of the previous one; the returned states are LayerNorm'ed over
channels without parameters (eps 1e-5), as MONAI's `proj_out(normalize=True)`.

Numerics reproduced from MONAI (each is needed for 1e-4 parity):
- Patch embedding: inputs not divisible by the patch are zero-padded at the end first.
- Per-axis window rule: an axis whose (unpadded) grid is <= the window uses the grid size as
  its window and shift 0; otherwise the configured window and shift = window // 2.
- Block b of a stage is shifted for odd b. Inside the attention branch, LayerNorm comes
  first, then zero padding of each axis at its end to a multiple of the window: the padded
  tokens take part in the attention of unshifted windows (they are not masked).
- Shifted windows: roll by -shift, then add -100 to the logits between tokens of different
  regions, the regions being [0, P - w), [P - w, P - s), [P - s, P) per axis of the padded
  grid P (one region along an axis with shift 0).
- Relative position bias: the table for the configured window, looked up through the index
  matrix of the configured window, [N, N] with N = prod(window); a shrunk window of n < N
  tokens takes the top-left [n, n] block of that matrix, as MONAI does, although those are
  not the relative positions of the shrunk window.
- qkv is one Dense C -> 3C whose output splits as (3, heads, head_dim); q is scaled by
  head_dim^-0.5 before the product.
- Patch merge ("mergingv2"): odd axes zero-padded at their end, the 8 sub-grids
  x[i::2, j::2, k::2] concatenated in itertools.product order, LayerNorm(8C), Dense 8C -> 2C
  without bias. "merging" is MONAI's legacy order from before MONAI 1.5, which repeats two
  sub-grids (MONAI 1.5 changed its "merging" class to 8 distinct sub-grids in yet another
  order, so a "merging" model matches MONAI < 1.5 only); it exists to load old checkpoints.
- LayerNorm eps 1e-5 with two-pass variance (torch's); GELU exact (erf).

Parameter tree and MONAI keys (key = "swinViT." + the key below; s = 1..4, b = 0..depth-1).
Flax layers{s}/blocks_{b}/ is written Blk/ and MONAI layers{s}.0.blocks.{b}. is Blk. below.
Dense kernels [in, out] are transposed to [out, in]; the conv kernel [kd, kh, kw, in, out]
goes to [out, in, kd, kh, kw]. NDHWC's (D, H, W) are NCDHW's (D, H, W): no axis is flipped.

  patch_embed/proj/{kernel, bias}             patch_embed.proj.{weight, bias}
  Blk/norm1/{scale, bias}                     Blk.norm1.{weight, bias}
  Blk/attn/relative_position_bias_table       Blk.attn.relative_position_bias_table
  (constant relative_position_index(window))  Blk.attn.relative_position_index (int64)
  Blk/attn/qkv/{kernel, bias}                 Blk.attn.qkv.{weight, bias}
  Blk/attn/proj/{kernel, bias}                Blk.attn.proj.{weight, bias}
  Blk/norm2/{scale, bias}                     Blk.norm2.{weight, bias}
  Blk/mlp/linear{1,2}/{kernel, bias}          Blk.mlp.linear{1,2}.{weight, bias}
  layers{s}/downsample/norm/{scale, bias}     layers{s}.0.downsample.norm.{weight, bias}
  layers{s}/downsample/reduction/kernel       layers{s}.0.downsample.reduction.weight
(anatjax/export/swin3d.py implements this table both ways.)

Matmuls (convolution, Dense layers, attention products) run in `dtype`; parameters,
LayerNorms, the residual stream, the softmax and the returned states stay float32.
Stochastic depth (`drop_path_rate`, linear over all blocks from 0, MONAI's schedule) is off
by default and acts only with train=True, drawing from the "dropout" rng.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatjax.models.heads import symmetric_uniform

LN_EPSILON = 1e-5
MASK_VALUE = -100.0   # MONAI's additive logit between tokens of different shifted regions
# Sub-grid offsets (i, j, k) of x[i::2, j::2, k::2], in concatenation order.
MERGE_ORDERS = {
    "mergingv2": tuple(itertools.product(range(2), repeat=3)),
    "merging": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
                (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
}
_dense_init = nn.initializers.truncated_normal(0.02)   # Swin's initialisation


def _triple(value) -> tuple[int, int, int]:
  values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
  if len(values) != 3:
    raise ValueError(f"expected an int or 3 ints, got {value!r}")
  return values


def effective_window(grid: Sequence[int], window: Sequence[int],
                     shift: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """MONAI's per-axis rule: an axis no larger than the window is one window, unshifted."""
  use_window, use_shift = list(window), list(shift)
  for axis, size in enumerate(grid):
    if size <= window[axis]:
      use_window[axis], use_shift[axis] = size, 0
  return tuple(use_window), tuple(use_shift)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int, int]) -> np.ndarray:
  """[N, N] int64, N = prod(window): the row of the bias table for each token pair of a
  window, the relative offset (d, h, w) of the pair flattened in the table's (2w - 1)^3
  row-major order. Also exported as MONAI's `relative_position_index` buffer."""
  coords = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij")).reshape(3, -1)
  offsets = coords[:, :, None] - coords[:, None, :] + np.array(window)[:, None, None] - 1
  sizes = [2 * w - 1 for w in window]
  index = ((offsets[0] * sizes[1] + offsets[1]) * sizes[2] + offsets[2]).astype(np.int64)
  index.flags.writeable = False   # cached: shared by every caller
  return index


def _partition_np(grid: np.ndarray, window: Sequence[int]) -> np.ndarray:
  """[P0, P1, P2] -> [num_windows, N], windows and their tokens in row-major order."""
  p, w = grid.shape, window
  blocks = grid.reshape(p[0] // w[0], w[0], p[1] // w[1], w[1], p[2] // w[2], w[2])
  return blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, math.prod(w))


@functools.lru_cache(maxsize=None)
def shifted_window_mask(padded: tuple[int, int, int], window: tuple[int, int, int],
                        shift: tuple[int, int, int]) -> np.ndarray:
  """[num_windows, N, N] float32: 0 within a shifted region, MASK_VALUE across regions.

  Regions are labelled on the rolled, padded grid, where a window that straddles the wrap
  of the roll holds tokens from opposite ends of the volume.
  """
  labels = np.zeros(padded, np.int64)
  for axis, (size, w, s) in enumerate(zip(padded, window, shift)):
    position = np.arange(size)
    region = (position >= size - w).astype(np.int64) + (position >= size - s)
    if not s:   # MONAI's slices then give the whole axis one label
      region = np.zeros_like(position)
    labels = labels * 3 + np.expand_dims(region, [a for a in range(3) if a != axis])
  tokens = _partition_np(labels, window)
  mask = np.where(tokens[:, :, None] != tokens[:, None, :], MASK_VALUE, 0.0)
  return mask.astype(np.float32)


def window_partition(x, window: Sequence[int]):
  """[n, P0, P1, P2, C] -> [n, num_windows, N, C]."""
  n, p0, p1, p2, c = x.shape
  w0, w1, w2 = window
  x = x.reshape(n, p0 // w0, w0, p1 // w1, w1, p2 // w2, w2, c)
  return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, -1, w0 * w1 * w2, c)


def window_reverse(windows, window: Sequence[int], padded: Sequence[int]):
  """[n, num_windows, N, C] -> [n, P0, P1, P2, C], the inverse of window_partition."""
  n, c = windows.shape[0], windows.shape[-1]
  (w0, w1, w2), (p0, p1, p2) = window, padded
  x = windows.reshape(n, p0 // w0, p1 // w1, p2 // w2, w0, w1, w2, c)
  return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, p0, p1, p2, c)


def _pad_end(x, multiples: Sequence[int]):
  """Zero-pads the three spatial axes of [n, D, H, W, C] at their end to multiples."""
  pads = [(0, -size % m) for size, m in zip(x.shape[1:4], multiples)]
  return jnp.pad(x, [(0, 0)] + pads + [(0, 0)]) if any(p for _, p in pads) else x


def _layer_norm(name: str) -> nn.LayerNorm:
  # Two-pass variance like torch: the fast E[x^2] - E[x]^2 costs digits at large means.
  return nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, dtype=jnp.float32,
                      name=name)


def normalize(x):
  """MONAI's proj_out(normalize=True): LayerNorm over channels, no parameters."""
  x = x.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                                 + LN_EPSILON)


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, with MONAI's relative position bias."""
  num_heads: int
  window: tuple[int, int, int]   # the configured window: the bias table's and index's
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, windows, mask):
    """windows [n, num_windows, N, C]; mask [num_windows, N, N] or None -> same shape."""
    n, num_windows, tokens, channels = windows.shape
    heads, head_dim = self.num_heads, channels // self.num_heads
    table = self.param("relative_position_bias_table", _dense_init,
                       (math.prod(2 * w - 1 for w in self.window), heads))
    qkv = nn.Dense(3 * channels, use_bias=self.qkv_bias, dtype=self.dtype,
                   kernel_init=_dense_init, name="qkv")(windows)
    qkv = qkv.reshape(n, num_windows, tokens, 3, heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)   # MONAI scales q, not the product
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32)
    index = relative_position_index(self.window)[:tokens, :tokens].astype(np.int32)
    logits = logits + table[index].transpose(2, 0, 1)
    if mask is not None:
      logits = logits + mask[:, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(windows.shape)
    return nn.Dense(channels, dtype=self.dtype, kernel_init=_dense_init, name="proj")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init, name="linear1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(channels, dtype=self.dtype, kernel_init=_dense_init, name="linear2")(x)


def _drop_path(module: nn.Module, x, rate: float, train: bool):
  """Stochastic depth: zeroes a whole sample's branch with probability `rate` and scales
  the kept ones by 1 / (1 - rate)."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class SwinBlock(nn.Module):
  """x + DropPath(WindowAttn(LN1(x))), then x + DropPath(MLP(LN2(x))) on [n, D, H, W, C]."""
  num_heads: int
  window: tuple[int, int, int]
  shifted: bool
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    grid, channels = x.shape[1:4], x.shape[-1]
    shift = tuple(w // 2 for w in self.window) if self.shifted else (0, 0, 0)
    window, shift = effective_window(grid, self.window, shift)
    y = _pad_end(_layer_norm("norm1")(x), window)
    padded = y.shape[1:4]
    mask = None
    if any(shift):
      y = jnp.roll(y, [-s for s in shift], axis=(1, 2, 3))
      mask = jnp.asarray(shifted_window_mask(padded, window, shift))
    y = WindowAttention(self.num_heads, self.window, self.qkv_bias, self.dtype, name="attn")(
        window_partition(y, window), mask)
    y = window_reverse(y, window, padded)
    if any(shift):
      y = jnp.roll(y, shift, axis=(1, 2, 3))
    y = y[:, :grid[0], :grid[1], :grid[2]]
    x = x + _drop_path(self, y, self.drop_path, train).astype(jnp.float32)
    y = Mlp(int(channels * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm("norm2")(x))
    return x + _drop_path(self, y, self.drop_path, train).astype(jnp.float32)


class PatchMerging(nn.Module):
  """[n, D, H, W, C] -> [n, ceil(D/2), ceil(H/2), ceil(W/2), 2C] (module doc)."""
  order: str = "mergingv2"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = _pad_end(x, (2, 2, 2))
    x = jnp.concatenate([x[:, i::2, j::2, k::2] for i, j, k in MERGE_ORDERS[self.order]], -1)
    x = _layer_norm("norm")(x)
    return nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, kernel_init=_dense_init,
                    name="reduction")(x).astype(jnp.float32)


class SwinStage(nn.Module):
  """MONAI's BasicLayer: `depth` blocks (odd ones shifted), then the patch merge."""
  depth: int
  num_heads: int
  window: tuple[int, int, int]
  drop_paths: tuple[float, ...]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  downsample: str = "mergingv2"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for b in range(self.depth):
      x = SwinBlock(self.num_heads, self.window, b % 2 == 1, self.mlp_ratio, self.qkv_bias,
                    self.drop_paths[b], self.dtype, name=f"blocks_{b}")(x, train)
    return PatchMerging(self.downsample, self.dtype, name="downsample")(x)


class PatchEmbed(nn.Module):
  features: int
  patch: tuple[int, int, int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _pad_end(x, self.patch)
    # PyTorch's Conv3d bias init, U(+-1/sqrt(fan_in)), not Flax's zeros: a blank input
    # region (masked, or air) then embeds to a bias vector with spread over channels, not
    # to zeros, which the parameter-free LayerNorm of the hidden states would divide by
    # sqrt(eps) (gradients 1e5-1e6 at initialisation).
    fan_in = x.shape[-1] * math.prod(self.patch)
    x = nn.Conv(self.features, self.patch, self.patch, padding="VALID", dtype=self.dtype,
                bias_init=symmetric_uniform(fan_in ** -0.5), name="proj")(x)
    return x.astype(jnp.float32)


class SwinViT3D(nn.Module):
  """MONAI's SwinUNETR.swinViT: x [n, D, H, W, C_in] -> the 5 normalised hidden states."""
  feature_size: int = 48
  depths: tuple[int, ...] = (2, 2, 2, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int | tuple[int, int, int] = 7
  patch_size: int | tuple[int, int, int] = 2
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  downsample: str = "mergingv2"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False) -> list:
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    if self.downsample not in MERGE_ORDERS:
      raise ValueError(f"downsample={self.downsample!r}: expected one of {sorted(MERGE_ORDERS)}")
    for s, heads in enumerate(self.num_heads):
      if (self.feature_size * 2 ** s) % heads:
        raise ValueError(f"stage {s + 1}: {self.feature_size * 2 ** s} channels do not split "
                         f"into {heads} heads")
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    window = _triple(self.window_size)
    x = PatchEmbed(self.feature_size, _triple(self.patch_size), self.dtype,
                   name="patch_embed")(x)
    hidden = [normalize(x)]
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      first = sum(self.depths[:s])
      x = SwinStage(depth, heads, window, tuple(rates[first:first + depth]), self.mlp_ratio,
                    self.qkv_bias, self.downsample, self.dtype, name=f"layers{s + 1}")(x, train)
      hidden.append(normalize(x))
    return hidden
