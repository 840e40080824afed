"""The atlas patch grid, neighbours, locations, lung masks, registration and patch mapping
(anatjax/data/atlas.py, registration.py) against direct computations."""

import numpy as np
import pytest

from anatjax.data import atlas as atlas_lib, registration
from anatjax.data.volume import Volume


def ellipsoid_lungs(shape, spacing, matrix=np.eye(3), offset=np.zeros(3)) -> Volume:
  """Two ellipsoidal lungs (right at low x) of an atlas frame, seen through the map
  subject point = matrix @ atlas point + offset."""
  volume = Volume(np.zeros(shape, np.uint8), spacing)
  points = volume.index_to_point(np.stack(np.indices(shape), -1).reshape(-1, 3))
  atlas_points = (points - offset) @ np.linalg.inv(matrix).T
  labels = np.zeros(len(points), np.uint8)
  for centre_x, value in ((120, atlas_lib.RIGHT_LUNG), (240, atlas_lib.LEFT_LUNG)):
    inside = np.sum(((atlas_points - [140, 130, centre_x]) / [90, 60, 45]) ** 2, 1) <= 1
    labels[inside] = value
  return volume.with_array(labels.reshape(shape))


def test_patch_grid_threshold_search_against_brute_force():
  rng = np.random.default_rng(0)
  mask = np.zeros((40, 36, 44), bool)
  mask[5:35, 4:30, 6:40] = rng.random((30, 26, 34)) < 0.7
  corners, threshold = atlas_lib.patch_grid(mask, size=8, stride=6, max_patches=60)
  every = np.stack(np.meshgrid(*[np.arange(0, n - 8 + 1, 6) for n in mask.shape],
                               indexing="ij"), -1).reshape(-1, 3)
  fractions = np.array([mask[z:z + 8, y:y + 8, x:x + 8].mean() for z, y, x in every])
  t = 0.1
  while np.sum(fractions > t + 1e-9) >= 60:
    t = round(t + 0.1, 10)
  assert threshold == pytest.approx(t) and t > 0.1
  np.testing.assert_array_equal(corners, every[fractions > t + 1e-9])
  np.testing.assert_allclose(atlas_lib.cube_fractions(mask, every, 8), fractions)


def test_locations_and_neighbours():
  corners = np.array([[0, 0, 0], [0, 0, 26], [0, 26, 0], [26, 0, 0], [52, 52, 52]])
  np.testing.assert_allclose(atlas_lib.normalised_locations(corners)[1], [-1, -1, 0])
  np.testing.assert_allclose(atlas_lib.normalised_locations(corners, "minmax")[4], [1, 1, 1])
  neighbours = atlas_lib.nearest_neighbours(corners)
  # location 0 has three neighbours at 26: the lower indices 1 and 2 win
  assert neighbours[0].tolist() == [1, 2]
  assert neighbours[1].tolist() == [0, 2]     # 26 from 0; 2 and 3 tie at 36.8: lower wins
  assert atlas_lib.choose_atlas([3000, 5000, 4100, 3900, 6000]) == 2


def test_lung_mask_finds_both_lungs_and_sides():
  body = ellipsoid_lungs((48, 40, 64), (6.0, 6.0, 6.0))
  hu = np.where(body.array > 0, -850, 40).astype(np.int16)
  hu[:, :3] = -1000                           # air outside the body touches the border
  mask = atlas_lib.lung_mask(body.with_array(hu))
  np.testing.assert_array_equal(mask.array, body.array)
  # joined lungs (a wide airway) are split at the sagittal plane through the centroid
  hu[20:26, 18:22, 20:44] = -1000
  joined = atlas_lib.lung_mask(body.with_array(hu)).array
  assert set(np.unique(joined)) == {0, atlas_lib.RIGHT_LUNG, atlas_lib.LEFT_LUNG}
  assert np.nonzero(joined == atlas_lib.RIGHT_LUNG)[2].max() < np.nonzero(
      joined == atlas_lib.LEFT_LUNG)[2].min()


def test_registration_recovers_a_known_affine():
  spacing = (4.0, 4.0, 4.0)
  atlas = ellipsoid_lungs((72, 64, 90), spacing)
  angle = np.deg2rad(6)
  rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                       [0, np.sin(angle), np.cos(angle)]])
  matrix, offset = rotation @ np.diag([1.08, 0.95, 1.05]), np.array([10.0, -8.0, 12.0])
  subject = ellipsoid_lungs((72, 64, 90), spacing, matrix, offset)
  point_map = registration.register(atlas, subject)
  points = atlas.index_to_point(np.array([[30, 30, 30], [40, 20, 60], [20, 40, 50]]))
  error = np.linalg.norm(point_map(points) - (points @ matrix.T + offset), axis=1)
  assert error.max() < 2.0                    # mm, at 4 mm voxels
  warped = registration.warp_to_atlas(subject, atlas, point_map)
  assert registration.dice(warped, atlas.array) > 0.95
  # the map survives the trip through SimpleITK's (x, y, z) order and back
  again = registration.PointMap.from_sitk(point_map.to_sitk())
  np.testing.assert_allclose(again(points), point_map(points), atol=1e-6)
  np.testing.assert_allclose(point_map.inverse()(point_map(points)), points, atol=1e-6)


def test_patch_starts_map_centres_and_crops_fill_outside():
  atlas = Volume(np.zeros((20, 20, 20), np.int16), (2.0, 2.0, 2.0))
  subject = Volume(np.arange(30 ** 3, dtype=np.int16).reshape(30, 30, 30), (1.0, 1.0, 1.0),
                   origin=(5.0, 0.0, 0.0))
  shift = registration.PointMap(np.eye(3) * 2.0, np.array([1.0, 0.0, 0.0]))
  corners = np.array([[2, 3, 4]])
  # centre index (5.5, 6.5, 7.5) -> atlas point x2 -> subject point x2 + (1, 0, 0) ->
  # subject index (18, 26, 30) (z origin 5) -> start minus 3.5, rounded
  starts = registration.patch_starts(atlas, subject, corners, 8, shift)
  np.testing.assert_array_equal(starts, np.rint([[14.5, 22.5, 26.5]]))
  corner_starts = registration.patch_starts(atlas, subject, corners, 8, shift, "corner")
  np.testing.assert_array_equal(corner_starts, [[4, 12, 16]])
  patch = registration.crop_patch(subject, [-2, 26, 0], 8, fill=-1024)
  assert (patch[:2] == -1024).all() and (patch[:, 4:] == -1024).all()
  np.testing.assert_array_equal(patch[2:, :4], subject.array[:6, 26:30, :8])
