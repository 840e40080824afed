"""LD's losses (shared/methods/ld.md section 3) and the view-2 orientation undo, each against
a direct float64 NumPy implementation written from the spec's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatjax import dihedral, losses


def _unit_rows(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _numpy_isc(z, tau):
  """Spec 3.2, one anchor at a time."""
  z = z.astype(np.float64)
  rows = len(z)
  total = 0.0
  for i in range(rows):
    e = np.exp(z @ z[i] / tau)
    e[i] = 0.0
    p = e / (e.sum() + 1e-10)
    pos = (i + rows // 2) % rows
    total += np.log(p[pos]) + sum(np.log(1 - p[j]) for j in range(rows) if j not in (i, pos))
  return -total / rows


def _numpy_unit(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_invariant_spreading_matches_numpy(tau):
  z = _unit_rows(np.random.default_rng(0), 12, 5)
  got = jax.jit(losses.invariant_spreading, static_argnums=1)(z, tau)
  np.testing.assert_allclose(float(got), _numpy_isc(z, tau), rtol=1e-5)


def test_invariant_spreading_gradient_reaches_each_anchor_only_through_its_own_row():
  z = _unit_rows(np.random.default_rng(1), 8, 4)
  # d term_i / d z_j: [rows, rows, D]. The keys sit under stop-gradient, so only j == i.
  jacobian = np.asarray(jax.jit(jax.jacrev(losses.invariant_spreading_terms),
                                static_argnums=1)(z, 0.1))
  rows = np.arange(8)
  own = jacobian[rows, rows]
  assert (np.linalg.norm(own, axis=-1) > 1e-3).all()
  others = jacobian.copy()
  others[rows, rows] = 0.0
  assert not others.any()


def test_patch_discrimination_pairs_the_same_cell_of_both_views():
  rng = np.random.default_rng(2)
  view1, view2 = _unit_rows(rng, 2, 3, 3, 4), _unit_rows(rng, 2, 3, 3, 4)
  # Direct: first half (image, row, col) of view 1, second half the same order of view 2.
  cells = [(n, r, c) for n in range(2) for r in range(3) for c in range(3)]
  z = np.array([view1[cell] for cell in cells] + [view2[cell] for cell in cells])
  loss, grads = jax.jit(jax.value_and_grad(losses.patch_discrimination, argnums=(0, 1)),
                        static_argnums=2)(view1, view2, 0.1)
  np.testing.assert_allclose(float(loss), _numpy_isc(z, 0.1), rtol=1e-5)
  assert all(np.abs(np.asarray(g)).max() > 1e-3 for g in grads)  # both views are anchors


def test_hypersphere_mixup_matches_numpy_and_only_the_mix_gets_gradients():
  rng = np.random.default_rng(3)
  mix, first, second = (_unit_rows(rng, 2, 2, 2, 4) for _ in range(3))
  lam = np.array([0.3, 0.7], np.float32)
  target = _numpy_unit(lam[:, None, None, None] * first.astype(np.float64)
                       + (1 - lam[:, None, None, None]) * second)
  z = np.concatenate([mix.reshape(-1, 4), target.reshape(-1, 4)])
  loss, (g_mix, g_first, g_second) = jax.jit(
      jax.value_and_grad(losses.hypersphere_mixup, argnums=(0, 1, 2)), static_argnums=4)(
          mix, first, second, lam, 0.1)
  np.testing.assert_allclose(float(loss), _numpy_isc(z, 0.1), rtol=1e-5)
  assert np.abs(np.asarray(g_mix)).max() > 1e-3
  assert not np.asarray(g_first).any() and not np.asarray(g_second).any()


def test_pool_patch_embeddings_averages_windows_then_normalises():
  v = np.random.default_rng(4).normal(size=(2, 8, 12, 3)).astype(np.float32)
  got = np.asarray(jax.jit(losses.pool_patch_embeddings, static_argnums=1)(v, 4))
  assert got.shape == (2, 4, 4, 3)
  for r in range(4):
    for c in range(4):
      window = v[:, 2 * r:2 * r + 2, 3 * c:3 * c + 3].astype(np.float64).mean(axis=(1, 2))
      np.testing.assert_allclose(got[:, r, c], _numpy_unit(window), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="divisible by 8"):
    losses.pool_patch_embeddings(np.zeros((1, 12, 16, 3)), grid=8)


def _numpy_region_discrimination(v, a, tau):
  """Spec 3.3 with explicit loops over images, regions and pixels."""
  v, a = v.astype(np.float64), a.astype(np.float64)
  n, h, w, _ = v.shape
  k_count = a.shape[-1]
  regions = np.zeros((n, k_count, v.shape[-1]))
  for i in range(n):
    for k in range(k_count):
      for y in range(h):
        for x in range(w):
          regions[i, k] += a[i, y, x, k] * v[i, y, x]
  regions = _numpy_unit(regions / (h * w))
  centres = _numpy_unit(regions.mean(axis=0))
  total = 0.0
  for i in range(n):
    for k in range(k_count):
      logits = centres @ regions[i, k] / tau
      total += logits[k] - np.log(np.exp(logits).sum())
  return -total / (n * k_count)


def _random_assignments(rng, *shape):
  s = rng.uniform(size=shape)
  return (s / s.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_region_discrimination_matches_a_naive_loop():
  rng = np.random.default_rng(5)
  v, a = _unit_rows(rng, 3, 4, 5, 6), _random_assignments(rng, 3, 4, 5, 4)
  got = jax.jit(losses.region_discrimination, static_argnums=2)(v, a, 0.2)
  np.testing.assert_allclose(float(got), _numpy_region_discrimination(v, a, 0.2), rtol=1e-5)


def test_region_discrimination_gradient_includes_the_path_through_the_centres():
  # Finite differences of the NumPy loss see every path, the centres' included; a
  # stop-gradient on the centres would make jax.grad disagree with them.
  rng = np.random.default_rng(6)
  v, a = _unit_rows(rng, 2, 3, 3, 4), _random_assignments(rng, 2, 3, 3, 3)
  grads = jax.jit(jax.grad(losses.region_discrimination, argnums=(0, 1)),
                  static_argnums=2)(v, a, 0.2)
  for which, index in ((0, (1, 2, 0, 3)), (1, (0, 1, 2, 1))):
    plus, minus = [v.astype(np.float64), a.astype(np.float64)], [v, a]
    plus[which] = plus[which].copy()
    minus[which] = plus[which].copy()
    plus[which][index] += 1e-5
    minus[which][index] -= 1e-5
    numeric = (_numpy_region_discrimination(*plus, 0.2)
               - _numpy_region_discrimination(*minus, 0.2)) / 2e-5
    np.testing.assert_allclose(np.asarray(grads[which])[index], numeric, rtol=2e-3,
                               atol=1e-5)


def test_region_discrimination_never_builds_a_pixel_by_region_by_dim_array():
  n, h, w, d, k = 2, 16, 16, 8, 4
  v, a = jnp.ones((n, h, w, d)), jnp.ones((n, h, w, k)) / k
  jaxpr = jax.make_jaxpr(jax.grad(losses.region_discrimination, argnums=(0, 1)))(v, a)
  sizes = [np.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
  assert max(sizes) < n * h * w * k * d


def test_binary_entropy_and_area_prior_match_numpy():
  a = _random_assignments(np.random.default_rng(7), 2, 3, 4, 5)
  a[0, 0, 0] = np.eye(5)[2]  # exact 0s and a 1 stay finite
  a64 = a.astype(np.float64)
  entropy = np.mean(-a64 * np.log2(a64 + 1e-30) - (1 - a64) * np.log2(1 - a64 + 1e-30))
  value, grad = jax.jit(jax.value_and_grad(losses.binary_entropy))(a)
  np.testing.assert_allclose(float(value), entropy, rtol=1e-5)
  assert np.isfinite(np.asarray(grad)).all()
  area = np.mean((a64.mean(axis=(1, 2)) - 1 / 5) ** 2)
  np.testing.assert_allclose(float(jax.jit(losses.area_prior)(a)), area, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# The view-2 orientation (spec 2.2 step 3) and its undo on the patch grid (spec 3.1).

def _numpy_element(x, mirror, turns):
  """The spec's forward operation with NumPy: mirror left-right, then rotate CCW."""
  return np.rot90(np.fliplr(x) if mirror else x, turns)


