"""Alice's cross-patient view pairs, made on the host (alice.md 2.5-2.7).

For volumes A and B (two patients, each `prepare`d by a correspondence provider,
anatjax/data/correspondence.py): a foreground point p of A and its match q in B by the
acceptance rule, the `crop`^3 block of A centred at p and of B centred at q (index range
[c - crop/2, c + crop/2) per axis; outside the volume counts as the bottom of the
intensity window), and an independent student mask per crop.

Axes are the canonical (z, y, x) of the 3-D layer. The spec's column masks lie on the
axial plane (its axes x, y) and run through all z: here a grid over axes 1 and 2,
repeated along axis 0.

Crops cross the worker boundary as int16 HU clipped to the window [-125, 225]; the
device scales them, x = (HU + 125) / 350 in [0, 1] (`to_unit`).
"""

from __future__ import annotations

import grain
import numpy as np

from anatjax.data import correspondence, registration

WINDOW_HU = (-125, 225)
MASK_GRID = 4            # cells per masked axis
MASK_FRACTION = 0.75


def to_unit(crops_hu):
  """int16 HU crops -> the network's [0, 1] intensities (device or host)."""
  return (crops_hu.astype(np.float32) - WINDOW_HU[0]) / (WINDOW_HU[1] - WINDOW_HU[0])


def window_crop(image, centre, size: int) -> np.ndarray:
  """The size^3 block centred at `centre`, clipped to the window (bottom outside)."""
  start = np.asarray(centre, int) - size // 2
  patch = registration.crop_patch(image, start, size, fill=WINDOW_HU[0])
  return np.clip(patch, *WINDOW_HU).astype(np.int16)


def student_mask(rng, mode: str = "columns", fraction: float = MASK_FRACTION) -> np.ndarray:
  """Masked cells (True = hidden from the student), ceil(cells x fraction) of them:
  'columns' = 12 of a 4 x 4 grid over axes (y, x), each through all z; 'blocks3d' = 48 of
  a 4 x 4 x 4 grid (at the spec's fraction 0.75)."""
  shapes = {"columns": (MASK_GRID, MASK_GRID), "blocks3d": (MASK_GRID,) * 3}
  if mode not in shapes:
    raise ValueError(f"config alice.mask_mode={mode!r}: use 'columns' or 'blocks3d'")
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config alice.mask_fraction={fraction}: use a fraction in [0, 1) "
                     "(the spec's is 0.75; 0 = no mask)")
  cells = int(np.prod(shapes[mode]))
  hidden = np.zeros(cells, bool)
  hidden[rng.choice(cells, int(np.ceil(cells * fraction)), replace=False)] = True
  return hidden.reshape(shapes[mode])


def expand_mask(cells: np.ndarray, size: int) -> np.ndarray:
  """Cell mask [4, 4] or [4, 4, 4] -> voxel mask [size]^3 (columns repeat along z)."""
  cell = size // MASK_GRID
  voxels = cells
  for axis in range(cells.ndim):
    voxels = np.repeat(voxels, cell, axis=axis)
  if cells.ndim == 2:
    voxels = np.broadcast_to(voxels[None], (size, size, size))
  return voxels


def mine_pair(provider, a, b, rng, crop: int = 64, mask_mode: str = "columns",
              mask_fraction: float = MASK_FRACTION) -> dict:
  """One training pair from prepared volumes a, b (module doc): crops [2, S, S, S] int16
  HU, mask_cells [2, ...] bool, pair_score, points [2, 3] int32 and `weak` (no candidate
  passed the acceptance rule; the best one was kept)."""
  if crop % MASK_GRID:
    raise ValueError(f"config alice.crop={crop} must be a multiple of {MASK_GRID}")
  p, q, score, accepted = correspondence.find_pair(provider, a, b, rng)
  masks = [student_mask(rng, mask_mode, mask_fraction) for _ in range(2)]
  return {
      "crops": np.stack([window_crop(a.image, p, crop), window_crop(b.image, q, crop)]),
      "mask_cells": np.stack(masks),
      "pair_score": np.float32(score),
      "points": np.stack([p, q]).astype(np.int32),
      "weak": np.bool_(not accepted),
  }


PARTNERS = ("next", "self")


class MinePairs(grain.transforms.RandomMap):
  """Host transform: {"a", "b"} provider caches (anatjax/data/ct_volumes.VolumePairs) ->
  one mined pair (`mine_pair`), deterministic per example through Grain's rng.

  partner='next' is the spec's pairing (B = the next volume of the batch); 'self' is an
  ablation: both views from A around the same point (the provider maps p to itself), so
  they differ by their student masks only - DINO on one crop, no cross-patient task.
  """

  def __init__(self, matcher, crop: int = 64, mask_mode: str = "columns",
               mask_fraction: float = MASK_FRACTION, partner: str = "next"):
    # bad values fail when the method is built, not in a worker
    student_mask(np.random.default_rng(0), mask_mode, mask_fraction)
    if partner not in PARTNERS:
      raise ValueError(f"config alice.partner={partner!r}: use one of {PARTNERS}")
    self.matcher, self.crop, self.mask_mode = matcher, crop, mask_mode
    self.mask_fraction, self.partner = mask_fraction, partner

  def random_map(self, item, rng):
    b = item["a"] if self.partner == "self" else item["b"]
    return mine_pair(self.matcher, item["a"], b, rng, self.crop, self.mask_mode,
                     self.mask_fraction)
