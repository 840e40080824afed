"""Projection heads."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def symmetric_uniform(bound):
  """U(-bound, bound): PyTorch's default Linear init when bound = 1/sqrt(fan_in)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PositionPrototypeHead(nn.Module):
  """Per-token MLP -> unit vector -> cosine logits against per-position prototypes.

  tokens [B, L, D] -> logits [B, L, K]. Position j has its own K prototypes, the columns of
  `prototypes[j]` ([bottleneck, K]), normalised to unit length in the forward pass (weight
  normalisation with the gain fixed at 1, no bias). All positions are one einsum.
  """
  num_positions: int
  num_prototypes: int
  hidden_dim: int = 1024
  bottleneck_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    if tokens.shape[1] != self.num_positions:
      raise ValueError(f"PositionPrototypeHead built for {self.num_positions} positions "
                       f"got {tokens.shape[1]} tokens")
    init = nn.initializers.truncated_normal(0.02)
    x = tokens
    for features in (self.hidden_dim, self.hidden_dim):
      x = nn.gelu(nn.Dense(features, dtype=self.dtype, kernel_init=init)(x),
                  approximate=False)
    x = nn.Dense(self.bottleneck_dim, dtype=self.dtype, kernel_init=init)(x)
    u = l2_normalize(x.astype(jnp.float32))
    prototypes = self.param(
        "prototypes", symmetric_uniform(self.bottleneck_dim ** -0.5),
        (self.num_positions, self.bottleneck_dim, self.num_prototypes))
    w = l2_normalize(prototypes, axis=1)
    return jnp.einsum("bjd,jdk->bjk", u, w)
