import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from anatjax import losses


def test_sinkhorn_marginals_and_reference():
  rng = np.random.default_rng(0)
  scores = rng.uniform(-1, 1, size=(49, 16)).astype(np.float32)
  q = np.asarray(losses.sinkhorn(scores, epsilon=0.05, num_iters=3))
  # Independent float64 implementation of the same iteration.
  ref = np.exp((scores.astype(np.float64) - scores.max()) / 0.05)
  ref /= ref.sum()
  for _ in range(3):
    ref /= ref.sum(axis=0, keepdims=True) * 16
    ref /= ref.sum(axis=1, keepdims=True) * 49
  ref *= 49
  np.testing.assert_allclose(q, ref, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)      # rows: distributions
  # Columns approach rows/cols; with many iterations they match closely.
  q_conv = np.asarray(losses.sinkhorn(scores, epsilon=0.05, num_iters=200))
  np.testing.assert_allclose(q_conv.sum(axis=0), 49 / 16, rtol=1e-3)
  assert np.abs(q.sum(axis=0) - 49 / 16).max() > np.abs(q_conv.sum(axis=0) - 49 / 16).max()


def test_soft_cross_entropy_masked_mean_matches_numpy():
  rng = np.random.default_rng(1)
  target = rng.dirichlet(np.ones(8), size=(5,)).astype(np.float32)       # [L, K]
  logits = rng.uniform(-1, 1, size=(3, 5, 8)).astype(np.float32)        # [B, L, K]
  mask = rng.uniform(size=(3, 5)) > 0.4
  ce = losses.soft_cross_entropy(target[None], logits, 0.1)
  got = float(losses.masked_mean(ce, mask))
  direct = -(target[None] * log_softmax(logits.astype(np.float64) / 0.1, axis=-1)).sum(-1)
  want = (direct * mask).sum() / max(1, mask.sum())
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_masked_mean_of_nothing_is_zero_not_nan():
  values = np.ones((2, 3), np.float32)
  assert float(losses.masked_mean(values, np.zeros((2, 3), bool))) == 0.0


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_sinkhorn_is_jittable_and_finite_with_large_scores(shape):
  scores = np.full(shape, 50.0, np.float32)
  q = jax.jit(lambda s: losses.sinkhorn(s, 0.05, 3))(scores)
  assert np.isfinite(np.asarray(q)).all()
