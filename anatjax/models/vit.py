"""The 2-D Vision Transformer encoder, in big_vision's parameter layout.

Parameter names follow big_vision (`embedding`, `cls`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`) with exact-erf GELU, LayerNorm eps 1e-6 and qkv biases, so the
weights map one-to-one onto a stock timm ViT. Positions are the fixed MAE-style 2-D sin-cos
table: a constant computed from the grid, not a parameter (the CLS row is zero).
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (width, depth, mlp_dim, num_heads), the standard ViT sizes.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def parse_variant(variant: str, depth: int = 0) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16).

  `depth` > 0 replaces the variant's number of blocks (configs' `model.depth`).
  """
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not match or match.group(1) not in VARIANTS:
    raise ValueError(f"ViT variant {variant!r}: expected NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)}, e.g. 'B/16'.")
  width, variant_depth, mlp_dim, heads = VARIANTS[match.group(1)]
  return dict(width=width, depth=depth or variant_depth, mlp_dim=mlp_dim, num_heads=heads,
              patch_size=int(match.group(2)))


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """[N] positions -> [N, dim]: sin(pos*w) then cos(pos*w), w_i = 10000^(-i/(dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=None)
def sincos_2d(grid_h: int, grid_w: int, dim: int, cls_token: bool = True) -> np.ndarray:
  """The MAE 2-D sin-cos table, [(1 +) grid_h*grid_w, dim], float32, row-major tokens.

  As in MAE, the first half of the channels encodes the column index and the second half
  the row index (MAE builds its meshgrid with the width coordinate first).
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  table = np.concatenate([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  table = table.astype(np.float32)
  table.setflags(write=False)
  return table


xavier_uniform = nn.initializers.xavier_uniform()


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=xavier_uniform,
                              bias_init=nn.initializers.zeros)
    x = dense(self.mlp_dim)(x)
    x = nn.gelu(x, approximate=False)
    return dense(width)(x)


class Attention(nn.Module):
  """Multi-head self-attention with big_vision/flax names (query, key, value, out).

  The q/k/v kernels are initialised like one fused [D, 3D] xavier-uniform matrix (as MAE and
  timm do for their `qkv` layer), the output projection like a [D, D] one.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    # DenseGeneral initialises its kernel as a flat [inputs, outputs] matrix: xavier on
    # [D, D] with half the scale gives the bound sqrt(6 / (D + 3D)) of a fused qkv matrix.
    qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
    project = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim),
                                dtype=self.dtype, kernel_init=qkv_init)
    q, k, v = (project(name=n)(x) for n in ("query", "key", "value"))
    q = q * (head_dim ** -0.5)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=xavier_uniform,
                           name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  ln_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, self.dtype, name="MultiHeadDotProductAttention_0")(y)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, self.dtype)(y)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ScannedBlock(EncoderBlock):
  """EncoderBlock with the (carry, input) -> (carry, output) signature nn.scan needs."""

  def __call__(self, x, _):
    return super().__call__(x), None


class Transformer(nn.Module):
  """`depth` encoder blocks and a final LayerNorm.

  remat: recompute block activations in the backward pass ('full': keep nothing, 'dots':
  keep matmul outputs) to trade FLOPs for memory. scan: one scanned block instead of
  `depth` unrolled ones, for faster compiles of deep models; its parameters are stacked
  under `<block_prefix>` with a leading layer axis (`unstack_blocks` restores the
  per-block layout, which export and the rest of the code see).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  ln_eps: float = 1e-6
  block_prefix: str = "encoderblock"
  norm_name: str = "encoder_norm"
  remat: str = "none"
  scan: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {sorted(REMAT_POLICIES)}")
    args = (self.mlp_dim, self.num_heads, self.ln_eps, self.dtype)
    block = ScannedBlock if self.scan else EncoderBlock
    if self.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.depth)
      x, _ = stack(*args, name=self.block_prefix)(x, None)
    else:
      for i in range(self.depth):
        x = block(*args, name=f"{self.block_prefix}_{i}")(x)
    return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=self.norm_name)(x)


def unstack_blocks(params, block_prefix: str = "encoderblock"):
  """A scanned Transformer's parameters -> the per-block layout (`<prefix>_{i}`).

  Works on any dict that holds the Transformer's parameters at some depth; a tree that is
  already per-block is returned unchanged.
  """
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == block_prefix:
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"{block_prefix}_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = unstack_blocks(value, block_prefix)
  return out


class ViT(nn.Module):
  """images [B, H, W, C] float -> tokens [B, 1 + H/p * W/p, width] (CLS first), float32.

  With `keep` ([B, n] patch indices, row-major) only those patch tokens enter the
  transformer, after their position embedding is added (MAE's visible subset): the output
  is [B, 1 + n, width], token i + 1 being patch keep[:, i].
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  remat: str = "none"
  scan: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, keep=None):
    p = self.patch_size
    # xavier-uniform on the flattened [p*p*C, width] view of the kernel, as MAE does.
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                  in_axis=(0, 1, 2), out_axis=-1)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=patch_init, name="embedding")(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
    x = x + sincos_2d(grid_h, grid_w, self.width, cls_token=False).astype(self.dtype)
    if keep is not None:
      x = jnp.take_along_axis(x, keep[..., None], axis=1)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x],
                        axis=1)
    x = Transformer(self.depth, self.mlp_dim, self.num_heads, remat=self.remat,
                    scan=self.scan, dtype=self.dtype, name="Transformer")(x)
    return x.astype(jnp.float32)
