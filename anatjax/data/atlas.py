"""Lung masks, the atlas choice and the atlas patch grid (drasclr.md 2.1 and 2.2 step 2).

Everything works on canonical `Volume`s (anatjax/data/volume.py: (z, y, x), x toward the
patient's left) already resampled to the training spacing; sizes given in mm or mL are
converted with that spacing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from anatjax.data.volume import Volume

# Lung label values: both in every subject and in the atlas (the registration matches
# them as intensities, spec 2.2 step 3).
RIGHT_LUNG, LEFT_LUNG = 50, 100


def ball(radius_vox) -> np.ndarray:
  """A boolean ellipsoid structuring element with per-axis radii in voxels."""
  radius = np.maximum(np.asarray(radius_vox, float), 0.5)
  half = np.floor(radius).astype(int)
  grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
  return sum((g / r) ** 2 for g, r in zip(grid, radius)) <= 1.0


def lung_mask(image: Volume, air_hu: float = -400.0, min_ml: float = 100.0,
              closing_mm: float = 3.0) -> Volume:
  """The classical lung mask (spec 2.2 step 2): uint8 labels 0, RIGHT_LUNG, LEFT_LUNG.

  Air below `air_hu` not connected to the in-plane border of a slice, components over
  `min_ml`, a closing of `closing_mm`; the two largest components are the lungs, told
  apart by the x of their centroids. One component (lungs joined by the airways) is split
  at the sagittal plane through its centroid. No component: a ValueError.
  Decision: the border is the in-plane edge (where the air around the body is); the
  first and last slices are not, as the trachea commonly leaves the scan through the top
  slice and would take the lungs with it.
  """
  air = np.asarray(image.array) < air_hu
  labels, count = ndimage.label(air)
  border = np.unique(np.concatenate([labels[:, [0, -1]].ravel(),
                                     labels[:, :, [0, -1]].ravel()]))
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  sizes[border] = 0
  sizes[0] = 0
  voxel_ml = np.prod(image.spacing) / 1000.0
  keep = np.flatnonzero(sizes * voxel_ml > min_ml)
  if not len(keep):
    raise ValueError(f"no air region over {min_ml} mL inside the body (HU < {air_hu}): "
                     "is this a chest CT in Hounsfield units?")
  mask = np.isin(labels, keep)
  mask = ndimage.binary_closing(mask, ball(closing_mm / np.asarray(image.spacing)))
  labels, count = ndimage.label(mask)
  sizes = np.bincount(labels.ravel())[1:]
  largest = np.argsort(-sizes, kind="stable")[:2] + 1
  out = np.zeros(mask.shape, np.uint8)
  x = np.arange(mask.shape[2])
  if count >= 2 and sizes[largest[1] - 1] * voxel_ml > min_ml:
    first, second = (labels == largest[0]), (labels == largest[1])
    first_x = np.mean(np.nonzero(first)[2])
    second_x = np.mean(np.nonzero(second)[2])
    left, right = (first, second) if first_x > second_x else (second, first)
  else:
    lung = labels == largest[0]
    centre_x = np.mean(np.nonzero(lung)[2])
    left, right = lung & (x > centre_x), lung & (x <= centre_x)
  out[right] = RIGHT_LUNG
  out[left] = LEFT_LUNG
  return image.with_array(out)


def lung_volume_ml(mask: Volume) -> float:
  return float(np.count_nonzero(mask.array)) * np.prod(mask.spacing) / 1000.0


def choose_atlas(lung_volumes) -> int:
  """The subject whose total lung volume is closest to the cohort median (spec 2.1;
  ties: the lower index)."""
  volumes = np.asarray(lung_volumes, float)
  return int(np.argmin(np.abs(volumes - np.median(volumes))))


def cube_fractions(mask: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
  """Mean of a binary mask over the cubes [corner, corner + size) (a summed-volume table,
  one lookup of 8 corners per cube)."""
  table = np.zeros(np.asarray(mask.shape) + 1, np.int64)
  table[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
  z0, y0, x0 = corners.T
  z1, y1, x1 = (corners + size).T
  total = (table[z1, y1, x1] - table[z0, y1, x1] - table[z1, y0, x1] - table[z1, y1, x0]
           + table[z0, y0, x1] + table[z0, y1, x0] + table[z1, y0, x0] - table[z0, y0, x0])
  return total / float(size ** 3)


def patch_grid(atlas_mask: np.ndarray, size: int = 32, stride: int = 26,
               max_patches: int = 1000) -> tuple[np.ndarray, float]:
  """(corners [L, 3], threshold) of the atlas cubes kept (spec 2.1 step 2): corners on a
  `stride` grid with the cube inside the volume; t starts at 0.1 and grows by 0.1 while
  at least `max_patches` cubes have a lung fraction over t; cubes over t are kept."""
  axes = [np.arange(0, n - size + 1, stride) for n in atlas_mask.shape]
  if any(len(a) == 0 for a in axes):
    raise ValueError(f"the atlas ({atlas_mask.shape}) is smaller than one {size}^3 patch")
  corners = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
  fractions = cube_fractions(atlas_mask > 0, corners, size)
  threshold = 0.1
  while np.count_nonzero(fractions > threshold + 1e-9) >= max_patches:
    threshold = round(threshold + 0.1, 10)
  kept = corners[fractions > threshold + 1e-9]
  if len(kept) < 3:
    raise ValueError(f"only {len(kept)} atlas patches of {size}^3 hold over "
                     f"{threshold:.0%} lung: the lungs are too small for this patch size "
                     "and spacing")
  return kept, threshold


def normalised_locations(corners: np.ndarray, mode: str = "max") -> np.ndarray:
  """The encoder's location input (spec 2.1 step 3): 'max' = C / max_i C * 2 - 1 per axis
  (the reference), 'minmax' = (C - min) / (max - min) * 2 - 1."""
  corners = corners.astype(np.float64)
  if mode == "max":
    low = np.zeros(3)
  elif mode == "minmax":
    low = corners.min(0)
  else:
    raise ValueError(f"config data.loc_norm={mode!r}: use 'max' or 'minmax'")
  span = np.maximum(corners.max(0) - low, 1e-9)
  return ((corners - low) / span * 2.0 - 1.0).astype(np.float32)


def nearest_neighbours(corners: np.ndarray, k: int = 2) -> np.ndarray:
  """[L, k]: each location's k nearest other locations by corner distance; ties go to the
  lower index (a stable sort; spec 2.1 step 4 and defect D8)."""
  diff = corners[:, None, :].astype(np.float64) - corners[None, :, :]
  dist = np.sqrt(np.sum(diff * diff, -1))
  np.fill_diagonal(dist, np.inf)
  return np.argsort(dist, axis=1, kind="stable")[:, :k]
