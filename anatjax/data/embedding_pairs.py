"""Training pairs of the dense anatomical embedding (alice.md 2.4, provider (a)), made on
the host: two overlapping, rescaled crops of ONE CT and the cells that show the same
physical point in both.

Geometry, in continuous voxel indices of the stored volume (canonical (z, y, x) grid):
crop k samples the volume at v = offset_k + scale_k * i for its voxel indices i in
[0, crop)^3 (linear interpolation, air outside), so a per-axis scale in [0.8, 1.2] zooms
the crop out (> 1) or in (< 1) by resampling. Crop 1 lies inside the volume where it fits;
crop 2's centre is crop 1's moved by up to `max_shift` of crop 1's extent per axis (then
also kept inside the volume), so the two always overlap. A crop's voxel i stands for
[i - 1/2, i + 1/2), so the cell of stride s holding it is floor((i + 1/2) / s) and cell u
stands for voxels [u s, (u + 1) s).

Positives: `num_positives` points drawn uniformly in the overlap of the two crops' spans,
those inside the body first (a positive in air is one every air cell matches); for each,
its fine cell and its coarse cell in crop 1 and in crop 2.

Emitted (small, per DESIGN: the device scales and jitters):
  crops    int16 [2, S, S, S]  resampled HU, clipped to [-1024, 3071]
  jitter   float32 [2, 2]      per crop (contrast a, brightness b): x = a (HU + 1024) / 4095 + b
  fine     int32 [2, P, 3]     the positives' fine cells in crop 1, crop 2
  coarse   int32 [2, P, 3]     their coarse cells
  offset, scale  float32 [2, 3]  each crop's sampling geometry (above)
"""

from __future__ import annotations

import grain
import numpy as np
from scipy import ndimage

HU_RANGE = (-1024, 3071)
CANDIDATES_PER_POSITIVE = 8   # points drawn per positive, to find enough inside the body


def to_unit(crops_hu, jitter):
  """int16 HU crops [..., 2, S, S, S] and jitter [..., 2, 2] -> the network's intensities,
  a (HU + 1024) / 4095 + b (device or host)."""
  x = (crops_hu.astype(np.float32) - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])
  a, b = jitter[..., 0], jitter[..., 1]
  return x * a[..., None, None, None] + b[..., None, None, None]


def _offset_inside(rng, shape, extent):
  """Per axis, the first sampling position of a span `extent` long, uniform among those
  keeping it inside [0, shape - 1]; a span longer than the volume hangs over both ends."""
  room = shape - 1 - extent
  return rng.uniform(np.minimum(room, 0), np.maximum(room, 0))


def resample_crop(array, offset, scale, crop: int) -> np.ndarray:
  """array sampled at offset + scale * i, i in [0, crop)^3 (linear; air outside), reading
  only the block it needs (`array` may be memory-mapped)."""
  shape = np.asarray(array.shape)
  low = np.clip(np.floor(offset).astype(int), 0, shape)
  high = np.clip(np.ceil(offset + scale * (crop - 1)).astype(int) + 1, 0, shape)
  block = np.asarray(array[tuple(slice(a, b) for a, b in zip(low, high))], np.float32)
  out = ndimage.affine_transform(block, scale, offset - low, output_shape=(crop,) * 3,
                                 order=1, mode="constant", cval=HU_RANGE[0])
  return np.clip(np.rint(out), *HU_RANGE).astype(np.int16)


def cell_of(index, stride: int, cells: int):
  """Crop voxel indices (continuous) -> the cells of `stride` holding them (module doc)."""
  return np.clip(np.floor((np.asarray(index) + 0.5) / stride), 0, cells - 1).astype(np.int32)


def crop_pair(image, body, rng, crop: int, fine_stride: int, coarse_stride: int,
              num_positives: int = 100, scale_range=(0.8, 1.2), max_shift: float = 0.5,
              contrast: float = 0.05, brightness: float = 0.01) -> dict:
  """One training pair from a CT array `image` (HU, z, y, x) and its body mask (module
  doc); every random choice comes from `rng`."""
  shape = np.asarray(image.shape, np.float64)
  scale = rng.uniform(*scale_range, size=(2, 3))
  extent = scale * (crop - 1)
  offset = np.empty((2, 3))
  offset[0] = _offset_inside(rng, shape, extent[0])
  centre = offset[0] + extent[0] / 2 + rng.uniform(-1, 1, 3) * max_shift * extent[0]
  room = shape - 1 - extent[1]
  offset[1] = np.clip(centre - extent[1] / 2, np.minimum(room, 0), np.maximum(room, 0))
  low = np.maximum(np.max(offset, axis=0), 0)
  high = np.minimum(np.min(offset + extent, axis=0), shape - 1)
  assert np.all(high > low), (offset, extent)   # by construction (module doc)
  points = rng.uniform(low, high, size=(CANDIDATES_PER_POSITIVE * num_positives, 3))
  voxel = np.clip(np.rint(points).astype(int), 0, shape.astype(int) - 1)
  inside = np.asarray(body[tuple(voxel.T)], bool)
  points = points[np.argsort(~inside, kind="stable")[:num_positives]]
  index = (points[None] - offset[:, None]) / scale[:, None]     # [2, P, 3] crop voxels
  jitter = np.stack([1 + rng.uniform(-contrast, contrast, 2),
                     rng.uniform(-brightness, brightness, 2)], axis=1)
  return {
      "crops": np.stack([resample_crop(image, o, s, crop) for o, s in zip(offset, scale)]),
      "jitter": jitter.astype(np.float32),
      "fine": cell_of(index, fine_stride, crop // fine_stride),
      "coarse": cell_of(index, coarse_stride, crop // coarse_stride),
      "offset": offset.astype(np.float32),
      "scale": scale.astype(np.float32),
  }


class EmbeddingCrops(grain.transforms.RandomMap):
  """Host transform: a ct_volumes item {"a", "b"} -> `crop_pair` of volume a (b, the
  partner patient, is not used: both crops come from one CT), deterministic per example
  through Grain's rng."""

  def __init__(self, crop: int, fine_stride: int, coarse_stride: int, **options):
    for name, stride in (("fine_stride", fine_stride), ("coarse_stride", coarse_stride)):
      if crop % stride:
        raise ValueError(f"config data.image_size={crop} (the crop edge) must be a "
                         f"multiple of model.{name}={stride}")
    low, high = options.get("scale_range", (0.8, 1.2))
    if not 0 < low <= high:
      raise ValueError(f"config embedding.scale_range=({low}, {high}): use 0 < low <= high")
    # Crop centres at most max_shift x extent_1 apart overlap while that is below the
    # half-sum of the extents, (1 + low / high) / 2 x extent_1 at the worst scales.
    limit = (1 + low / high) / 2
    if not 0 <= options.get("max_shift", 0.5) < limit:
      raise ValueError(f"config embedding.max_shift={options['max_shift']}: use a fraction "
                       f"of the crop in [0, {limit:.3f}) so the crops always overlap")
    self.crop, self.fine_stride, self.coarse_stride = crop, fine_stride, coarse_stride
    self.options = options

  def random_map(self, item, rng):
    a = item["a"]
    return crop_pair(a.image.array, a.body, rng, self.crop, self.fine_stride,
                     self.coarse_stride, **self.options)
