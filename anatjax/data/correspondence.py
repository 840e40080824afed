"""Anatomical correspondence between two patients' CTs (alice.md 2.2 and 2.3).

A provider answers "which voxel of volume B shows the anatomy at voxel p of volume A?"
with (q, score), score in [-1, 1], higher = more confident. It works on `prepare`d
volumes (a cache computed once per volume, offline) and runs on the host. Indices are in
each volume's canonical (z, y, x) grid (anatjax/data/volume.py), the one frame of the
whole 3-D layer.

`AffineProvider` (provider (b), the default; `AffineMatcher` is its matching half): every volume is affinely registered to one
atlas CT once (SimpleITK, Mattes MI on CTs at 4 mm clipped to [-1000, 1000] HU, 20 %
random sampling with a fixed seed, 300 iterations per level of a 4-2-1 pyramid, started
from the moments of the body masks); a point goes A -> atlas -> B through the two maps,
q = index_B(T_B(T_A^-1(point_A(p)))), rounded. score = 1 when q falls inside B's body
(so inside B), else 0; `score_mode="ncc"` scores the normalised cross-correlation of the
24^3 HU neighbourhoods of p and q instead.

`EmbeddingProvider` (provider (a), alice.md 2.4): each volume is resampled to the grid
the embedding model was trained on and turned into two unit-vector fields by the model
(fine F, stride f, and coarse G, stride c, in cells of that grid; fp16). A point p of A
looks up f = F_A at p's fine cell and g = G_A at p's coarse cell; over B's fine cells u,
sim(u) = 1/2 (F_B[u].f + G^_B[u].g), G^_B = G_B trilinearly upsampled to F_B's grid and
renormalised; q = B's voxel at the centre of the best cell, score = sim there. The
trained model comes from a run directory (anatjax/methods/anatomy_embedding.load_provider);
`EmbeddingMatcher` is the matching half, which Alice's training uses on fields computed
once per volume store (anatjax/data/ct_volumes.ensure_fields).

`find_pair` is the spec's acceptance rule over candidate points.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from anatjax.data import registration
from anatjax.data.volume import Volume, resample

REGISTRATION_SPACING_MM = 4.0
REGISTRATION_HU = (-1000.0, 1000.0)
NCC_SIZE = 24


def body_mask(image: Volume, threshold_hu: float = -500.0) -> Volume:
  """The body: HU above the threshold, the largest connected component, holes filled."""
  labels, count = ndimage.label(np.asarray(image.array) > threshold_hu)
  if not count:
    raise ValueError(f"no voxel above {threshold_hu} HU: is this a CT in HU?")
  largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
  return image.with_array(ndimage.binary_fill_holes(labels == largest))


@dataclasses.dataclass(frozen=True)
class AffineCache:
  image: Volume          # the CT (canonical grid, HU)
  body: np.ndarray       # bool, on the CT's grid
  to_volume: registration.PointMap   # atlas point -> this volume's point


def _registration_image(image: Volume, spacing_mm: float) -> Volume:
  small = resample(image, spacing_mm, order=1, cval=REGISTRATION_HU[0])
  return small.with_array(np.clip(small.array.astype(np.float32), *REGISTRATION_HU))


class AffineMatcher:
  """Provider (b)'s matching half: `match`/`match_many` on prepared caches (module doc).
  All training's pair mining needs; `AffineProvider` adds the preparation."""

  def __init__(self, score_mode: str = "inside"):
    if score_mode not in ("inside", "ncc"):
      raise ValueError(f"config alice.score_mode={score_mode!r}: use 'inside' or 'ncc'")
    self.score_mode = score_mode

  def match_many(self, a: AffineCache, points, b: AffineCache):
    """(Q [R, 3] int, S [R]) for integer voxel indices P [R, 3] of A."""
    points = np.asarray(points)
    atlas_points = a.to_volume.inverse()(a.image.index_to_point(points))
    q = np.rint(b.image.point_to_index(b.to_volume(atlas_points))).astype(np.int64)
    inside = np.all((q >= 0) & (q < np.asarray(b.image.shape)), axis=1)
    scores = np.zeros(len(q), np.float32)
    if self.score_mode == "inside":
      scores[inside] = b.body[tuple(q[inside].T)]
    else:
      scores[inside] = [ncc(a.image.array, p, b.image.array, r)
                        for p, r in zip(points[inside], q[inside])]
    return q, scores

  def match(self, a: AffineCache, point, b: AffineCache):
    q, scores = self.match_many(a, np.asarray(point)[None], b)
    return q[0], float(scores[0])


