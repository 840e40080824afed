"""The dense anatomical embedding (provider (a), alice.md 2.4): crop-pair geometry against
position-encoding volumes, the two InfoNCE terms and the hard-negative choice against
NumPy, the provider's matching on hand-built fields, and a tiny run through the shared
trainer whose checkpoint becomes a provider."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import interpolate

from anatjax import config as config_lib, losses
from anatjax.data import correspondence, ct_volumes, embedding_pairs
from anatjax.data.volume import Volume
from anatjax.methods import anatomy_embedding as method_lib

# ---------------------------------------------------------------- crop pairs

SHAPE = (40, 36, 44)
CROP, FINE, COARSE, POSITIVES = 16, 2, 8, 60


def ramps():
  """Three volumes whose value is 8 x the voxel's z, y or x index: a crop of ramp k shows,
  at each of its voxels, where in the volume it was sampled along axis k."""
  index = np.indices(SHAPE)
  return [(8 * index[k]).astype(np.int16) for k in range(3)]


def cell_means(crop, cells, stride):
  """Mean of `crop` [S, S, S] over each cell [P, 3] of `stride`."""
  return np.array([crop[tuple(slice(c * stride, (c + 1) * stride) for c in cell)].mean()
                   for cell in cells])


def test_positives_are_the_same_physical_point_in_both_crops():
  body = np.ones(SHAPE, bool)
  for seed in range(4):
    pairs = [embedding_pairs.crop_pair(r, body, np.random.default_rng(seed), CROP, FINE,
                                       COARSE, POSITIVES) for r in ramps()]
    for key in ("fine", "coarse", "offset", "scale", "jitter"):   # one geometry per seed
      for other in pairs[1:]:
        np.testing.assert_array_equal(other[key], pairs[0][key])
    pair = pairs[0]
    scale, offset = pair["scale"].astype(np.float64), pair["offset"].astype(np.float64)
    assert np.all((0.8 <= scale) & (scale <= 1.2))
    assert pair["fine"].shape == (2, POSITIVES, 3) and pair["crops"].dtype == np.int16
    for k, p in enumerate(pairs):
      crops = p["crops"] / 8.0                      # volume coordinate along axis k
      # each crop samples the volume at offset + scale * i (inside the volume)
      i = np.arange(CROP)
      for c in range(2):
        want = offset[c, k] + scale[c, k] * i
        got = np.moveaxis(crops[c], k, 0)[:, CROP // 2, CROP // 2]
        inside = (want >= 0) & (want <= SHAPE[k] - 1)
        np.testing.assert_allclose(got[inside], want[inside], atol=0.07)
      # A positive's cell in crop 1 and its cell in crop 2 both hold the same point:
      # their centres (the cells' mean coordinate, the ramps being linear) lie within half
      # a cell of it, so at most (s1 + s2) / 2 cells apart along every axis.
      for name, stride in (("fine", FINE), ("coarse", COARSE)):
        centres = [cell_means(crops[c], p[name][c], stride) for c in range(2)]
        gap = np.abs(centres[0] - centres[1])
        bound = stride * scale[:, k].sum() / 2 + 0.1
        assert np.all(gap <= bound), (name, k, gap.max(), bound)
        if name == "fine" and k == 0:               # a wrong pairing would not pass
          shuffled = np.abs(centres[0] - np.roll(centres[1], 7))
          assert np.mean(shuffled > bound) > 0.3


def test_positives_prefer_the_body_and_jitter_maps_to_unit():
  z = ramps()[0]
  body = np.zeros(SHAPE, bool)
  body[:, :, :22] = True                            # half of the volume along x
  x_ramp = ramps()[2]
  pair = embedding_pairs.crop_pair(x_ramp, body, np.random.default_rng(1), CROP, FINE,
                                   COARSE, POSITIVES)
  # The crops' overlap along x (from their geometry) is mostly outside the body ...
  low, high = np.max(pair["offset"][:, 2]), np.min(pair["offset"][:, 2] +
                                                    pair["scale"][:, 2] * (CROP - 1))
  assert 0.2 < (21.5 - low) / (high - low) < 0.5
  # ... yet every positive is inside: its cell centre at most half a cell past x = 21.5.
  x_centre = cell_means(pair["crops"][0] / 8.0, pair["fine"][0], FINE)
  assert np.all(x_centre < 21.5 + FINE * pair["scale"][0, 2] / 2 + 0.1)
  unit = embedding_pairs.to_unit(z[None, :2, :2, :2], np.array([[1.0, 0.0]], np.float32))
  np.testing.assert_allclose(unit, (z[None, :2, :2, :2] + 1024) / 4095.0, rtol=1e-6)
  with pytest.raises(ValueError, match="max_shift"):
    embedding_pairs.EmbeddingCrops(CROP, FINE, COARSE, max_shift=0.9)
  with pytest.raises(ValueError, match="multiple of model.fine_stride=3"):
    embedding_pairs.EmbeddingCrops(CROP, 3, COARSE)


# ---------------------------------------------------------------- the losses

def unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_fine_info_nce_and_hard_negatives_match_numpy():
  rng = np.random.default_rng(0)
  grid, dim, count, tau, radius, hard, random = 6, 8, 12, 0.5, 1.5, 7, 5
  cells = method_lib.cell_coordinates(grid)
  query, keys = unit_rows(rng, count, dim), unit_rows(rng, grid ** 3, dim)
  positive = rng.choice(grid ** 3, count).astype(np.int32)
  loss, logits = losses.fine_info_nce(jnp.asarray(query), jnp.asarray(keys),
                                      jnp.asarray(positive), jnp.asarray(cells),
                                      jax.random.key(0), tau, radius, hard, random)
  negatives = np.asarray(losses.fine_negatives(
      jnp.asarray(query @ keys.T), jnp.asarray(cells[positive]), jnp.asarray(cells),
      jax.random.key(0), radius, hard, random))
  similarity = query.astype(np.float64) @ keys.T
  want_logits, want_loss = [], []
  for p in range(count):
    far = np.flatnonzero(np.linalg.norm(cells - cells[positive[p]], axis=1) > radius)
    top = far[np.argsort(-similarity[p, far])[:hard]]
    assert set(negatives[p, :hard]) == set(top)
    drawn = negatives[p, hard:]
    assert len(set(drawn)) == random and set(drawn) <= set(far)
    row = similarity[p, np.concatenate([[positive[p]], negatives[p]])] / tau
    want_logits.append(row)
    want_loss.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[0])
  np.testing.assert_allclose(np.asarray(logits), np.array(want_logits), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(want_loss), rtol=1e-5)
  assert method_lib.excluded_cells(3.0) == 123 and method_lib.excluded_cells(1.5) == 19


def test_coarse_info_nce_and_top1_match_numpy():
  rng = np.random.default_rng(1)
  query, keys = unit_rows(rng, 10, 6), unit_rows(rng, 27, 6)
  positive = rng.choice(27, 10).astype(np.int32)
  positive[0] = np.argmax(keys @ query[0])          # at least one right answer
  loss, logits = losses.coarse_info_nce(jnp.asarray(query), jnp.asarray(keys),
                                        jnp.asarray(positive), 0.5)
  z = query.astype(np.float64) @ keys.T / 0.5
  log_probs = z - z.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  np.testing.assert_allclose(float(loss), -np.mean(log_probs[np.arange(10), positive]),
                             rtol=1e-5)
  accuracy = np.mean(np.argmax(z, axis=1) == positive)
  assert accuracy > 0
  np.testing.assert_allclose(float(losses.top1(logits, jnp.asarray(positive))), accuracy)


# ---------------------------------------------------------------- the provider

def hand_built_cache(fine, coarse, shape, spacing=(4.0, 4.0, 4.0)):
  provider = correspondence.EmbeddingProvider(lambda hu: (fine, coarse), spacing, 2, 4)
  return provider, provider.prepare(Volume(np.zeros(shape, np.int16), spacing))


def one_hot_field(grid, shift):
  """[grid^3, ..., grid^3] one-hot vectors: the cell at u holds e_(u - shift) (wrapped)."""
  index = np.indices((grid,) * 3).transpose(1, 2, 3, 0)
  flat = method_lib.flat_index(np.mod(index - shift, grid), grid)
  return np.eye(grid ** 3, dtype=np.float32)[flat]


def test_provider_finds_the_shifted_cell_and_scores_by_the_spec():
  grid, shift = 6, np.array([1, 2, 0])
  constant = np.zeros((3, 3, 3, 4), np.float32)
  constant[..., 0] = 1
  provider, a = hand_built_cache(one_hot_field(grid, 0), constant, (12, 12, 12))
  _, b = hand_built_cache(one_hot_field(grid, shift), constant, (12, 12, 12))
  np.testing.assert_allclose(b.coarse_norm, 1.0, rtol=1e-3)
  assert a.fine.dtype == np.float16 and a.coarse.dtype == np.float16
  points = np.array([[0, 0, 0], [3, 5, 2], [7, 1, 9], [5, 4, 6]])
  q, scores = provider.match_many(a, points, b)
  cells = points // 2 + shift                        # p's fine cell, moved by the shift
  np.testing.assert_array_equal(q, cells * 2 + 1)    # the centre voxel of that cell
  np.testing.assert_allclose(scores, 1.0, atol=1e-3)

  # Two equally good fine cells: the coarse field decides, with the spec's score.
  fine_b = one_hot_field(grid, 0)
  fine_b[4, 4, 4] = fine_b[0, 0, 0]                  # p = voxel 0's cell appears twice
  coarse = np.zeros((3, 3, 3, 4), np.float32)
  coarse[..., 1] = 1
  coarse[2, 2, 2] = [0.6, 0.8, 0, 0]                 # only B's far corner resembles g
  coarse_a = np.zeros_like(coarse)
  coarse_a[..., 0] = 1
  _, a = hand_built_cache(one_hot_field(grid, 0), coarse_a, (12, 12, 12))
  _, b = hand_built_cache(fine_b, coarse, (12, 12, 12))
  q, score = provider.match(a, [0, 0, 0], b)
  np.testing.assert_array_equal(q, [9, 9, 9])         # the centre of cell (4, 4, 4)
  centres = np.arange(3) * 4 + 1.5                   # coarse cell centres, in voxels
  up = interpolate.RegularGridInterpolator((centres,) * 3, coarse)
  g_hat = up(np.full((1, 3), 4 * 2 + 0.5))[0]       # trilinear between coarse cells 1, 2
  want = 0.5 * (1.0 + g_hat[0] / np.linalg.norm(g_hat))
  assert score == pytest.approx(want, abs=2e-3) and score < 1.0


def test_provider_prepares_on_the_model_grid_and_answers_in_the_volume_grid():
  seen = []

  def fields(hu):
    seen.append(hu.shape)
    cells = lambda s: tuple(-(-np.asarray(hu.shape) // s))
    fine = np.zeros(cells(2) + (3,), np.float32)
    fine[..., 0] = 1
    coarse = np.zeros(cells(4) + (2,), np.float32)
    coarse[..., 1] = 1
    return fine, coarse

  provider = correspondence.EmbeddingProvider(fields, 4.0, 2, 4)
  image = Volume(np.zeros((30, 20, 26), np.int16), (2.0, 2.0, 2.0), (5.0, -3.0, 1.0))
  cache = provider.prepare(image)
  assert seen == [(15, 10, 13)] and cache.fine.shape == (8, 5, 7, 3)
  assert cache.image is image and cache.spacing == (4.0, 4.0, 4.0)
  q, scores = provider.match_many(cache, [[29, 19, 25], [0, 0, 0]], cache)
  assert np.all((q >= 0) & (q < np.asarray(image.shape))) and np.allclose(scores, 1.0)
  np.testing.assert_array_equal(q[0], [1, 1, 1])     # first cell's centre: model voxel
                                                     # 0.5 -> volume voxel 1 (ties: argmax 0)


# ---------------------------------------------------------------- training

def tiny_config(root):
  """runlocal shrunk: 2 phantoms at 8 mm, 16^3 crops, a two-stage network, 20 positives."""
  from configs import anatomy_embedding   # pylint: disable=g-import-not-at-top
  c = anatomy_embedding.get_config("runlocal")
  with c.unlocked():
    c.data.root = str(root)
    c.data.num_examples = 2
    c.data.synthetic_size = 40
    c.data.spacing_mm = (8.0, 8.0, 8.0)
    c.data.registration_iterations = 5
    c.data.num_workers = 0
    c.data.image_size = 16
    c.batch_size = 2
    c.duration = "6st"
    c.log_every = 1
    c.checkpoint.every = "6st"
    c.mesh.data = 1
    c.model.update(widths=(8, 16), blocks=(1, 1), stem_stride=2, fpn_width=8,
                   fine_stride=2, coarse_stride=4, fine_dim=8, coarse_dim=8)
    c.embedding.update(num_positives=20, hard_negatives=10, random_negatives=10)
    c.optim.lr = 1e-3
  return c


def test_bad_config_values_fail_clearly(tmp_path):
  schedule = config_lib.Schedule(2, 1, 6)
  for key, value, message in (
      ("embedding.hard_negatives", 500, r"hard_negatives=500.*use 1\.\.389"),
      ("model.coarse_stride", 16, "coarse_stride=16 is not the stride of a stage"),
      ("model.fine_stride", 4, "fine_stride=4 must be smaller"),
      ("data.image_size", 18, "image_size=18.*multiple of model.coarse_stride=4"),
      ("embedding.temperature", 0.0, "temperature=0.0 must be positive"),
      ("model.blocks", (1, 1, 1), "one entry per stage")):
    config = tiny_config(tmp_path)
    section, name = key.split(".")
    with config.unlocked():
      config[section][name] = value
    with pytest.raises(ValueError, match=message):
      method_lib.make(config, schedule)


def test_a_few_steps_through_the_trainer_then_the_run_as_a_provider(tmp_path):
  from anatjax import train   # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / "store")
  result = train.train(config, str(tmp_path / "run"))
  assert result["step"] == 6
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  for key in ("loss", "loss_fine", "loss_coarse", "fine_top1", "coarse_top1", "lr"):
    values = [r[key] for r in records if key in r]
    assert len(values) == 6 and np.all(np.isfinite(values)), key
  provider, step = method_lib.load_provider(str(tmp_path / "run"))
  assert step == 6
  source = ct_volumes.VolumePairs(str(tmp_path / "store"))
  a, b = source.cache(0), source.cache(1)
  cache_a, cache_b = provider.prepare(a.image), provider.prepare(b.image)
  cells = -(-np.asarray(a.image.shape) // 2)
  assert cache_a.fine.shape == (*cells, 8)
  np.testing.assert_allclose(np.linalg.norm(cache_a.fine.astype(np.float32), axis=-1), 1,
                             atol=2e-3)
  p, q, score, _ = correspondence.find_pair(provider, cache_a, cache_b,
                                            np.random.default_rng(0), max_candidates=16)
  assert np.all((q >= 0) & (q < np.asarray(b.image.shape))) and -1 <= score <= 1
  _, s_self = provider.match(cache_a, p, cache_a)   # a volume matched to itself
  assert s_self == pytest.approx(provider.similarity(cache_a, [p], cache_a).max(), abs=1e-6)
  # the accuracy command with this provider (phantoms at the run's 8 mm)
  from anatjax.evaluate import correspondence as evaluation  # pylint: disable=g-import-not-at-top
  evaluation.main([f"--out={tmp_path / 'eval'}", "--provider=embedding",
                   f"--run={tmp_path / 'run'}", "--num_pairs=1", "--synthetic_size=48",
                   "--spacing_mm=8", "--mined_per_pair=2"])
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["setup"]["provider"] == "embedding" and results["mining"]["pairs"] == 2
  assert set(results["organs"]) == set(evaluation.ORGANS)
  with pytest.raises(SystemExit):   # --run belongs to --provider=embedding
    evaluation.main([f"--out={tmp_path / 'eval'}", f"--run={tmp_path / 'run'}"])
  from anatjax import export  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="anatomy_embedding run.*provider"):
    export.export_run(str(tmp_path / "run"), str(tmp_path / "net.safetensors"))
