"""2-D maps of feature vectors for figures: exact t-SNE (van der Maaten & Hinton, 2008) in
NumPy, for the few thousand tokens a figure shows (O(N^2) memory and time per iteration;
deterministic given the seed)."""

from __future__ import annotations

import numpy as np


def _conditional_probabilities(sq_dists: np.ndarray, perplexity: float,
                               tol: float = 1e-5, max_steps: int = 100) -> np.ndarray:
  """Rows p_{j|i} of Gaussian kernels whose precisions are found by bisection so that
  every row's entropy is log(perplexity)."""
  n = sq_dists.shape[0]
  target = np.log(perplexity)
  probs = np.zeros((n, n))
  for i in range(n):
    d = np.delete(sq_dists[i], i)
    d = d - d.min()                    # shift for stability: the kernel ratios are unchanged
    beta, lo, hi = 1.0, 0.0, np.inf
    for _ in range(max_steps):
      w = np.exp(-d * beta)
      total = w.sum()
      entropy = np.log(total) + beta * np.sum(d * w) / total
      if abs(entropy - target) < tol:
        break
      if entropy > target:             # too flat: sharpen
        lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
      else:
        hi, beta = beta, (beta + lo) / 2
    probs[i, np.arange(n) != i] = w / total
  return probs


def tsne(x: np.ndarray, perplexity: float = 30.0, iterations: int = 750, seed: int = 0,
         exaggeration: float = 12.0, exaggeration_iterations: int = 250) -> np.ndarray:
  """[N, D] -> [N, 2]. PCA initialisation (scaled to std 1e-4), early exaggeration,
  momentum 0.5 then 0.8 with per-coordinate gains, learning rate max(N / exaggeration / 4,
  50): the usual recipe. `seed` only breaks ties in the PCA signs' jitter."""
  x = np.asarray(x, np.float64)
  n = len(x)
  perplexity = min(perplexity, (n - 1) / 3)
  sq = np.sum(x * x, axis=1)
  sq_dists = np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0)
  p = _conditional_probabilities(sq_dists, perplexity)
  p = np.maximum((p + p.T) / (2 * n), 1e-12)

  centred = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  y = centred @ vt[:2].T
  y += np.random.default_rng(seed).normal(scale=1e-8, size=y.shape)
  y *= 1e-4 / np.std(y[:, 0])
  learning_rate = max(n / exaggeration / 4, 50.0)
  velocity, gains = np.zeros_like(y), np.ones_like(y)
  for it in range(iterations):
    scale = exaggeration if it < exaggeration_iterations else 1.0
    sq_y = np.sum(y * y, axis=1)
    kernel = 1.0 / (1.0 + np.maximum(sq_y[:, None] + sq_y[None] - 2 * y @ y.T, 0))
    np.fill_diagonal(kernel, 0.0)
    q = np.maximum(kernel / kernel.sum(), 1e-12)
    weights = (scale * p - q) * kernel
    grad = 4.0 * (np.sum(weights, axis=1)[:, None] * y - weights @ y)
    momentum = 0.5 if it < exaggeration_iterations else 0.8
    same_sign = np.sign(grad) == np.sign(velocity)
    gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
    velocity = momentum * velocity - learning_rate * gains * grad
    y = y + velocity
  return (y - y.mean(axis=0)).astype(np.float32)