class AffineProvider(AffineMatcher):
  """Provider (b): correspondence through affine maps to a common atlas (module doc)."""

  def __init__(self, atlas: Volume, score_mode: str = "inside", iterations: int = 300,
               spacing_mm: float = REGISTRATION_SPACING_MM):
    super().__init__(score_mode)
    self.iterations, self.spacing_mm = iterations, spacing_mm
    self._atlas = _registration_image(atlas, spacing_mm)
    self._atlas_body = body_mask(self._atlas).array

  def register(self, image: Volume) -> registration.PointMap:
    """The affine map atlas point -> point of `image` (the offline, per-volume work)."""
    small = _registration_image(image, self.spacing_mm)
    small_body = body_mask(small).array
    as_float = lambda v, a: v.with_array(a.astype(np.float32))
    return registration.register(
        self._atlas, small, iterations=self.iterations, sampling="random",
        sampling_fraction=0.2, init_atlas=as_float(self._atlas, self._atlas_body),
        init_subject=as_float(small, small_body))

  def prepare(self, image: Volume, body: np.ndarray | None = None) -> AffineCache:
    """The volume's cache; `body` (its body mask) if already computed."""
    body = body_mask(image).array if body is None else body
    return AffineCache(image, body, self.register(image))


@dataclasses.dataclass(frozen=True)
class EmbeddingCache:
  image: Volume              # the CT (canonical grid, HU); candidates are drawn from it
  spacing: tuple             # the model grid's spacing (z, y, x), mm; same origin as image
  fine: np.ndarray           # [nz, ny, nx, d] float16 unit vectors, one per fine cell
  coarse: np.ndarray         # [mz, my, mx, d'] float16 unit vectors, one per coarse cell
  coarse_norm: np.ndarray    # [nz, ny, nx] float32: |G upsampled to the fine cells|


def upsampling_weights(fine_cells: int, coarse_cells: int, fine_stride: int,
                       coarse_stride: int) -> np.ndarray:
  """[fine_cells, coarse_cells]: linear interpolation of coarse-cell values at the fine
  cells' centres along one axis (cell u of stride s is centred at voxel u s + (s - 1)/2),
  clamped at the ends."""
  centre = np.arange(fine_cells) * fine_stride + (fine_stride - 1) / 2
  t = np.clip((centre - (coarse_stride - 1) / 2) / coarse_stride, 0, coarse_cells - 1)
  low = np.floor(t).astype(int)
  high = np.minimum(low + 1, coarse_cells - 1)
  weights = np.zeros((fine_cells, coarse_cells))
  np.add.at(weights, (np.arange(fine_cells), low), 1 - (t - low))
  np.add.at(weights, (np.arange(fine_cells), high), t - low)
  return weights


class EmbeddingMatcher:
  """Provider (a)'s matching half: `match`/`match_many` on caches whose fields exist (module
  doc). All training's pair mining needs (the fields computed offline, memory-mapped:
  anatjax/data/ct_volumes.py); `EmbeddingProvider` adds computing them."""

  def __init__(self, fine_stride: int, coarse_stride: int):
    self.fine_stride, self.coarse_stride = fine_stride, coarse_stride

  def _weights(self, fine_shape, coarse_shape):
    return [upsampling_weights(n, m, self.fine_stride, self.coarse_stride)
            for n, m in zip(fine_shape, coarse_shape)]

  def similarity(self, a: EmbeddingCache, points, b: EmbeddingCache) -> np.ndarray:
    """sim [R, nz, ny, nx] over B's fine cells for integer voxel indices P [R, 3] of A.
    G^_B[u].g = (up(G_B) g)[u] / |up(G_B)[u]|, and up(G_B) g = up(G_B g) since the
    upsampling is linear: only a scalar field per query is upsampled."""
    grid = (a.image.index_to_point(points) - np.asarray(a.image.origin)) / np.asarray(a.spacing)
    cell = lambda stride, field: tuple(np.clip(np.floor((grid + 0.5) / stride).astype(int),
                                               0, np.asarray(field.shape[:3]) - 1).T)
    f = a.fine[cell(self.fine_stride, a.fine)].astype(np.float32)        # [R, d]
    g = a.coarse[cell(self.coarse_stride, a.coarse)].astype(np.float32)  # [R, d']
    fine_sim = np.einsum("zyxd,rd->rzyx", b.fine.astype(np.float32), f, optimize=True)
    coarse_dot = np.einsum("abcd,rd->rabc", b.coarse.astype(np.float32), g, optimize=True)
    wz, wy, wx = self._weights(b.fine.shape[:3], b.coarse.shape[:3])
    coarse_sim = np.einsum("rabc,za,yb,xc->rzyx", coarse_dot, wz, wy, wx, optimize=True)
    return 0.5 * (fine_sim + coarse_sim / np.maximum(b.coarse_norm, 1e-12))

  def match_many(self, a: EmbeddingCache, points, b: EmbeddingCache):
    """(Q [R, 3] int, S [R]) for integer voxel indices P [R, 3] of A."""
    points = np.asarray(points)
    sim = self.similarity(a, points, b).reshape(len(points), -1)
    best = np.argmax(sim, axis=1)
    cells = np.stack(np.unravel_index(best, b.fine.shape[:3]), axis=1)
    centre = cells * self.fine_stride + (self.fine_stride - 1) / 2     # model-grid voxels
    index = b.image.point_to_index(np.asarray(b.image.origin) + centre * np.asarray(b.spacing))
    q = np.clip(np.floor(index + 0.5).astype(np.int64), 0, np.asarray(b.image.shape) - 1)
    scores = np.clip(sim[np.arange(len(points)), best], -1.0, 1.0).astype(np.float32)
    return q, scores

  def match(self, a: EmbeddingCache, point, b: EmbeddingCache):
    q, scores = self.match_many(a, np.asarray(point)[None], b)
    return q[0], float(scores[0])


