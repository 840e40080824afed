"""DrasCLR's per-patch intensity handling and augmentation on the host (drasclr.md 2.5).

For every patch, an independent draw (the two anchor views and each neighbour):
1. clip to [-1024, 240] HU and add 1024 -> [0, 1264];
2. a random affine about the patch centre, always: rotations about the three axes each
   U(-10, 10) degrees, per-axis scale 1 + U(-0.1, 0.1), per-axis shift U(-12, 12) voxels
   (scaled with the patch size from 32), trilinear, edges clamped;
3. with p = 0.25 Gaussian noise of sigma ~ U(0, 50) (noise_std_fixed: sigma = 50);
4. with p = 0.25 a contrast change: x = ((x - lo) / (hi - lo + 1e-7))^g (hi - lo) + lo,
   g ~ U(0.5, 4.5), lo/hi the patch's own minimum and maximum.
The last step, x / 632 - 1 into [-1, 1], runs on the device (`to_network`): patches cross
the worker boundary as int16 in 1/16 HU steps (VIEW_SCALE), a quarter of float32's bytes.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from scipy import ndimage

HU_LOW, HU_HIGH = -1024.0, 240.0
VIEW_SCALE = 16.0          # int16 view units per HU
HALF_RANGE = 632.0         # (HU_HIGH - HU_LOW) / 2


def rotation_matrix(angles_rad) -> np.ndarray:
  """Rotation about the z, y and x axes in turn (array-axis order)."""
  cz, cy, cx = np.cos(angles_rad)
  sz, sy, sx = np.sin(angles_rad)
  about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])   # turns the y-x plane
  about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
  return about_z @ about_y @ about_x


def random_affine(patch, rng, max_degrees: float, max_scale: float, max_shift: float):
  """`patch` resampled through a random rotation, scaling and shift about its centre."""
  matrix = rotation_matrix(np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3)))
  matrix = matrix @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
  centre = (np.asarray(patch.shape) - 1) / 2.0
  shift = rng.uniform(-max_shift, max_shift, 3)
  # output voxel o samples the input at matrix (o - centre) + centre + shift
  offset = centre + shift - matrix @ centre
  return ndimage.affine_transform(patch, matrix, offset, order=1, mode="nearest",
                                  prefilter=False)


@dataclasses.dataclass(frozen=True)
class PatchAugment:
  max_degrees: float = 10.0
  max_scale: float = 0.1
  max_shift: float = 12.0      # voxels at 32^3; scaled with the patch size
  p_noise: float = 0.25
  max_noise_std: float = 50.0
  noise_std_fixed: bool = False
  p_contrast: float = 0.25
  gamma_range: tuple = (0.5, 4.5)

  def __call__(self, patch_hu, rng) -> np.ndarray:
    """int16 HU [S, S, S] -> float32 in HU + 1024 units (about [0, 1264])."""
    x = np.clip(patch_hu.astype(np.float32), HU_LOW, HU_HIGH) - HU_LOW
    x = random_affine(x, rng, self.max_degrees, self.max_scale,
                      self.max_shift * patch_hu.shape[0] / 32.0)
    if rng.random() < self.p_noise:
      std = self.max_noise_std if self.noise_std_fixed else rng.uniform(0, self.max_noise_std)
      x = x + rng.normal(0.0, std, x.shape).astype(np.float32)
    if rng.random() < self.p_contrast:
      lo, hi = float(x.min()), float(x.max())
      gamma = rng.uniform(*self.gamma_range)
      x = np.power((x - lo) / (hi - lo + 1e-7), gamma) * (hi - lo) + lo
    return x.astype(np.float32)


def to_view_units(x) -> np.ndarray:
  """Augmented float patch -> int16 (1/VIEW_SCALE HU steps; values stay far inside
  int16 even with noise outliers)."""
  return np.clip(np.rint(x * VIEW_SCALE), -32768, 32767).astype(np.int16)


def to_network(view_units):
  """Device side: int16 view units -> the encoder's [-1, 1] input, x / 632 - 1."""
  return view_units.astype(np.float32) / (VIEW_SCALE * HALF_RANGE) - 1.0


class DrasCLRViews(grain.transforms.RandomMap):
  """Store item -> {view1, view2 [S]^3, neigh [2, S, S, S] (int16 view units), loc_idx,
  loc, neigh_loc}: two views of the anchor and one of each neighbour, independent draws."""

  def __init__(self, augment: PatchAugment):
    self.augment = augment

  def random_map(self, item, rng):
    views = [to_view_units(self.augment(item["anchor"], rng)) for _ in range(2)]
    neigh = np.stack([to_view_units(self.augment(n, rng)) for n in item["neighbours"]])
    return {"view1": views[0], "view2": views[1], "neigh": neigh,
            "loc_idx": item["loc_idx"], "loc": item["loc"], "neigh_loc": item["neigh_loc"]}
