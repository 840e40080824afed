"""The atlas patch store and DrasCLR's location-blocked source (drasclr.md 2.3, 2.4).

A store is a folder written by anatjax/data/ct_prepare.py:
  atlas.npz      corners [L, 3] int (atlas voxel, z y x), loc_norm [L, 3] float32,
                 neighbours [L, 2] int, patch_size, spacing_mm, atlas (subject id)
  subjects.json  the subject ids, in the row order of every location array
  loc_0000.npy   int16 HU [N, S, S, S] (one array per location, memory-mapped)
  store.json     the preparation options; written last, so its presence means complete.

`LocationBlockedPatches` serves items in the order training must see them (spec 2.4):
an epoch visits the locations one after another (in index order, or shuffled per epoch);
at each location a fresh permutation of the subjects is cut into floor(N / B) steps of B
distinct subjects, so B consecutive items (one global batch) share one location and its
queue is refreshed by consecutive steps. Global stream position p fixes (epoch, location,
step, slot), so the order is the same for any number of processes and resumes exactly.
Every item carries its location explicitly (spec defect D2).
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import numpy as np

STORE_FILE = "store.json"
ATLAS_FILE = "atlas.npz"
SUBJECTS_FILE = "subjects.json"
# The stream is a lazily indexed range this many epochs long: longer than any run.
MAX_EPOCHS = 10 ** 6


def location_file(root: str, index: int) -> str:
  return os.path.join(root, f"loc_{index:04d}.npy")


@dataclasses.dataclass(frozen=True)
class Atlas:
  corners: np.ndarray      # [L, 3] int, atlas voxel index (z, y, x) of each cube's corner
  loc_norm: np.ndarray     # [L, 3] float32, the encoder's location input
  neighbours: np.ndarray   # [L, 2] int, the two nearest other locations
  patch_size: int
  spacing_mm: float
  atlas_id: str

  @property
  def num_locations(self) -> int:
    return len(self.corners)

  def save(self, root: str) -> None:
    np.savez(os.path.join(root, ATLAS_FILE), corners=self.corners, loc_norm=self.loc_norm,
             neighbours=self.neighbours, patch_size=self.patch_size,
             spacing_mm=self.spacing_mm, atlas_id=self.atlas_id)


def is_complete(root: str) -> bool:
  return os.path.isfile(os.path.join(root, STORE_FILE))


def read_atlas(root: str) -> Atlas:
  if not is_complete(root):
    raise FileNotFoundError(
        f"{root} is not a complete patch store (no {STORE_FILE}): prepare it with "
        "`python -m anatjax.data.ct_prepare --out=...` or point data.root at one")
  with np.load(os.path.join(root, ATLAS_FILE)) as f:
    return Atlas(f["corners"], f["loc_norm"].astype(np.float32), f["neighbours"],
                 int(f["patch_size"]), float(f["spacing_mm"]), str(f["atlas_id"]))


def read_subjects(root: str) -> list:
  with open(os.path.join(root, SUBJECTS_FILE)) as f:
    return json.load(f)


def read_options(root: str) -> dict:
  with open(os.path.join(root, STORE_FILE)) as f:
    return json.load(f)


class LocationBlockedPatches:
  """Items {anchor [S]^3, neighbours [2, S, S, S] int16 HU, loc_idx, loc, neigh_loc} of a
  store in location-blocked order (module doc). A Grain source with its own order: the
  pipeline takes `ordered_stream(seed, global batch)` instead of shuffling. Picklable:
  the memory maps open lazily in each process."""

  def __init__(self, root: str, location_order: str = "sequential",
               neighbour_tie_break: str = "index"):
    if location_order not in ("sequential", "shuffled"):
      raise ValueError(f"config data.location_order={location_order!r}: use "
                       "'sequential' (the reference) or 'shuffled'")
    if neighbour_tie_break not in ("index", "random"):
      raise ValueError(f"config data.neighbour_tie_break={neighbour_tie_break!r}: use "
                       "'index' or 'random'")
    self.root = root
    self.location_order, self.tie_break = location_order, neighbour_tie_break
    self.atlas = read_atlas(root)
    self.subjects = read_subjects(root)
    self._arrays = None
    self._order_key, self._order = None, None

  def __len__(self):
    return self.atlas.num_locations * len(self.subjects)

  def examples_per_epoch(self, batch_size: int) -> int:
    """An epoch: every location, floor(N / B) batches of distinct subjects each."""
    steps = len(self.subjects) // batch_size
    if not steps:
      raise ValueError(f"config batch_size={batch_size} needs at least that many subjects; "
                       f"the store {self.root} has {len(self.subjects)}")
    return self.atlas.num_locations * steps * batch_size

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None, "_order_key": None, "_order": None}

  def _location(self, index):
    if self._arrays is None:
      self._arrays = [np.load(location_file(self.root, i), mmap_mode="r")
                      for i in range(self.atlas.num_locations)]
    return self._arrays[index]

  def position(self, p: int, seed: int, batch_size: int) -> tuple[int, int]:
    """Stream position p -> (location, subject row)."""
    epoch, within = divmod(p, self.examples_per_epoch(batch_size))
    per_location = len(self.subjects) // batch_size * batch_size
    block, slot = divmod(within, per_location)
    locations = self.atlas.num_locations
    if self.location_order == "shuffled":
      block = np.random.default_rng([seed, epoch, locations]).permutation(locations)[block]
    return int(block), int(self._subject_order(seed, epoch, block)[slot])

  def _subject_order(self, seed: int, epoch: int, block: int) -> np.ndarray:
    """The block's subject permutation, kept while consecutive items ask for it (a batch
    reads B of them; redrawing an N-long permutation per item is wasted work)."""
    key = (seed, epoch, block)
    if self._order_key != key:
      self._order_key = key
      self._order = np.random.default_rng([seed, epoch, block]).permutation(
          len(self.subjects))
    return self._order

  def neighbours_of(self, location: int, step: int, seed: int) -> np.ndarray:
    """The location's two neighbours; with tie_break='random' redrawn every step among
    the locations tied at the second neighbour's distance (spec 2.1 option)."""
    if self.tie_break == "index":
      return self.atlas.neighbours[location]
    corners = self.atlas.corners.astype(np.float64)
    dist = np.linalg.norm(corners - corners[location], axis=1)
    dist[location] = np.inf
    kth = np.sort(dist)[1]
    closer = np.flatnonzero(dist < kth - 1e-9)
    tied = np.flatnonzero(np.abs(dist - kth) <= 1e-9)
    rng = np.random.default_rng([seed, step, location])
    return np.concatenate([closer, rng.choice(tied, 2 - len(closer), replace=False)])

  def item(self, location: int, row: int, neighbours) -> dict:
    return {
        "anchor": np.asarray(self._location(location)[row]),
        "neighbours": np.stack([self._location(int(n))[row] for n in neighbours]),
        "loc_idx": np.int32(location),
        "loc": self.atlas.loc_norm[location],
        "neigh_loc": self.atlas.loc_norm[np.asarray(neighbours)],
    }

  def __getitem__(self, index):
    """Random access by (location-major) index, neighbours by the fixed tie-break."""
    location, row = divmod(int(index), len(self.subjects))
    return self.item(location, row, self.atlas.neighbours[location])

  def ordered_stream(self, seed: int, batch_size: int) -> grain.MapDataset:
    """The training stream (global batch `batch_size`), MAX_EPOCHS epochs long (lazy)."""
    return grain.MapDataset.range(self.examples_per_epoch(batch_size) * MAX_EPOCHS).map(
        _StreamItem(self, seed, batch_size))


@dataclasses.dataclass(frozen=True)
class _StreamItem:
  """Picklable stream position -> item (Grain workers pickle the map)."""
  source: LocationBlockedPatches
  seed: int
  batch_size: int

  def __call__(self, p):
    p = int(p)
    location, row = self.source.position(p, self.seed, self.batch_size)
    neighbours = self.source.neighbours_of(location, p // self.batch_size, self.seed)
    return self.source.item(location, row, neighbours)