class EmbeddingProvider(EmbeddingMatcher):
  """Provider (a): correspondence by dense anatomical embeddings (module doc).

  `fields(hu)` maps a CT array on the model grid (HU, z, y, x) to its fields (fine
  [nz, ny, nx, d], coarse [mz, my, mx, d'], unit vectors, one per cell from voxel 0 on)."""

  def __init__(self, fields, spacing_mm, fine_stride: int, coarse_stride: int):
    super().__init__(fine_stride, coarse_stride)
    self.fields = fields
    self.spacing = tuple(float(s) for s in np.broadcast_to(spacing_mm, 3))

  def prepare(self, image: Volume) -> EmbeddingCache:
    """The volume's fields, computed on the model grid (the volume resampled to it)."""
    grid = resample(image, self.spacing, order=1)
    fine, coarse = (np.asarray(f, np.float32) for f in self.fields(grid.array))
    wz, wy, wx = self._weights(fine.shape[:3], coarse.shape[:3])
    upsampled = np.einsum("abcd,za,yb,xc->zyxd", coarse, wz, wy, wx, optimize=True)
    return EmbeddingCache(image, self.spacing, fine.astype(np.float16),
                          coarse.astype(np.float16),
                          np.linalg.norm(upsampled, axis=-1).astype(np.float32))


def neighbourhood(array: np.ndarray, centre, size: int) -> np.ndarray:
  """The size^3 block of `array` centred at `centre` (edge values beyond the border)."""
  start = np.asarray(centre) - size // 2
  index = [np.clip(np.arange(s, s + size), 0, n - 1) for s, n in zip(start, array.shape)]
  return array[np.ix_(*index)].astype(np.float64)


def ncc(array_a, p, array_b, q, size: int = NCC_SIZE) -> float:
  """Normalised cross-correlation of the clipped-HU neighbourhoods of p in A and q in B."""
  x = np.clip(neighbourhood(array_a, p, size), *REGISTRATION_HU).ravel()
  y = np.clip(neighbourhood(array_b, q, size), *REGISTRATION_HU).ravel()
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denominator) if denominator > 0 else 0.0


def candidate_points(image: Volume, rng, count: int, margin: int = 10,
                     min_hu: float = -125.0, max_rounds: int = 10_000) -> np.ndarray:
  """`count` voxels drawn uniformly among those above `min_hu` HU at least `margin`
  voxels from every face (spec 2.2, step 1). Rejection sampling from the inner box: the
  same distribution as choosing among all such voxels, reading only the voxels drawn
  (volumes may be memory-mapped)."""
  shape = np.asarray(image.shape)
  if np.any(shape <= 2 * margin):
    raise ValueError(f"a volume of shape {tuple(shape)} has no voxel {margin} voxels "
                     "inside every face")
  array, kept = image.array, []
  for _ in range(max_rounds):
    draws = rng.integers(margin, shape - margin, size=(4 * count, 3))
    kept.extend(draws[array[tuple(draws.T)] > min_hu])
    if len(kept) >= count:
      return np.asarray(kept[:count])
  raise ValueError(f"no voxel above {min_hu} HU at least {margin} voxels inside the "
                   f"volume ({tuple(shape)}) in {max_rounds} rounds of draws")


def find_pair(provider, a, b, rng, chunk: int = 16, max_candidates: int = 100,
              threshold: float = 0.7):
  """(p, q, score, accepted): the first candidate of A (drawn in chunks) whose match in B
  scores over `threshold`; after `max_candidates` the best one, accepted=False (the
  caller counts these weak pairs)."""
  best, drawn = None, 0
  while drawn < max_candidates:
    points = candidate_points(a.image, rng, min(chunk, max_candidates - drawn))
    drawn += len(points)
    matches, scores = provider.match_many(a, points, b)
    passing = np.flatnonzero(scores > threshold)
    if len(passing):
      i = passing[0]
      return points[i], matches[i], float(scores[i]), True
    i = int(np.argmax(scores))
    if best is None or scores[i] > best[2]:
      best = (points[i], matches[i], float(scores[i]), False)
  return best
