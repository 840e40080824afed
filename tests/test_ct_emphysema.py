"""The CT emphysema protocol (anatjax/evaluate/ct_emphysema.py): its ridge and logistic
regressions against scikit-learn, the dense labels and intensity features against direct
crops, the splits, and the whole command on a tiny patch store with a random encoder."""

import json
import math
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score

from anatjax.data import ct_patches, ct_prepare
from anatjax.evaluate import ct_emphysema
from anatjax.models.cnn3d import DrasCLREncoder
from configs.eval.ct_emphysema import get_config

quiet = lambda *_: None


def regression_data(n, d, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + rng.normal(size=d)
  w = rng.normal(size=d)
  return x, x @ w + 0.5 + rng.normal(scale=0.5, size=n)


@pytest.mark.parametrize("n, d", [(40, 6), (8, 20)])   # also fewer samples than features
def test_ridge_matches_scikit_learn(n, d):
  x, y = regression_data(n, d)
  for alpha in (0.01, 2.5, 300.0):
    ours = ct_emphysema.fit_ridge(x, y, alpha)
    theirs = Ridge(alpha=alpha).fit(x, y)
    np.testing.assert_allclose(ours.w, theirs.coef_, rtol=1e-7, atol=1e-9)
    assert ours.b == pytest.approx(theirs.intercept_, rel=1e-7, abs=1e-9)
    np.testing.assert_allclose(ours(x), theirs.predict(x), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n, d", [(60, 5), (10, 20)])   # (10, 20) is separable
def test_logistic_matches_scikit_learn(n, d):
  # scikit-learn's lbfgs leaves the intercept unpenalised, as fit_logistic does (its
  # liblinear solver would penalise it: not comparable).
  x, y = regression_data(n, d, seed=1)
  labels = (y > np.median(y)).astype(float)
  start = None
  for c in (0.01, 0.3, 10.0):
    ours = ct_emphysema.fit_logistic(x, labels, c)
    theirs = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, labels)
    np.testing.assert_allclose(ours.w, theirs.coef_[0], rtol=1e-4, atol=1e-5)
    assert ours.b == pytest.approx(theirs.intercept_[0], rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(ct_emphysema.sigmoid(ours(x)), theirs.predict_proba(x)[:, 1],
                               atol=1e-6)
    warm = ct_emphysema.fit_logistic(x, labels, c, start=start)   # from the previous C
    np.testing.assert_allclose(warm.w, ours.w, rtol=1e-6, atol=1e-7)
    start = ours
  one_class = ct_emphysema.fit_logistic(x, np.ones(n), 1.0)
  assert np.all(one_class.w == 0) and ct_emphysema.sigmoid(one_class.b) > 0.5


def test_scores_match_scipy_and_scikit_learn():
  rng = np.random.default_rng(2)
  a = rng.normal(size=30)
  b = np.round(a + rng.normal(size=30), 1)   # with ties
  assert ct_emphysema.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], rel=1e-12)
  assert ct_emphysema.r2(a, b) == pytest.approx(r2_score(a, b), rel=1e-12)
  assert math.isnan(ct_emphysema.spearman(a, np.ones(30)))


def test_stratified_folds_and_draws():
  rng = np.random.default_rng(3)
  labels = np.arange(23) % 3 == 0                       # 8 positives, 15 negatives
  folds = ct_emphysema.stratified_folds(labels, 5, rng)
  sizes = np.bincount(folds, minlength=5)
  assert sizes.max() - sizes.min() <= 1
  assert all(labels[folds == f].any() for f in range(5))
  for n in (2, 5, 23):
    drawn = ct_emphysema.stratified_draw(np.arange(23), labels, n, rng)
    assert len(set(drawn)) == n and labels[drawn].any() and not labels[drawn].all()


