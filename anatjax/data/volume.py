"""CT volumes in one canonical frame, and the one place geometry changes axis order.

Every 3D source (NIfTI, DICOM series, the synthetic phantom) yields a `Volume`: a
[D, H, W] array in (z, y, x) order whose index axes point along the patient frame's
LPS axes (x to the patient's left, y posterior, z superior; ITK's convention, so the
direction matrix is the identity), with spacing and origin also in (z, y, x) order, in
mm. Readers reorient (axis permutations and flips only) into this frame once; nothing
downstream handles orientation again.

SimpleITK orders indices and points (x, y, z). `to_sitk` / `from_sitk` and
`sitk_point` / `array_point` are the only conversions between the two orders.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

AIR_HU = -1024


@dataclasses.dataclass(frozen=True)
class Volume:
  array: np.ndarray      # [D, H, W], (z, y, x)
  spacing: tuple         # mm between voxel centres, (z, y, x)
  origin: tuple = (0.0, 0.0, 0.0)   # physical point (z, y, x) of voxel [0, 0, 0], mm

  def __post_init__(self):
    if self.array.ndim != 3:
      raise ValueError(f"a Volume is 3D (z, y, x); got an array of shape {self.array.shape}")
    object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
    object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
    if len(self.spacing) != 3 or min(self.spacing) <= 0:
      raise ValueError(f"spacing must be three positive mm values (z, y, x), got "
                       f"{self.spacing}")

  @property
  def shape(self):
    return self.array.shape

  def index_to_point(self, index):
    """Continuous (z, y, x) indices [..., 3] -> physical points (z, y, x) [..., 3], mm."""
    return np.asarray(self.origin) + np.asarray(index, np.float64) * np.asarray(self.spacing)

  def point_to_index(self, point):
    return (np.asarray(point, np.float64) - np.asarray(self.origin)) / np.asarray(self.spacing)

  def with_array(self, array):
    """The same geometry around another array (a mask, a label map)."""
    if array.shape != self.array.shape:
      raise ValueError(f"array shape {array.shape} differs from the volume's {self.shape}")
    return dataclasses.replace(self, array=array)


def resample(volume: Volume, spacing, order: int = 3, cval: float = AIR_HU) -> Volume:
  """`volume` on a grid of `spacing` (z, y, x) mm covering the same extent (the first
  voxel centre kept). order 3 = cubic B-spline (images; the spec's B-spline
  resampling), 0 = nearest neighbour (label maps); outside the volume: `cval`."""
  spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,)))
  if spacing == volume.spacing:
    return volume
  extent = (np.asarray(volume.shape) - 1) * np.asarray(volume.spacing)
  shape = tuple(int(np.floor(e / s + 1e-6)) + 1 for e, s in zip(extent, spacing))
  scale = np.asarray(spacing) / np.asarray(volume.spacing)
  source = volume.array
  if order > 1:
    # Prefilter in float32 (scipy's default would be float64: twice the memory).
    source = ndimage.spline_filter(source.astype(np.float32), order=order,
                                   output=np.float32, mode="nearest")
  out = ndimage.affine_transform(source, scale, output_shape=shape, order=order,
                                 mode="constant", cval=cval, prefilter=False,
                                 output=np.float32 if order > 0 else source.dtype)
  if order > 0 and np.issubdtype(volume.array.dtype, np.integer):
    info = np.iinfo(volume.array.dtype)
    out = np.clip(np.rint(out), info.min, info.max).astype(volume.array.dtype)
  return Volume(out, spacing, volume.origin)


def to_sitk(volume: Volume):
  """A SimpleITK image of `volume` (identity direction; ITK's (x, y, z) order)."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top  (3D methods only)
  image = sitk.GetImageFromArray(volume.array)   # numpy (z, y, x) -> ITK index (x, y, z)
  image.SetSpacing(tuple(reversed(volume.spacing)))
  image.SetOrigin(tuple(reversed(volume.origin)))
  return image


def from_sitk(image) -> Volume:
  """A SimpleITK image in the canonical frame (identity direction) -> Volume."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
  direction = np.asarray(image.GetDirection()).reshape(3, 3)
  if not np.allclose(direction, np.eye(3), atol=1e-6):
    raise ValueError(f"expected an image in the canonical LPS frame (identity direction), "
                     f"got direction {direction.tolist()}: reorient it first")
  return Volume(sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing())),
                tuple(reversed(image.GetOrigin())))


def sitk_point(point_zyx):
  """Physical point(s) (z, y, x) -> SimpleITK's (x, y, z)."""
  return np.asarray(point_zyx, np.float64)[..., ::-1]


def array_point(point_xyz):
  """SimpleITK physical point(s) (x, y, z) -> (z, y, x)."""
  return np.asarray(point_xyz, np.float64)[..., ::-1]
