"""The NumPy t-SNE against scikit-learn's measure of neighbourhood preservation."""

import numpy as np
from sklearn.manifold import trustworthiness

from anatjax.evaluate import embedding


def test_tsne_keeps_neighbourhoods_and_separates_clusters():
  rng = np.random.default_rng(0)
  centres = rng.normal(scale=6.0, size=(4, 20))
  labels = np.repeat(np.arange(4), 60)
  x = centres[labels] + rng.normal(size=(240, 20))
  y = embedding.tsne(x, perplexity=20, iterations=400)
  assert y.shape == (240, 2) and np.isfinite(y).all()
  assert trustworthiness(x, y, n_neighbors=10) > 0.9
  # every point's nearest embedded neighbour belongs to its own cluster
  d = np.sum((y[:, None] - y[None]) ** 2, axis=-1)
  np.fill_diagonal(d, np.inf)
  assert np.mean(labels[np.argmin(d, axis=1)] == labels) > 0.97
  np.testing.assert_array_equal(y, embedding.tsne(x, perplexity=20, iterations=400))
