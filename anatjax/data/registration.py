"""Affine registration of a subject's lungs to the atlas with SimpleITK (drasclr.md 2.2
step 3), its quality check, and the atlas-to-subject point map.

Both images are lung label maps (background 0, right lung 50, left lung 100, float32):
matching labels rather than HU makes the fit depend on lung shape only. The settings
approximate the reference's ANTs affine stage: Mattes mutual information (32 bins,
regular 50 % sampling, fixed seed), regular-step gradient descent (lr 1.0, minimum step
1e-4, 500 iterations per level, relaxation 0.5, scales from physical shift), shrink
4, 2, 1 with smoothing 2, 1, 0 voxels, linear interpolation, started from a moments
(centre of mass and principal axes) initialisation. The result maps atlas physical points
to subject physical points (ITK's fixed -> moving convention).

`PointMap` holds that affine in the array order (z, y, x): the one conversion from ITK's
(x, y, z) happens in `PointMap.from_sitk`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anatjax.data.volume import Volume, array_point, sitk_point, to_sitk

SAMPLING_SEED = 0


@dataclasses.dataclass(frozen=True)
class PointMap:
  """subject point = matrix @ atlas point + offset, points (z, y, x) in mm."""
  matrix: np.ndarray
  offset: np.ndarray

  @classmethod
  def from_sitk(cls, transform) -> "PointMap":
    import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
    affine = sitk.AffineTransform(transform)
    a = np.asarray(affine.GetMatrix()).reshape(3, 3)
    centre, shift = np.asarray(affine.GetCenter()), np.asarray(affine.GetTranslation())
    offset_xyz = centre + shift - a @ centre
    flip = np.eye(3)[::-1]   # (x, y, z) <-> (z, y, x)
    return cls(flip @ a @ flip, array_point(offset_xyz))

  def __call__(self, points):
    return np.asarray(points, np.float64) @ self.matrix.T + self.offset

  def inverse(self) -> "PointMap":
    inv = np.linalg.inv(self.matrix)
    return PointMap(inv, -inv @ self.offset)

  def to_sitk(self):
    import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
    flip = np.eye(3)[::-1]
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple((flip @ self.matrix @ flip).ravel()))
    transform.SetTranslation(tuple(sitk_point(self.offset)))
    return transform

  def save(self, path: str) -> None:
    np.savez(path, matrix=self.matrix, offset=self.offset)

  @classmethod
  def load(cls, path: str) -> "PointMap":
    with np.load(path) as f:
      return cls(f["matrix"], f["offset"])


def register(atlas: Volume, subject: Volume, iterations: int = 500,
             sampling_fraction: float = 0.5, sampling: str = "regular",
             init_atlas: Volume | None = None, init_subject: Volume | None = None) -> PointMap:
  """The affine atlas -> subject point map fitted on two images (DrasCLR: lung label
  maps, the module doc's settings; Alice: clipped CTs with 20 % random sampling and 300
  iterations). The moments initialisation uses `init_atlas` / `init_subject` (e.g. body
  masks) when given, else the images themselves."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  def image(volume):
    return to_sitk(volume.with_array(volume.array.astype(np.float32)))

  fixed, moving = image(atlas), image(subject)
  initial = sitk.CenteredTransformInitializer(
      image(init_atlas) if init_atlas is not None else fixed,
      image(init_subject) if init_subject is not None else moving,
      sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
  method = sitk.ImageRegistrationMethod()
  method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
  strategies = {"regular": method.REGULAR, "random": method.RANDOM}
  if sampling not in strategies:
    raise ValueError(f"sampling={sampling!r}: use 'regular' or 'random'")
  method.SetMetricSamplingStrategy(strategies[sampling])
  method.SetMetricSamplingPercentage(sampling_fraction, SAMPLING_SEED)
  method.SetOptimizerAsRegularStepGradientDescent(
      learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.5)
  method.SetOptimizerScalesFromPhysicalShift()
  method.SetShrinkFactorsPerLevel([4, 2, 1])
  method.SetSmoothingSigmasPerLevel([2, 1, 0])
  method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
  method.SetInterpolator(sitk.sitkLinear)
  method.SetInitialTransform(initial, inPlace=False)
  result = method.Execute(fixed, moving)
  if isinstance(result, sitk.CompositeTransform):
    result = result.GetNthTransform(result.GetNumberOfTransforms() - 1)
  return PointMap.from_sitk(result)


def warp_to_atlas(subject_labels: Volume, atlas_labels: Volume, point_map: PointMap):
  """The subject's label map resampled on the atlas grid through the map (nearest)."""
  atlas_points = atlas_labels.index_to_point(
      np.stack(np.indices(atlas_labels.shape), -1).reshape(-1, 3))
  index = np.rint(subject_labels.point_to_index(point_map(atlas_points))).astype(int)
  inside = np.all((index >= 0) & (index < np.asarray(subject_labels.shape)), axis=1)
  values = np.zeros(len(index), subject_labels.array.dtype)
  values[inside] = subject_labels.array[tuple(index[inside].T)]
  return values.reshape(atlas_labels.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a > 0, b > 0
  total = np.count_nonzero(a) + np.count_nonzero(b)
  return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def crop_patch(image: Volume, start, size: int, fill: float = -1024) -> np.ndarray:
  """image[start : start + size] per axis, `fill` outside the volume."""
  start = np.asarray(start, int)
  out = np.full((size,) * 3, fill, image.array.dtype)
  src_lo = np.maximum(start, 0)
  src_hi = np.minimum(start + size, image.shape)
  if np.all(src_hi > src_lo):
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(l, h) for l, h in zip(dst_lo, dst_hi))] = image.array[
        tuple(slice(l, h) for l, h in zip(src_lo, src_hi))]
  return out


def patch_starts(atlas: Volume, subject: Volume, corners, size: int,
                 point_map: PointMap, map_point: str = "centre") -> np.ndarray:
  """Subject voxel index where each atlas cube's patch starts (spec 2.2 step 4): the
  cube's centre C + (size - 1) / 2 (or, for reference parity, its corner) mapped atlas
  index -> atlas point -> subject point -> subject index, then the start rounded."""
  if map_point not in ("centre", "corner"):
    raise ValueError(f"config data.map_point={map_point!r}: use 'centre' or 'corner'")
  half = (size - 1) / 2.0 if map_point == "centre" else 0.0
  subject_index = subject.point_to_index(point_map(atlas.index_to_point(
      np.asarray(corners, np.float64) + half)))
  return np.rint(subject_index - half).astype(int)