def _generic_grid(size=5):
  return np.random.default_rng(8).permutation(size * size).reshape(size, size)


def test_orientations_match_numpy_and_undo_inverts_them():
  x = _generic_grid()[..., None]                            # [H, W, C]
  for mirror, turns in dihedral.ELEMENTS:
    moved = dihedral.apply(x, mirror, turns)
    np.testing.assert_array_equal(moved, _numpy_element(x, mirror, turns))
    np.testing.assert_array_equal(dihedral.undo(moved, mirror, turns), x)
    # The spec's recipe for undoing: rotate by -k first, then mirror.
    back = np.rot90(moved, -turns)
    np.testing.assert_array_equal(np.fliplr(back) if mirror else back, x)
    np.testing.assert_array_equal(dihedral.undo(jnp.asarray(moved), mirror, turns), x)


def test_orientation_composition_table_is_the_dihedral_group():
  x = _generic_grid()
  images = [_numpy_element(x, m, k) for m, k in dihedral.ELEMENTS]
  assert len({im.tobytes() for im in images}) == 8

  def index_of(image):
    return next(i for i, im in enumerate(images) if np.array_equal(im, image))

  table = np.array([[index_of(_numpy_element(images[g], *dihedral.ELEMENTS[h]))
                     for h in range(8)] for g in range(8)])
  for g in range(8):
    for h in range(8):
      np.testing.assert_array_equal(
          dihedral.apply(dihedral.apply(x, *dihedral.ELEMENTS[g], axes=(0, 1)),
                         *dihedral.ELEMENTS[h], axes=(0, 1)), images[table[g, h]])
  assert all(sorted(row) == list(range(8)) for row in table)     # a Latin square
  assert (table != table.T).any()                                # not abelian: D4, not Z8
  for g, element in enumerate(dihedral.ELEMENTS):
    assert table[g, dihedral.ELEMENTS.index(dihedral.inverse(*element))] == 0  # identity


def test_undo_batch_per_example_under_jit_and_aligns_pooled_views():
  rng = np.random.default_rng(9)
  images = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
  mirror = np.array([m for m, _ in dihedral.ELEMENTS], np.int8)
  turns = np.array([k for _, k in dihedral.ELEMENTS], np.int8)
  view2 = np.stack([dihedral.apply(im, m, k) for im, m, k in zip(images, mirror, turns)])
  pool = jax.jit(losses.pool_patch_embeddings, static_argnums=1)
  pooled = pool(view2, 4)
  aligned = jax.jit(dihedral.undo_batch)(pooled, mirror, turns)
  # Pooling commutes with the grid symmetries: the aligned grid is that of the original.
  np.testing.assert_allclose(aligned, pool(images, 4), atol=1e-6)
  for n in range(8):
    np.testing.assert_array_equal(aligned[n], dihedral.undo(np.asarray(pooled[n]), mirror[n],
                                                            turns[n]))
  with pytest.raises(ValueError, match="square"):
    dihedral.undo_batch(np.zeros((1, 4, 3, 2)), mirror[:1], turns[:1])
