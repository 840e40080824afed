"""Alice's correspondence provider (b) on phantoms: a known affine recovered, organs of two
patients matched better than by voxel index, and the candidate acceptance rule."""

import numpy as np
import pytest
from scipy import ndimage

from anatjax.data import correspondence, synthetic_ct
from anatjax.data.volume import Volume

SHAPE = (64, 64, 64)   # ~6 mm voxels over the phantom's field of view
ORGANS = ("heart", "liver", "spleen", "kidney_right", "kidney_left")


def warped(volume: Volume, matrix, offset) -> Volume:
  """The volume seen through subject point = matrix @ point + offset (same grid)."""
  spacing, origin = np.asarray(volume.spacing), np.asarray(volume.origin)
  inverse = np.linalg.inv(matrix)
  # output index o -> point -> source point inverse (point - offset) -> source index
  index_matrix = np.diag(1 / spacing) @ inverse @ np.diag(spacing)
  index_offset = (inverse @ (origin - offset) - origin) / spacing
  array = ndimage.affine_transform(volume.array.astype(np.float32), index_matrix,
                                   index_offset, order=1, cval=-1000)
  return volume.with_array(np.rint(array).astype(np.int16))


@pytest.fixture(scope="module")
def phantoms():
  return [synthetic_ct.subject(3, i, shape=SHAPE) for i in range(2)]


def centroids(ct):
  return np.array([np.mean(np.nonzero(ct.labels.array == synthetic_ct.LABEL_NAMES.index(o)),
                           axis=1) for o in ORGANS])


def test_known_affine_is_recovered(phantoms):
  a = phantoms[0].image
  angle = np.deg2rad(5)
  matrix = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                     [0, np.sin(angle), np.cos(angle)]]) @ np.diag([1.05, 0.95, 1.0])
  offset = np.array([12.0, -9.0, 6.0]) + (np.eye(3) - matrix) @ a.index_to_point(
      (np.asarray(SHAPE) - 1) / 2)        # about the centre, so B stays in view
  b = warped(a, matrix, offset)
  provider = correspondence.AffineProvider(a, spacing_mm=6.0)
  cache_a, cache_b = provider.prepare(a), provider.prepare(b)
  points = correspondence.candidate_points(a, np.random.default_rng(0), 64)
  q, scores = provider.match_many(cache_a, points, cache_b)
  want = b.point_to_index(a.index_to_point(points) @ matrix.T + offset)
  error_mm = np.linalg.norm((q - want) * np.asarray(a.spacing), axis=1)
  assert np.median(error_mm) < 6.0 and np.percentile(error_mm, 90) < 12.0
  assert scores.mean() > 0.9


def test_two_patients_organs_match_better_than_by_index(phantoms):
  a, b = phantoms
  provider = correspondence.AffineProvider(a.image, spacing_mm=6.0, score_mode="ncc")
  cache_a, cache_b = provider.prepare(a.image), provider.prepare(b.image)
  q, scores = provider.match_many(cache_a, np.rint(centroids(a)).astype(int), cache_b)
  spacing = np.asarray(a.image.spacing)
  matched = np.linalg.norm((q - centroids(b)) * spacing, axis=1)
  by_index = np.linalg.norm((centroids(a) - centroids(b)) * spacing, axis=1)
  assert matched.mean() < 0.6 * by_index.mean()
  assert np.all((-1 <= scores) & (scores <= 1))
  p = np.array([30, 30, 30])
  assert correspondence.ncc(a.image.array, p, a.image.array, p) == pytest.approx(1.0)


class ScriptedProvider:
  """Scores given in advance, one per candidate, in order."""

  def __init__(self, scores):
    self.scores, self.asked = list(scores), 0

  def match_many(self, a, points, b):
    del a, b
    got = np.asarray(self.scores[self.asked:self.asked + len(points)], np.float32)
    self.asked += len(points)
    return points + 1, got


def test_acceptance_rule(phantoms):
  cache = correspondence.AffineCache(phantoms[0].image, None, None)
  rng = np.random.default_rng(0)
  provider = ScriptedProvider([0.1] * 20 + [0.9] + [0.95] * 100)
  p, q, score, accepted = correspondence.find_pair(provider, cache, cache, rng)
  assert accepted and score == pytest.approx(0.9) and provider.asked == 32
  np.testing.assert_array_equal(q, p + 1)
  weak = ScriptedProvider(list(np.linspace(0.0, 0.6, 100)) + [1.0] * 50)
  _, _, score, accepted = correspondence.find_pair(weak, cache, cache, rng)
  assert not accepted and weak.asked == 100 and score == pytest.approx(0.6)


def test_mined_pair_crops_masks_and_points(phantoms):
  from anatjax.data import alice_pairs   # pylint: disable=g-import-not-at-top
  a, b = phantoms
  provider = correspondence.AffineProvider(a.image, spacing_mm=6.0)
  cache_a, cache_b = provider.prepare(a.image), provider.prepare(b.image)
  pair = alice_pairs.mine_pair(provider, cache_a, cache_b, np.random.default_rng(1),
                               crop=16)
  assert pair["crops"].shape == (2, 16, 16, 16) and pair["crops"].dtype == np.int16
  p, q = pair["points"]
  np.testing.assert_array_equal(pair["crops"][0], np.clip(
      a.image.array[p[0] - 8:p[0] + 8, p[1] - 8:p[1] + 8, p[2] - 8:p[2] + 8], -125, 225))
  assert cache_b.body[tuple(q)] and pair["pair_score"] == 1.0 and not pair["weak"]
  assert pair["mask_cells"].shape == (2, 4, 4) and pair["mask_cells"].sum() == 2 * 12
  voxels = alice_pairs.expand_mask(pair["mask_cells"][0], 16)
  assert voxels.shape == (16, 16, 16) and voxels.mean() == 0.75
  assert (voxels == voxels[:1]).all()              # columns run through every z
  np.testing.assert_array_equal(voxels[0, ::4, ::4], pair["mask_cells"][0])
  blocks = alice_pairs.student_mask(np.random.default_rng(0), "blocks3d")
  assert blocks.shape == (4, 4, 4) and blocks.sum() == 48
  unit = alice_pairs.to_unit(pair["crops"])
  assert unit.min() >= 0 and unit.max() <= 1