def test_dense_labels_and_intensity_against_direct_crops():
  rng = np.random.default_rng(4)
  mask = rng.random((14, 12, 16)) < 0.3
  size = 5
  starts = np.array([[0, 0, 0], [3, 4, 5], [-2, 9, 13], [11, -3, -1], [20, 0, 0]])
  pad = 4 * size
  padded = np.pad(mask, pad)                            # outside the volume: not in the mask
  want = [padded[z + pad:z + pad + size, y + pad:y + pad + size, x + pad:x + pad + size].mean()
          for z, y, x in starts]
  np.testing.assert_allclose(ct_emphysema.patch_fractions(mask, starts, size), want,
                             rtol=1e-6)

  hu = rng.integers(-1100, 400, (3, size, size, size)).astype(np.int16)
  lungs = (rng.random(hu.shape) < 0.5).astype(np.uint8)
  lungs[2] = 0
  got = ct_emphysema.intensity_features(hu, lungs)
  for i in range(3):
    np.testing.assert_allclose(got[i, 0], np.clip(hu[i], -1024, 240).mean(), rtol=1e-5)
    lung = hu[i][lungs[i] > 0]
    np.testing.assert_allclose(got[i, 1], (lung < -950).mean() if len(lung) else 0.0)


def numpy_encoder(store: str) -> ct_emphysema.PatchEncoder:
  """A random encoder filled in NumPy (Flax's init of this network compiles slowly on
  CPU): experts as ordinary convolutions U(+-1/sqrt(fan-in)), routers N(0, 1/3),
  BatchNorm the identity."""
  size = ct_patches.read_atlas(store).patch_size
  shapes = jax.eval_shape(DrasCLREncoder(8).init, jax.random.key(0),
                          jnp.zeros((1, 1, size, size, size, 1)), jnp.zeros((1, 3)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel" and len(shape) == 6:
      bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
      return rng.uniform(-bound, bound, shape).astype(np.float32)
    if name == "kernel":
      return rng.normal(0.0, 1.0 / math.sqrt(shape[0]), shape).astype(np.float32)
    return np.full(shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)
  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return ct_emphysema.PatchEncoder(variables, 8, store, {"init": "random", "kind": "random",
                                                         "seed": 0, "num_experts": 8})


def test_protocol_end_to_end_on_a_tiny_store(tmp_path):
  store = ct_prepare.prepare(ct_prepare.Options(
      num_examples=3, synthetic_size=48, spacing_mm=8.0, image_size=8, patch_stride=6,
      min_dice=0.5), str(tmp_path / "store"), say=quiet)
  atlas = ct_patches.read_atlas(store)
  assert atlas.num_locations >= 3
  config = get_config("tiny")
  with pytest.raises(ValueError, match="needs --store"):
    ct_emphysema.load_encoder("random", config)
  with config.unlocked():
    config.cohort.cache_dir = str(tmp_path / "cohort")
  encoder = numpy_encoder(store)
  out = str(tmp_path / "out")
  ct_emphysema.run(config, encoder, out, log=quiet)

  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  cohort = results["cohort"]
  assert cohort["num_subjects"] + len(cohort["dropped"]) == 8
  assert 0 < cohort["with_emphysema"] < cohort["num_subjects"]
  assert 0 < cohort["dense_positive"] < 1
  records = results["records"]
  assert len(records) == 2 * 2 * len(ct_emphysema.TASKS)
  keys = {(r["features"], r["n_labelled"], r["task"], r["metric"]) for r in records}
  assert keys == {(f, n, t, m) for f in ("encoder", "intensity") for n in (3, "all")
                  for t, m in ct_emphysema.TASKS}
  for r in records:
    assert r["init"] == "random" and set(r) >= {"mean", "std", "values"}
    assert math.isfinite(r["mean"]) and math.isfinite(r["std"]), r
  table = open(os.path.join(out, "results.md")).read()
  assert "| encoder | severity (ridge) | r2 |" in table and "| intensity |" in table
  image = cv2.imread(os.path.join(out, results["figures"][0]))
  assert image is not None and image.shape[2] == 3

  # A second run maps nothing: the cohort comes from the cache.
  said = []
  ct_emphysema.run(config, encoder, str(tmp_path / "again"), log=said.append)
  assert not any(s.startswith("Mapping") for s in said)
  again = json.load(open(os.path.join(tmp_path / "again", "results.json")))["records"]
  assert [r["values"] for r in again] == [r["values"] for r in records]
