"""Decoders that map encoder tokens back to pixels."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from anatjax.models.vit import Transformer, sincos_2d, xavier_uniform


def unpatchify(patches, grid_h: int, grid_w: int, patch_size: int):
  """[B, grid_h*grid_w, p*p*C] (each vector ordered p_row, p_col, channel) -> [B, H, W, C]."""
  batch, _, dim = patches.shape
  channels = dim // (patch_size * patch_size)
  x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h * patch_size, grid_w * patch_size, channels)


class RestorationDecoder(nn.Module):
  """AFiRe's anomaly-removal decoder: a light ViT that rebuilds the clean image.

  tokens [B, 1+L, D] and the token lesion flags abn [B, L] -> image [B, H, W, C]. Flagged
  patch tokens are replaced by a learned mask token of their own grid position, so the
  decoder must infer the normal anatomy there from the surrounding tokens.
  """
  grid_h: int
  grid_w: int
  patch_size: int
  channels: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_dim: int = 2048
  remat: str = "none"
  scan: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, abn):
    num_positions = self.grid_h * self.grid_w
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=xavier_uniform,
                 name="embed")(tokens)
    mask_tokens = self.param("mask_tokens", nn.initializers.normal(0.02),
                             (num_positions, self.width))
    patches = jnp.where(abn[..., None], mask_tokens.astype(x.dtype)[None], x[:, 1:])
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + sincos_2d(self.grid_h, self.grid_w, self.width).astype(x.dtype)
    x = Transformer(self.depth, self.mlp_dim, self.num_heads, ln_eps=1e-5,
                    block_prefix="decoderblock", norm_name="decoder_norm",
                    remat=self.remat, scan=self.scan, dtype=self.dtype,
                    name="Transformer")(x)
    pixels = nn.Dense(self.patch_size ** 2 * self.channels, dtype=self.dtype,
                      kernel_init=xavier_uniform, name="pred")(x[:, 1:])
    return unpatchify(pixels.astype(jnp.float32), self.grid_h, self.grid_w,
                      self.patch_size)
