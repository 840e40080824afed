"""Decoders that map encoder tokens back to pixels."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from anatjax.models.vit import Transformer, sincos_2d, xavier_uniform


def patchify(images, patch_size: int):
  """[B, H, W, C] -> [B, H/p * W/p, p*p*C] (row-major patches, each p_row, p_col, channel)."""
  batch, height, width, channels = images.shape
  p = patch_size
  x = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches, grid_h: int, grid_w: int, patch_size: int):
  """[B, grid_h*grid_w, p*p*C] (each vector ordered p_row, p_col, channel) -> [B, H, W, C]."""
  batch, _, dim = patches.shape
  channels = dim // (patch_size * patch_size)
  x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h * patch_size, grid_w * patch_size, channels)


class RestorationDecoder(nn.Module):
  """A light ViT that rebuilds the whole image from tokens with some positions hidden.

  tokens [B, 1+L, D] and flags hidden [B, L] -> image [B, H, W, C]. Hidden patch tokens
  are replaced by a learned mask token, so the decoder must infer the image there from
  the surrounding tokens. AFiRe (hidden = lesion flags) learns one mask token per grid
  position; MAE (hidden = the masked patches) one `shared_mask_token`.
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
  shared_mask_token: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, hidden):
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=xavier_uniform,
                 name="embed")(tokens)
    if self.shared_mask_token:
      mask_tokens = self.param("mask_token", nn.initializers.normal(0.02), (1, self.width))
    else:
      mask_tokens = self.param("mask_tokens", nn.initializers.normal(0.02),
                               (self.grid_h * self.grid_w, self.width))
    patches = jnp.where(hidden[..., None], mask_tokens.astype(x.dtype)[None], x[:, 1:])
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
