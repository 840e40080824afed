"""Pure loss functions shared by the methods. Everything here computes in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sinkhorn(scores, epsilon: float, num_iters: int):
  """Sinkhorn-Knopp balancing of a [rows, cols] score matrix.

  Returns Q with every row summing to 1 and, as the iterations converge, every column
  summing to rows/cols: each column (prototype) is used equally across the rows
  (positions). Q = exp(scores/eps), normalised, then `num_iters` rounds of column then row
  rescaling; the row step comes last, so row sums are exact.
  """
  scores = scores.astype(jnp.float32)
  rows, cols = scores.shape
  q = jnp.exp((scores - jnp.max(scores)) / epsilon)
  q = q / jnp.sum(q)
  for _ in range(num_iters):  # a few static rounds: unrolled into one fused kernel
    q = q / (jnp.sum(q, axis=0, keepdims=True) * cols)
    q = q / (jnp.sum(q, axis=1, keepdims=True) * rows)
  return q * rows


def soft_cross_entropy(target_probs, logits, temperature: float):
  """-sum_k target[..., k] * log_softmax(logits / temperature)[..., k], per token."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(target_probs * log_probs, axis=-1)


def masked_mean(values, mask, count=None):
  """Sum of `values` where `mask` is true over max(1, count); 0 when nothing is selected.

  `count` defaults to the number of selected values (a plain masked mean); passing the
  count of a whole batch makes the results of its micro-batches add up to its mean.
  """
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask) if count is None else count
  return jnp.sum(values * mask) / jnp.maximum(1.0, count)


def mean_squared_error(prediction, target, count=None):
  """Sum of squared differences over `count` (default: the number of elements)."""
  squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.sum(squared) / (squared.size if count is None else count)
