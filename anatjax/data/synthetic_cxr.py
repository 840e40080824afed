"""Procedural frontal (PA) chest-radiograph phantom: the embedded data source ``synthetic_cxr``.

``SyntheticCXR`` is a Grain random-access data source (``__len__`` + ``__getitem__``,
a plain picklable object) that renders synthetic chest radiographs on the fly.
Nothing is read from or written to disk; every item is a pure function of
``(seed, split, index, image_size)``: the same arguments give byte-identical output
in any process and in any order (per-item RNG ``np.random.default_rng([seed,
split_id, index])``).

Image conventions are those of a PA film: air is dark, soft tissue grey, bone and
fluid bright; the patient's right side is on the image left.

Rendered structures
 body outline (neck, shoulders, optionally the arms, chest wall) against dark air;
 both lungs, dark, with faint branching vascular markings and hilar shadows, bases
 slightly denser; the mediastinum with the aortic knob; the heart, bulging to the
 image right and sitting on the diaphragm; trachea and main bronchi (dark air
 column); the spine with vertebral bodies, disc spaces and pedicles, faint behind
 the heart; posterior ribs (bright arcs rising slightly then descending laterally,
 with cortical margins) and fainter anterior ribs (sloping down medially);
 S-shaped clavicles; humeral heads and faint scapulae; diaphragm
 domes (right dome higher, sharp costophrenic angles) and the bright upper abdomen
 with a gastric air bubble; optional breast shadows. The film then gets a slight
 blur, signal-dependent (quantum-like) noise and a random exposure: gain, offset,
 film shoulder, gamma and a heel-effect gradient.

Patient variation: body size and habitus, arm position, translation, a few degrees
of rotation, scale, inspiration depth (diaphragm height / lung height, which also sets
the rib spacing), heart size and position, clavicle height, contrast and noise, so
grid positions correspond only approximately across images. Geometry is defined in
normalised coordinates and rasterised directly at ``image_size``.

Anatomy labels (``ANATOMY_NAMES``; one label per pixel). Paint order, later wins:
background < soft_tissue < abdomen < right/left lung < ribs < mediastinum < spine <
heart < trachea < clavicles < humeri. ``right_lung`` is the patient's right lung,
i.e. the lung on the image left. A pneumothorax and effusions stay labelled as lung.

Splits
 ``"pretrain"``: normal images only (no findings, no finding fields).
 ``"labelled"``: each of the five ``FINDING_NAMES`` appears independently with
 probability ``FINDING_PROB`` (about 17 % of images are normal):
  nodule            1-3 small, round, sharply marginated, slightly lobulated
           opacities inside the lungs;
  consolidation     patchy, irregular, textured air-space opacity confined to one
           lung (lower zone most often), with air bronchograms;
  pleural_effusion  homogeneous basal opacity with a meniscus (concave upper
           border rising laterally), blunting the costophrenic angle and
           effacing the dome; sometimes bilateral;
  cardiomegaly      enlarged heart silhouette, cardiothoracic ratio ~0.56-0.70
           (normal hearts: ~0.34-0.49); the anatomy map shows the
           enlarged heart;
  pneumothorax      apicolateral dark rim without vascular markings (ribs remain
           visible) bounded by a thin bright visceral pleural line, the
           lung edge retracted towards the hilum.

Implementation notes: shapes are rasterised with cv2 (fixed-point polygons) into a
tissue-code map, an additive uint8 layer (bones, vessels) and a low-resolution smooth
field, combined through lookup tables into a density image, then blurred, given noise
and mapped through the exposure curve. Two tables are built lazily from fixed seeds
(so outputs stay identical across processes): a noise texture per source instance
(each item crops it at a random offset; not pickled) and a per-process bank of 1024
vascular trees (each item picks one per lung and scales it to the lung). Typical cost at 224 px on one CPU
core: ~1.5-2 ms per pretrain item, ~2.5-3 ms per labelled item.

Item format (dict of numpy arrays)
 ``image``          uint8 [S, S]  greyscale radiograph
 ``anatomy``        uint8 [S, S]  index into ``ANATOMY_NAMES``
 ``index``          int64 []      the (non-negative) index of the item
 labelled split only:
 ``findings``       uint8 [5]     multi-hot over ``FINDING_NAMES``
 ``finding_masks``  uint8 [S, S]  bit field: bit f set where finding f is present
                  (cardiomegaly: the whole enlarged heart)
 ``boxes``          float32 [5,4] (x, y, w, h) in pixels, the bounding box of each
                  finding's mask (w = x_max - x_min + 1); zeros when
                  the finding is absent
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cv2
import numpy as np

__all__ = [
  "ANATOMY_NAMES",
  "DEFAULT_NUM_EXAMPLES",
  "FINDING_NAMES",
  "FINDING_PROB",
  "SPLITS",
  "STRUCTURES",
  "SyntheticCXR",
  "cardiothoracic_ratio",
  "structure_mask",
]

ANATOMY_NAMES: tuple[str, ...] = (
  "background",
  "soft_tissue",
  "abdomen",
  "right_lung",
  "left_lung",
  "mediastinum",
  "heart",
  "trachea",
  "spine",
  "ribs",
  "clavicles",
  "humeri",
)
# Structures made of anatomy labels (the published radiograph segmentation tasks' heart,
# lungs and clavicles), for segmentation targets and reference shapes.
STRUCTURES: dict[str, tuple[str, ...]] = {
  "heart": ("heart",),
  "lungs": ("right_lung", "left_lung"),
  "clavicles": ("clavicles",),
}
# Ribs and clavicles are painted over the lungs, so the lung labels alone are the gaps
# between ribs. A lung field, as JSRT/SCR's lung masks draw it, includes what lies
# behind them: within the convex hull of each lung's pixels, lung, rib and clavicle.
_BEHIND_LUNG = ("right_lung", "left_lung", "ribs", "clavicles")


def structure_mask(anatomy: np.ndarray, structure: str) -> np.ndarray:
  """uint8 mask (1 inside) of a STRUCTURES entry in an anatomy label map ([S, S] or
  [N, S, S]); lungs are lung fields (see _BEHIND_LUNG)."""
  if structure not in STRUCTURES:
    raise ValueError(f"unknown structure {structure!r}; known: {sorted(STRUCTURES)}")
  if anatomy.ndim == 3:
    return np.stack([structure_mask(a, structure) for a in anatomy])
  labels = [ANATOMY_NAMES.index(n) for n in STRUCTURES[structure]]
  if structure != "lungs":
    return np.isin(anatomy, labels).astype(np.uint8)
  hulls = np.zeros(anatomy.shape, np.uint8)
  for label in labels:
    ys, xs = np.nonzero(anatomy == label)
    if len(ys) >= 3:
      points = np.stack([xs, ys], 1).astype(np.int32)
      cv2.fillConvexPoly(hulls, cv2.convexHull(points), 1)
  behind = np.isin(anatomy, [ANATOMY_NAMES.index(n) for n in _BEHIND_LUNG])
  return (hulls.astype(bool) & behind).astype(np.uint8)


FINDING_NAMES: tuple[str, ...] = (
  "nodule",
  "consolidation",
  "pleural_effusion",
  "cardiomegaly",
  "pneumothorax",
)
FINDING_PROB = 0.3
SPLITS: dict[str, int] = {"pretrain": 0, "labelled": 1}
DEFAULT_NUM_EXAMPLES: dict[str, int] = {"pretrain": 100_000, "labelled": 10_000}

(_BG, _SOFT, _ABD, _RLUNG, _LLUNG, _MED, _HEART, _TRACHEA, _SPINE, _RIBS, _CLAV,
 _HUM) = range(len(ANATOMY_NAMES))
_NODULE, _CONSOL, _EFFUSION, _CARDIO, _PTX = range(len(FINDING_NAMES))

# Internal tissue codes (tissue map only; mapped to anatomy labels by a LUT).
_T_BUBBLE = 12            # gastric air bubble -> abdomen
_T_PTX = (13, 14)         # pneumothorax air, right / left -> right_lung / left_lung

_SHIFT = 4                # fixed-point bits for cv2 drawing (sub-pixel geometry)
_ONE = 1 << _SHIFT

# ---------------------------------------------------------------- lookup tables
_TISSUE_TO_ANATOMY = np.arange(256, dtype=np.uint8)
_TISSUE_TO_ANATOMY[[_T_BUBBLE, *_T_PTX]] = (_ABD, _RLUNG, _LLUNG)

# Density ("brightness before exposure") of each tissue code. _D0 is a constant
# offset used by the multiplicative noise model and removed by the exposure mapping.
_D0 = 0.25
_BASE_LUT = np.zeros((1, 256), np.float32)
_BASE_LUT[0, [_SOFT, _ABD, _RLUNG, _LLUNG, _MED, _HEART, _TRACHEA, _T_BUBBLE, *_T_PTX]] = (
  0.36, 0.46, 0.16, 0.16, 0.6, 0.64, 0.42, 0.26, 0.02, 0.02)
_BASE_LUT += _D0
# Additive layer (bones, vessels, pleural line): uint8 -> density.
_ADD_SCALE = 0.16
_ADD_LUT = (np.arange(256, dtype=np.float32) * np.float32(_ADD_SCALE / 255.0)).reshape(1, 256)
# Visibility of the additive layer through dense tissue (bones fade behind the heart).
_VIS_LUT = np.full((1, 256), 255, np.uint8)
_VIS_LUT[0, [_BG, _MED, _HEART, _ABD, _T_BUBBLE]] = (0, 130, 75, 150, 150)
_FILM_MAX = 1.25

# Drawing values in the additive layer (units of _ADD_SCALE / 255).
_V_RIB, _V_RIB_IN = 255, 200
_V_ANT = 110
_V_SCAPULA = 45
_V_COLUMN, _V_VERT, _V_PED = 70, 100, 150
_V_CLAV, _V_CLAV_IN = 235, 195
_V_HUM = 190
_V_VESSEL = (110, 150, 170, 220)  # thin, medium, thick, hilum (half-res canvas)

# Constant parameter grids.
_CIRC16 = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
_CAP_T = np.linspace(0.0, 1.0, 10)
_LAT_T = np.linspace(0.0, 1.0, 28) ** 1.3
_DOME_T = np.linspace(0.0, 1.0, 18)
_HEART_TH = np.linspace(-0.5 * np.pi, 0.5 * np.pi, 24)
_HUM_TH = np.linspace(-0.35 * np.pi, 1.35 * np.pi, 20)
# humeral head + neck and scapula outlines relative to the humeral head position
_HUM_D = np.concatenate([0.012 + 0.05 * np.cos(_HUM_TH), [0.06, 0.068, 0.028, -0.004]])
_HUM_Y = np.concatenate([-0.05 * np.sin(_HUM_TH), [0.04, 0.1, 0.1, 0.04]])
_SCAP_D = np.array([-0.05, -0.16, -0.15, -0.1, -0.045])
_SCAP_Y = np.array([-0.03, -0.055, 0.06, 0.24, 0.05])
_ABD_T = np.linspace(1.0, 0.0, 24)
_VERT_D = np.array([-1.0, -0.93, -1.0, 1.0, 0.93, 1.0])
_VERT_Y = np.array([0.0, 0.5, 1.0, 1.0, 0.5, 0.0])
_RIB_K = np.arange(10, dtype=np.float64)[:, None]


@functools.lru_cache(maxsize=None)
def _film_lut_q(knee_q: int, gamma_q: int) -> np.ndarray:
  knee, gamma = knee_q / 200.0, gamma_q / 100.0
  x = np.arange(256, dtype=np.float64) * (_FILM_MAX / 255.0)
  w = 1.0 - knee
  y = np.where(x < knee, x, knee + w * (1.0 - np.exp(-(x - knee) / w)))
  lut = np.round(255.0 * np.minimum(y, 1.0) ** gamma).astype(np.uint8)
  lut.flags.writeable = False
  return lut


def _film_lut(knee: float, gamma: float) -> np.ndarray:
  """Film characteristic curve: linear up to ``knee``, exponential shoulder, then gamma.

  Parameters are quantised (knee to 0.005, gamma to 0.01) so the tables can be cached.
  """
  return _film_lut_q(int(round(knee * 200.0)), int(round(gamma * 100.0)))


def _u8_to_f32(scale: float) -> np.ndarray:
  return (np.arange(256, dtype=np.float32) * np.float32(scale / 255.0)).reshape(1, 256)


# ----------------------------------------------------------------------- helpers
def _clip01(x):
  """Clip to [0, 1] (np.clip has a large per-call overhead on small arrays)."""
  return np.minimum(np.maximum(x, 0.0), 1.0)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
  if sigma <= 0.05:
    return img
  k = 2 * int(math.ceil(2.0 * sigma)) + 1
  return cv2.GaussianBlur(img, (k, k), sigma, borderType=cv2.BORDER_REPLICATE)


def _sp(d, y, s) -> np.ndarray:
  """Patient coordinates (distance d from the midline, height y) -> image (x, y).

  ``s`` is the side: -1 = patient right (image left), +1 = patient left. ``d`` and
  ``y`` broadcast against each other.
  """
  d = np.asarray(d, np.float64)
  y = np.asarray(y, np.float64)
  if d.shape == y.shape and isinstance(s, float):
    shape = d.shape
  else:
    shape = np.broadcast_shapes(d.shape, y.shape, np.shape(s))
  out = np.empty(shape + (2,))
  out[..., 0] = 0.5 + s * d
  out[..., 1] = y
  return out


def _band(center: np.ndarray, half_widths) -> list[np.ndarray]:
  """Outline polygons of bands of the given half widths around centre lines [..., T, 2]."""
  tang = np.empty_like(center)
  tang[..., 1:-1, :] = center[..., 2:, :] - center[..., :-2, :]
  tang[..., 0, :] = center[..., 1, :] - center[..., 0, :]
  tang[..., -1, :] = center[..., -1, :] - center[..., -2, :]
  tang /= np.sqrt((tang ** 2).sum(-1, keepdims=True)) + 1e-12
  normal = np.stack([-tang[..., 1], tang[..., 0]], axis=-1)
  out = []
  for hw in half_widths:
    off = normal * np.asarray(hw)[..., None]
    out.append(np.concatenate([center + off, (center - off)[..., ::-1, :]], axis=-2))
  return out


class _Geo:
  """Per-sample affine map from normalised patient space to pixels."""

  def __init__(self, p: dict[str, Any], size: int):
    self.size = size
    c, s = math.cos(p["rot"]), math.sin(p["rot"])
    sc = p["scale"]
    self.scale = sc
    self.lin = np.array([[c * sc, -s * sc], [s * sc, c * sc]])
    self.off = np.array([0.5 + p["tx"], 0.5 + p["ty"]]) - self.lin @ np.array([0.5, 0.5])
    self._mats: dict[tuple[int, bool], np.ndarray] = {}

  def _mat(self, size: int, fixed: bool) -> np.ndarray:
    key = (size, fixed)
    m = self._mats.get(key)
    if m is None:
      f = _ONE if fixed else 1.0
      m = np.concatenate([self.lin * (size * f), ((self.off * size - 0.5) * f)[:, None]], 1)
      self._mats[key] = m
    return m

  def pxf(self, pts: np.ndarray, size: int | None = None) -> np.ndarray:
    """Normalised points [..., 2] -> float pixel coordinates (pixel centres at integers)."""
    pts = np.ascontiguousarray(pts, np.float64)
    q = cv2.transform(pts.reshape(-1, 1, 2), self._mat(size or self.size, False))
    return q.reshape(pts.shape)

  def px(self, pts: np.ndarray, size: int | None = None) -> np.ndarray:
    """Normalised points [..., 2] -> fixed-point int32 pixel coordinates (shift=_SHIFT)."""
    pts = np.ascontiguousarray(pts, np.float64)
    q = cv2.transform(pts.reshape(-1, 1, 2), self._mat(size or self.size, True))
    return np.rint(q).astype(np.int32).reshape(pts.shape)

  def px_many(self, arrays, size: int | None = None) -> list[np.ndarray]:
    """``px`` of several point arrays with a single transform call."""
    flat = np.concatenate([np.reshape(a, (-1, 2)) for a in arrays])
    q = self.px(flat, size)
    out, i = [], 0
    for a in arrays:
      n = a.size // 2
      out.append(q[i:i + n].reshape(a.shape))
      i += n
    return out

  def length(self, v: float, size: int | None = None) -> float:
    return v * self.scale * (size or self.size)


def _fill(img, polys, value):
  """Fill polygon(s): an int32 array [N, K, 2] / [K, 2] or a list of [K, 2] arrays."""
  if isinstance(polys, np.ndarray) and polys.ndim == 2:
    polys = polys[None]
  cv2.fillPoly(img, polys, value, cv2.LINE_8, _SHIFT)


def _lines(img, lines, value, thick, closed=False):
  if isinstance(lines, np.ndarray) and lines.ndim == 2:
    lines = lines[None]
  cv2.polylines(img, lines, closed, value, max(1, int(round(thick))), cv2.LINE_8, _SHIFT)


# --------------------------------------------------------------- patient sampling
_PATIENT_RANGES: tuple[tuple[str, float, float], ...] = (
  ("scale", 0.90, 1.03), ("y_apex", 0.085, 0.125), ("insp", 0.0, 1.0), ("insp_j", -0.015, 0.015),
  ("dome_l", 0.01, 0.04), ("d_peak_r", 0.17, 0.22), ("d_peak_l", 0.18, 0.23),
  ("cp_drop_r", 0.06, 0.09), ("cp_drop_l", 0.06, 0.09), ("W", 0.35, 0.41),
  ("W_r", -0.008, 0.008), ("W_l", -0.008, 0.008), ("d_apex_r", 0.14, 0.17),
  ("d_apex_l", 0.14, 0.17), ("st", 0.02, 0.075), ("heart_r", 0.075, 0.105),
  ("heart_l", 0.19, 0.245), ("heart_dx", -0.01, 0.01), ("heart_top", 0.42, 0.5),
  ("med_w", 0.9, 1.15), ("carina", 0.28, 0.32), ("y_clav", 0.075, 0.11),
  ("clav_lat", 0.01, 0.045), ("rib_sp", 0.95, 1.05), ("rib_drop", 0.04, 0.065),
  ("rib_rise", 0.045, 0.075), ("rib_w", 0.0075, 0.0092), ("hum_d", 0.415, 0.445),
  ("hum_y", 0.06, 0.1), ("arms", 0.0, 1.0), ("breast", 0.0, 1.0), ("breast_y", 0.62, 0.75),
  ("bubble", 0.0, 1.0), ("zone", 0.2, 0.35), ("gain", 0.92, 1.12), ("offset", -0.03, 0.03),
  ("gamma", 0.8, 1.25), ("knee", 0.68, 0.8), ("heel", -0.12, 0.12), ("noise", 0.01, 0.024),
  ("blur", 0.45, 0.95),
)
_PR_LO = np.array([r[1] for r in _PATIENT_RANGES])
_PR_HI = np.array([r[2] for r in _PATIENT_RANGES])


def _sample_patient(rng: np.random.Generator) -> dict[str, Any]:
  """Random patient / film parameters (normalised units, see _PATIENT_RANGES)."""
  p: dict[str, Any] = dict(zip([r[0] for r in _PATIENT_RANGES],
                 rng.uniform(_PR_LO, _PR_HI).tolist()))
  rot, tx, ty = rng.normal(0.0, 1.0, 3).tolist()
  p["rot"] = math.radians(min(max(1.6 * rot, -4.5), 4.5))
  p["tx"] = min(max(0.015 * tx, -0.04), 0.04)
  p["ty"] = min(max(0.015 * ty, -0.04), 0.04)
  y_r = 0.59 + 0.11 * p["insp"] + p["insp_j"]            # inspiration depth
  p["y_peak"] = (y_r, y_r + p["dome_l"])                  # right dome higher
  p["d_peak"] = (p["d_peak_r"], p["d_peak_l"])
  p["cp_drop"] = (p["cp_drop_r"], p["cp_drop_l"])
  p["W"] = (p["W"] + p["W_r"], p["W"] + p["W_l"])
  p["d_apex"] = (p["d_apex_r"], p["d_apex_l"])
  p["y_clav"] += p["y_apex"]
  p["clav_lat"] += p["y_apex"]
  p["hum_y"] += p["y_apex"]
  p["arms"] = p["arms"] < 0.5
  p["breast"] = p["breast"] < 0.35
  p["bubble"] = p["bubble"] < 0.8
  p["noise_off"] = tuple(rng.integers(0, 1 << 30, 2).tolist())
  return p


def _sample_findings(rng: np.random.Generator) -> np.ndarray:
  return (rng.uniform(size=len(FINDING_NAMES)) < FINDING_PROB).astype(np.uint8)


# ---------------------------------------------------------------------- geometry
def _lat_w(y, y_apex, y_cp, d0, W):
  t = _clip01((y - y_apex) / (y_cp - y_apex))
  w = d0 + (W - d0) * (1.0 - (1.0 - t) ** 1.8)
  return w - 0.012 * _clip01((t - 0.85) / 0.15) ** 2


def _lateral_w(p, i: int, y) -> np.ndarray:
  """Half-width of lung i (inner rib cage) at height y."""
  return _lat_w(np.asarray(y), p["y_apex"], p["y_peak"][i] + p["cp_drop"][i],
         p["d_apex"][i], p["W"][i])


def _dome_y(p, i: int, d) -> np.ndarray:
  """Diaphragm height at distance d (>= 0) from the midline on side i."""
  yp, dp, cp = p["y_peak"][i], p["d_peak"][i], p["cp_drop"][i]
  a_lat = cp / (p["W"][i] - 0.012 - dp) ** 2     # reaches the costophrenic angle at the wall
  a_med = 0.035 / (dp - 0.05) ** 2
  u = np.asarray(d, np.float64) - dp
  m = np.minimum(u, 0.0)
  m = np.maximum(m, 0.05 - dp)
  lat = np.minimum(a_lat * u * u, cp + 0.06)
  return yp + np.where(u >= 0.0, lat, a_med * m * m)


def _dome_x(p, x) -> np.ndarray:
  """Diaphragm height as a function of normalised image x (both sides)."""
  d = np.asarray(x) - 0.5
  ad = np.abs(d)
  return np.where(d < 0, _dome_y(p, 0, ad), _dome_y(p, 1, ad))


_CAP_Y = 0.075 * (1.0 - _CAP_T) ** 2
_HEART_C = np.cos(_HEART_TH).clip(0.0, 1.0)
_HEART_CR, _HEART_CL = _HEART_C ** 0.8, _HEART_C ** 0.62
_HEART_S = np.sin(_HEART_TH)
_HEART_UP = _HEART_TH < 0


def _lung_outlines(p) -> np.ndarray:
  """Outlines of both lungs [2, N, 2] (0 = patient right = image left)."""
  y_apex = p["y_apex"]
  d_apex = np.array(p["d_apex"])[:, None]
  W = np.array(p["W"])[:, None]
  y_cp = (np.array(p["y_peak"]) + np.array(p["cp_drop"]))[:, None]
  ly = y_apex + (y_cp - y_apex) * _LAT_T                          # [2, 28]
  ld = _lat_w(ly, y_apex, y_cp, d_apex, W)
  dd = ld[:, -1:] + (0.05 - ld[:, -1:]) * _DOME_T                 # [2, 18]
  n_cap, n_lat, n_dome = _CAP_T.size, ly.shape[1] - 1, dd.shape[1] - 1
  out = np.empty((2, n_cap + n_lat + n_dome + 1, 2))
  d = out[..., 0]
  y = out[..., 1]
  d[:, :n_cap] = 0.055 + (d_apex - 0.055) * _CAP_T
  y[:, :n_cap] = y_apex + _CAP_Y
  d[:, n_cap:n_cap + n_lat] = ld[:, 1:]
  y[:, n_cap:n_cap + n_lat] = ly[:, 1:]
  d[:, n_cap + n_lat:-1] = dd[:, 1:]
  y[0, n_cap + n_lat:-1] = _dome_y(p, 0, dd[0, 1:])
  y[1, n_cap + n_lat:-1] = _dome_y(p, 1, dd[1, 1:])
  d[:, -1] = 0.05
  y[:, -1] = y_apex + 0.075
  out[0, :, 0] = 0.5 - d[0]
  out[1, :, 0] = 0.5 + d[1]
  return out


def _heart_outline(p, ctr_target: float | None = None):
  """Heart silhouette and the height of its widest level.

  Right border (image left) at distance R from the midline, left-ventricle border at
  L; the lower part is cut by the diaphragm so the heart sits on the domes. With
  ``ctr_target`` the heart is scaled to that cardiothoracic ratio (cardiomegaly).
  """
  R, L = p["heart_r"], p["heart_l"]
  y_d = 0.5 * (p["y_peak"][0] + p["y_peak"][1])
  y_t = p["y_apex"] + p["heart_top"] * (y_d - p["y_apex"])
  if ctr_target is not None:
    f = ctr_target * (p["W"][0] + p["W"][1]) / (R + L)
    R, L = R * f, L * f
    y_t -= 0.03 * (f - 1.0)
  n = _HEART_TH.size
  out = np.empty((2 * n, 2))
  cx = 0.5 + p["heart_dx"]
  for sl, width, frac, cexp in ((slice(0, n), -R, 0.68, _HEART_CR), (slice(2 * n - 1, n - 1, -1), L, 0.8, _HEART_CL)):
    yc = y_t + frac * (y_d - y_t)
    out[sl, 0] = cx + width * cexp
    out[sl, 1] = yc + np.where(_HEART_UP, yc - y_t, (y_d - yc) + 0.09) * _HEART_S
  out[:, 1] = np.minimum(out[:, 1], _dome_x(p, out[:, 0]) + 0.004)
  return out, y_t + 0.68 * (y_d - y_t)


def _mediastinum_outline(p, heart_cy: float) -> np.ndarray:
  mw = p["med_w"]
  top = p["y_apex"] - 0.03
  y_ak = p["carina"] - 0.04
  right = _sp(np.array([0.058, 0.062, 0.068, 0.075, 0.085]) * mw,
        np.array([top, 0.2, y_ak + 0.05, y_ak + 0.12, heart_cy]), -1.0)
  left = _sp(np.array([0.09, 0.08, 0.072, 0.095, 0.085, 0.09, 0.083, 0.055]) * mw,
        np.array([heart_cy, y_ak + 0.12, y_ak + 0.09, y_ak + 0.02, y_ak - 0.01,
             y_ak - 0.035, y_ak - 0.07, top]), 1.0)
  return np.concatenate([right, left])


def _body_outline(p, with_arms: bool) -> np.ndarray:
  wb = max(p["W"]) + p["st"]
  sh = p["hum_y"] - 0.05
  ds = max(wb + 0.06, p["hum_d"] + 0.075)   # shoulder encloses the humeral head
  d = [0.12, 0.125, 0.2, 0.32, ds - 0.03, ds]
  y = [-0.2, 0.02, 0.065, sh - 0.02, sh + 0.005, sh + 0.05]
  if with_arms and p["arms"]:   # arms alongside the chest: soft tissue to the edges
    d += [0.58, 0.64, 0.64]
    y += [sh + 0.08, sh + 0.2, 1.2]
  else:                         # arms abducted: air lateral to the chest wall
    if with_arms:
      d += [ds + 0.04, ds + 0.02, wb + 0.03]
      y += [sh + 0.1, sh + 0.15, sh + 0.18]
    d += [wb, wb, wb - 0.03]
    y += [sh + 0.24, 0.75, 1.2]
  d, y = np.array(d), np.array(y)
  return np.concatenate([_sp(d, y, -1.0), _sp(d[::-1], y[::-1], 1.0)])


def _abdomen_outline(p) -> np.ndarray:
  wb = max(p["W"]) + 0.5 * p["st"] - 0.035
  dd = wb * _ABD_T
  lift = 0.05 * _clip01((0.07 - dd) / 0.02)  # fill in under the heart
  right = _sp(dd, _dome_y(p, 0, dd) - lift, -1.0)
  left = _sp(dd[::-1], (_dome_y(p, 1, dd) - lift)[::-1], 1.0)
  bottom = np.array([[0.5 + wb, 1.2], [0.5 - wb, 1.2]])
  return np.concatenate([right, left, bottom])


_SIDES3 = np.array([-1.0, 1.0])[:, None, None]


_RIB_TEMPLATES: dict[int, dict[str, np.ndarray]] = {}


def _rib_template(T: int) -> dict[str, np.ndarray]:
  tpl = _RIB_TEMPLATES.get(T)
  if tpl is None:
    t = np.linspace(0.0, 1.0, T)
    k = _RIB_K
    tpl = {
      "t": t, "t095": t ** 0.95, "t3": t ** 3, "t115": t ** 1.15, "sin": np.sin(np.pi * t),
      "hw_post": ((1.0 + 0.04 * k) * np.minimum(1.0, 0.55 + 3.0 * t) * (1.0 - 0.3 * t ** 8)),
      "hw_ant": np.broadcast_to(0.0125 * (1.0 - 0.6 * t ** 3) * np.minimum(1.0, 0.4 + 2.5 * t),
                   (14, T)).copy(),
      "drop_k": 1.0 + 0.035 * k, "rise_k": 1.0 - 0.04 * k, "pos_k": k + 0.02 * k ** 2,
      "d_end": 0.085 + 0.018 * k[:7], "slope": 0.42 + 0.04 * k[:7],
    }
    _RIB_TEMPLATES[T] = tpl
  return tpl


def _ribs(p, T: int):
  """Rib centre lines, both sides: posterior [20, T, 2], anterior [14, T, 2], + half widths."""
  tp = _rib_template(T)
  drop = p["rib_drop"] * tp["drop_k"]                 # [10, 1]
  rise = p["rib_rise"] * tp["rise_k"]
  y_first = p["y_apex"] - 0.012
  # spacing such that the 9th rib's lateral end reaches the costophrenic angle
  y_cp = 0.5 * (p["y_peak"][0] + p["y_peak"][1] + p["cp_drop"][0] + p["cp_drop"][1])
  sp = p["rib_sp"] * (y_cp + 0.005 - y_first - drop[9, 0]) / (9.0 + 0.02 * 81.0)
  y0 = y_first + sp * tp["pos_k"]
  y_lat = y0 + drop                                  # [10, 1]
  d_lat = np.concatenate([_lateral_w(p, 0, y_lat), _lateral_w(p, 1, y_lat)]) + 0.008  # [20, 1]
  d0 = 0.028
  post = np.empty((20, T, 2))
  dd = d0 + (d_lat - d0) * tp["t095"]                # [20, T]
  yy = y0 - rise * tp["t"] + (drop + rise) * tp["t3"]  # [10, T]
  post[:10, :, 0] = 0.5 - dd[:10]
  post[10:, :, 0] = 0.5 + dd[10:]
  post[:10, :, 1] = yy
  post[10:, :, 1] = yy
  hw_post = np.concatenate([tp["hw_post"], tp["hw_post"]]) * p["rib_w"]
  d_l = np.concatenate([d_lat[:7], d_lat[10:17]])    # [14, 1]
  y_l = np.concatenate([y_lat[:7], y_lat[:7]])
  d_end = np.concatenate([tp["d_end"], tp["d_end"]])
  slope = np.concatenate([tp["slope"], tp["slope"]])
  da = d_l - 0.006 + (d_end - d_l + 0.006) * tp["t"]
  ant = np.empty((14, T, 2))
  ant[:7, :, 0] = 0.5 - da[:7]
  ant[7:, :, 0] = 0.5 + da[7:]
  ant[..., 1] = y_l + slope * (d_l - d_end) * tp["t115"] - 0.012 * tp["sin"]
  return post, hw_post, ant, tp["hw_ant"]


def _spine_template():
  """Spine drawn with unit vertical scale: (d, y_rel) of vertebral bodies and pedicles."""
  j = np.arange(30, dtype=np.float64)[:, None]
  h = 0.033 + 0.0021 * j
  y = np.concatenate([[[0.0]], np.cumsum(h)[:-1, None]])
  hw = 0.029 + 0.0011 * j
  g = 0.18 * h
  y1, hh = y + 0.5 * g, h - g
  c6 = np.linspace(0.0, 2.0 * np.pi, 6, endpoint=False)
  verts = _sp(_VERT_D * hw, y1 + _VERT_Y * hh, 1.0)
  ped_d, ped_y = 0.6 * hw + 0.22 * hw * np.cos(c6), y1 + 0.32 * hh + 0.24 * hh * np.sin(c6)
  peds = np.stack([_sp(ped_d, ped_y, -1.0), _sp(ped_d, ped_y, 1.0)], 1)   # [30, 2, 6, 2]
  return y[:, 0], verts, peds


_SPINE_T = _spine_template()


def _spine(p):
  """Vertebral bodies [N, 6, 2] and pedicles [2N, 6, 2]."""
  hs = 0.95 + 0.25 * (p["y_peak"][0] - 0.59) / 0.11     # taller vertebrae with deep inspiration
  y_start, verts, peds = _SPINE_T
  n = int(np.count_nonzero(y_start * hs < 1.18))
  out = []
  for a in (verts[:n], peds[:n].reshape(2 * n, 6, 2)):
    a = a.copy()
    a[..., 1] *= hs
    a[..., 1] -= 0.03
    out.append(a)
  return out


_VESSEL_BANK_SIZE = 1024


@functools.lru_cache(maxsize=1)
def _vessel_bank() -> tuple[np.ndarray, np.ndarray]:
  """Pre-generated branching vessel trees in lung-relative units.

  Hilum at the origin, +x lateral, +y caudal, unit = lung height. Returns primaries
  [B, 8, 7, 2] and secondary branches [B, 16, 4, 2]. Generated once per process from
  a fixed seed (so items stay deterministic); each item picks one tree per lung.
  """
  rng = np.random.default_rng(0x7E55E1)
  B, n_p, steps, n_s = _VESSEL_BANK_SIZE, 8, 6, 16
  ang = np.linspace(-1.35, 1.25, n_p)[None, :] + rng.normal(0, 0.12, (B, n_p))
  th = ang[..., None] + rng.normal(0, 0.22, (B, n_p, steps)).cumsum(axis=-1)
  step = 0.08 * rng.uniform(0.75, 1.15, (B, n_p, steps))
  prim = np.zeros((B, n_p, steps + 1, 2))
  prim[..., 1:, 0] = (np.cos(th) * step).cumsum(axis=-1)
  prim[..., 1:, 1] = (np.sin(th) * step).cumsum(axis=-1)
  roots = prim[:, :, 2:4].reshape(B, n_s, 2)
  sign = np.where(rng.uniform(size=(B, n_s)) < 0.5, -1.0, 1.0)
  th2 = (th[:, :, 1:3].reshape(B, n_s) + sign * rng.uniform(0.4, 0.8, (B, n_s)))[..., None] \
    + rng.normal(0, 0.2, (B, n_s, 3)).cumsum(-1)
  st2 = 0.055 * rng.uniform(0.7, 1.2, (B, n_s, 3))
  sec = np.empty((B, n_s, 4, 2))
  sec[:, :, 0] = roots
  sec[:, :, 1:, 0] = roots[..., :1] + (np.cos(th2) * st2).cumsum(-1)
  sec[:, :, 1:, 1] = roots[..., 1:] + (np.sin(th2) * st2).cumsum(-1)
  return prim, sec


def _vessels(rng: np.random.Generator, hil_x: np.ndarray, hil_y: np.ndarray, lung_h: np.ndarray):
  """Vessel trees of both lungs: primaries [16, 7, 2] and secondaries [32, 4, 2].

  ``hil_x``, ``hil_y``, ``lung_h``: per-side [2] hilum position and lung height.
  """
  bank_p, bank_s = _vessel_bank()
  k = rng.integers(0, _VESSEL_BANK_SIZE, 2)
  scale = np.stack([lung_h * np.array([-1.0, 1.0]), lung_h], -1)[:, None, None, :]  # [2,1,1,2]
  origin = np.stack([hil_x, hil_y], -1)[:, None, None, :]
  prim = bank_p[k] * scale + origin
  sec = bank_s[k] * scale + origin
  return prim.reshape(-1, prim.shape[2], 2), sec.reshape(-1, sec.shape[2], 2)


def cardiothoracic_ratio(anatomy: np.ndarray) -> float:
  """Cardiothoracic ratio measured on an anatomy label map.

  Maximal horizontal width of the heart divided by the horizontal extent of the
  lungs (outer border of the right lung to outer border of the left lung).
  """
  heart_cols = np.flatnonzero((anatomy == _HEART).any(axis=0))
  lung_cols = np.flatnonzero(((anatomy == _RLUNG) | (anatomy == _LLUNG)).any(axis=0))
  if heart_cols.size == 0 or lung_cols.size == 0:
    return float("nan")
  return float(heart_cols[-1] - heart_cols[0] + 1) / float(lung_cols[-1] - lung_cols[0] + 1)


# ------------------------------------------------------------------------ source
class SyntheticCXR:
  """Random-access source of synthetic PA chest radiographs (see module docstring).

  Args:
   split: "pretrain" (normal images) or "labelled" (with findings and their masks).
   image_size: side S of the square images, >= 32.
   num_examples: length of the source; defaults to ``DEFAULT_NUM_EXAMPLES[split]``
    (100_000 pretrain, 10_000 labelled). Items are procedural, so this only
    defines an epoch.
   seed: non-negative integer; item i is a pure function of (seed, split, i, S).
  """

  def __init__(self, split: str = "pretrain", image_size: int = 224,
         num_examples: int | None = None, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
      raise ValueError(f"image_size must be an int, got {image_size!r}")
    if image_size < 32:
      raise ValueError(f"image_size must be >= 32, got {image_size}")
    if num_examples is None:
      num_examples = DEFAULT_NUM_EXAMPLES[split]
    if (isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer))
        or num_examples < 1):
      raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    self.split = split
    self.image_size = int(image_size)
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self._cache: dict[str, Any] | None = None

  # Pickling: the lazily built per-size cache is dropped and rebuilt on demand.
  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_cache"] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)

  def __repr__(self) -> str:
    return (f"SyntheticCXR(split={self.split!r}, image_size={self.image_size}, "
        f"num_examples={self.num_examples}, seed={self.seed})")

  def __len__(self) -> int:
    return self.num_examples

  @property
  def anatomy_names(self) -> tuple[str, ...]:
    return ANATOMY_NAMES

  @property
  def finding_names(self) -> tuple[str, ...]:
    return FINDING_NAMES if self.split == "labelled" else ()

  def _get_cache(self) -> dict[str, Any]:
    if self._cache is None:
      S = self.image_size
      lo = max(16, S // 8)
      # Fixed noise texture (independent of seed), cropped at a random offset per
      # item: much cheaper than drawing S*S normals per item.
      noise = np.random.default_rng(0x5C7A).standard_normal((2 * S, 2 * S), np.float32)
      noise = cv2.GaussianBlur(noise, (3, 3), 0.45)
      noise *= np.float32(1.0 / noise.std())
      self._cache = {
        "lo": lo,
        "ylo": ((np.arange(lo, dtype=np.float64) + 0.5) / lo)[:, None],
        "noise": noise,
        "ones": np.ones((S, S), np.float32),
        "ribs_const": np.full((S, S), _RIBS, np.uint8),
        "t_band": np.linspace(0.0, 1.0, 8 if S <= 256 else 14),
      }
    return self._cache

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"index must be an integer, got {type(index).__name__}")
    n = self.num_examples
    idx = int(index)
    if idx < 0:
      idx += n
    if not 0 <= idx < n:
      raise IndexError(f"index {int(index)} out of range for SyntheticCXR of length {n}")
    rng = np.random.default_rng([self.seed, SPLITS[self.split], idx])
    p = _sample_patient(rng)
    findings = _sample_findings(rng) if self.split == "labelled" else None
    out = _render(p, findings, rng, self.image_size, self._get_cache())
    out["index"] = np.int64(idx)
    return out


# --------------------------------------------------------------------- rendering
def _render(p, findings, rng, S, cache) -> dict[str, np.ndarray]:
  geo = _Geo(p, S)
  lo = cache["lo"]
  labelled = findings is not None
  has = (lambda f: bool(findings[f])) if labelled else (lambda f: False)

  # ------------------------------------------------------------ geometry
  ctr = rng.uniform(0.56, 0.68) if has(_CARDIO) else None
  heart, heart_yc = _heart_outline(p, ctr)
  lungs = _lung_outlines(p)
  med = _mediastinum_outline(p, heart_yc)
  body = _body_outline(p, with_arms=True)
  abdomen = _abdomen_outline(p)
  carina = p["carina"]
  trachea = _sp(np.array([0.0, -0.004, 0.0, 0.0]), np.array([-0.1, 0.15, carina - 0.06, carina]), 1.0)
  bronchi = _sp(np.array([[0.0, -0.04, -0.075], [0.0, 0.05, 0.095]]),
         carina + np.array([[0.0, 0.035, 0.075], [0.0, 0.03, 0.085]]), 1.0)
  body_px, abd_px, med_px, heart_px, lung_px, trachea_px, bronchi_px = geo.px_many(
    [body, abdomen, med, heart, lungs, trachea, bronchi])

  # ------------------------------------------------------------ tissue map
  tissue = np.zeros((S, S), np.uint8)
  _fill(tissue, [body_px], _SOFT)
  _fill(tissue, [abd_px], _ABD)
  if p["bubble"]:
    dpk = p["d_peak"][1] + 0.02
    c = geo.px(np.array([[0.5 + dpk, float(_dome_y(p, 1, dpk)) + 0.045]]))[0]
    ax = (int(geo.length(0.06) * _ONE), int(geo.length(0.03) * _ONE))
    cv2.ellipse(tissue, (int(c[0]), int(c[1])), ax, math.degrees(p["rot"]), 180, 360,
          _T_BUBBLE, -1, cv2.LINE_8, _SHIFT)
  ptx_side, pleural_px = None, None
  if has(_PTX):
    ptx_side, inner, pleural = _pneumothorax_geometry(p, rng, lungs)
    pleural_px = geo.px(pleural) if pleural is not None else None
  for i in (0, 1):
    if i == ptx_side:
      _fill(tissue, [lung_px[i]], _T_PTX[i])
      _fill(tissue, [geo.px(inner)], (_RLUNG, _LLUNG)[i])
    else:
      _fill(tissue, [lung_px[i]], (_RLUNG, _LLUNG)[i])
  _fill(tissue, med_px, _MED)
  _fill(tissue, heart_px, _HEART)
  _lines(tissue, trachea_px, _TRACHEA, geo.length(0.032))
  _lines(tissue, bronchi_px, _TRACHEA, geo.length(0.02))

  # ------------------------------------------------------------ bones
  t_band = cache["t_band"]
  post_c, post_hw, ant_c, ant_hw = _ribs(p, t_band.size)
  clav_c = _sp(0.02 + 0.31 * t_band,
         p["y_clav"] + (p["clav_lat"] - p["y_clav"]) * t_band
         + 0.014 * np.sin(2 * np.pi * t_band), _SIDES3[:, :, 0])
  clav_hw = np.broadcast_to(0.0115 * (1.25 - 0.35 * t_band), (2, t_band.size))
  # all bands (20 posterior ribs, 14 anterior ribs, 2 clavicles) at once: outer + inner
  centers = np.concatenate([post_c, ant_c, clav_c])
  hws = np.concatenate([post_hw, ant_hw, clav_hw])
  outer, inner = (geo.px(b) for b in _band(centers, (hws, 0.45 * hws)))
  post_out, post_in = outer[:20], inner[:20]
  ant_out = outer[20:34]
  clav_out, clav_in = outer[34:], inner[34:]
  column = _sp(np.array([-0.031, -0.058, 0.058, 0.031]), np.array([-0.1, 1.2, 1.2, -0.1]), 1.0)
  hd, hy = p["hum_d"], p["hum_y"]
  scap = _sp(hd + _SCAP_D, hy + _SCAP_Y, _SIDES3[:, :, 0])
  hum = _sp(hd + _HUM_D, hy + _HUM_Y, _SIDES3[:, :, 0])
  verts, peds = _spine(p)
  column_px, scap_px, hum_px, verts_px, peds_px = geo.px_many([column, scap, hum, verts, peds])

  add = np.zeros((S, S), np.uint8)          # additive density layer
  _fill(add, scap_px, _V_SCAPULA)
  _fill(add, post_out, _V_RIB)
  _fill(add, post_in, _V_RIB_IN)
  rib_mask = cv2.inRange(add, _V_RIB_IN, 255)
  ant = np.zeros((S, S), np.uint8)
  _fill(ant, ant_out, _V_ANT)
  cv2.bitwise_or(rib_mask, cv2.inRange(ant, 1, 255), dst=rib_mask)
  cv2.add(add, ant, dst=add)
  _fill(add, column_px, _V_COLUMN)
  _fill(add, verts_px, _V_VERT)
  if S >= 128:                                # sub-pixel details skipped at small sizes
    _lines(add, peds_px, _V_PED, geo.length(0.004), closed=True)
  _fill(add, clav_out, _V_CLAV)
  _fill(add, clav_in, _V_CLAV_IN)
  _fill(add, hum_px, _V_HUM)

  # vessels: drawn at half resolution (cheap thin lines, soft when upsampled), kept
  # inside the aerated lungs only
  Sv = S // 2 if S >= 128 else S
  vess_v = np.zeros((Sv, Sv), np.uint8)
  lung_h = np.array([p["y_peak"][0] - p["y_apex"], p["y_peak"][1] - p["y_apex"]])
  hil_x = np.array([0.5 - 0.105, 0.5 + 0.11])
  hil_y = p["y_apex"] + np.array([0.5, 0.46]) * lung_h
  prim, sec = _vessels(rng, hil_x, hil_y, lung_h)
  sd = np.array([-1.0, 1.0])[:, None]
  hila = np.stack([hil_x[:, None] + sd * np.array([[-0.02, 0.01, 0.025]]),
           hil_y[:, None] + np.array([[-0.045, -0.01, 0.05]])], -1)
  v_thin1, v_thin2, v_med, v_thick, v_hila = geo.px_many(
    [prim[:, 4:], sec, prim[:, 2:5], prim[:, 0:3], hila], Sv)
  for arrs, value, thick in (((v_thin1, v_thin2), _V_VESSEL[0], 0.0045), ((v_med,), _V_VESSEL[1], 0.007),
                ((v_thick,), _V_VESSEL[2], 0.011), ((v_hila,), _V_VESSEL[3], 0.026)):
    for arr in arrs:
      _lines(vess_v, arr, value, geo.length(thick, Sv))
  if Sv == S:
    vess = vess_v
  elif 2 * Sv == S:
    vess = cv2.pyrUp(vess_v)
  else:
    vess = cv2.resize(vess_v, (S, S), interpolation=cv2.INTER_LINEAR)
  lung_mask = cv2.inRange(tissue, _RLUNG, _LLUNG)       # aerated lung (not pneumothorax)

  # ------------------------------------------------------------ anatomy labels
  anatomy = cv2.LUT(tissue, _TISSUE_TO_ANATOMY)
  cv2.copyTo(cache["ribs_const"], rib_mask, anatomy)
  _fill(anatomy, med_px, _MED)
  _fill(anatomy, column_px, _SPINE)
  _fill(anatomy, heart_px, _HEART)
  _lines(anatomy, trachea_px, _TRACHEA, geo.length(0.032))
  _lines(anatomy, bronchi_px, _TRACHEA, geo.length(0.02))
  _fill(anatomy, clav_out, _CLAV)
  _fill(anatomy, hum_px, _HUM)
  cv2.bitwise_and(anatomy, cv2.inRange(tissue, 1, 255), dst=anatomy)   # nothing outside the body

  # ------------------------------------------------------------ smooth low-res field
  ylo = cache["ylo"]
  torso_lo = np.zeros((lo, lo), np.float32)
  _fill(torso_lo, [geo.px(_body_outline(p, with_arms=False), lo)], 1.0)
  prof = _clip01(1.6 * _blur(torso_lo, 0.075 * lo) - 0.75)
  abd_lo = np.zeros((lo, lo), np.float32)
  _fill(abd_lo, [geo.px(abdomen, lo)], 1.0)
  lung_lo = np.zeros((lo, lo), np.float32)
  _fill(lung_lo, geo.px(lungs, lo), 1.0)
  lung_b = _blur(lung_lo, 0.035 * lo)
  interior = _clip01(2.0 * lung_b - 1.0)      # 0 at the lung border, ~1 inside
  y_mid = p["y_apex"] + 0.45 * (p["y_peak"][0] - p["y_apex"])
  zone = (1.0 - p["zone"] * _clip01((ylo - y_mid) / (p["y_peak"][0] - y_mid))
      - 0.2 * _clip01((p["y_apex"] + 0.12 - ylo) / 0.12))
  F = prof * (0.25 + p["heel"] * (ylo - 0.5))
  F += 0.15 * _blur(abd_lo, 0.03 * lo)
  F -= 0.22 * interior * zone
  if p["breast"]:
    br = np.zeros((lo, lo), np.float32)
    for s in (-1.0, 1.0):
      c = geo.px(np.array([[0.5 + s * 0.24, p["breast_y"]]]), lo)[0]
      ax = (int(geo.length(0.2, lo) * _ONE), int(geo.length(0.13, lo) * _ONE))
      cv2.ellipse(br, (int(c[0]), int(c[1])), ax, math.degrees(p["rot"]), 0, 360, 1.0, -1,
            cv2.LINE_8, _SHIFT)
    F += 0.07 * _blur(br, 0.02 * lo)
  F = F.astype(np.float32)

  # ------------------------------------------------------------ findings
  extra = None
  out_findings: dict[str, np.ndarray] = {}
  if labelled:
    extra = np.zeros((S, S), np.float32)
    ctx = dict(geo=geo, tissue=tissue, lungs=lungs, extra=extra)
    masks: dict[int, np.ndarray] = {}
    if has(_NODULE):
      masks[_NODULE] = _nodules(p, rng, ctx)
    if has(_CONSOL):
      masks[_CONSOL] = _consolidation(p, rng, ctx)
    if has(_EFFUSION):
      masks[_EFFUSION] = _effusion(p, rng, ctx)
    if has(_CARDIO):
      masks[_CARDIO] = cv2.inRange(tissue, _HEART, _HEART)
    if has(_PTX):
      masks[_PTX] = cv2.inRange(tissue, _T_PTX[ptx_side], _T_PTX[ptx_side])
    fm = np.zeros((S, S), np.uint8)
    boxes = np.zeros((len(FINDING_NAMES), 4), np.float32)
    for f, m in masks.items():
      if not cv2.countNonZero(m):         # (cannot happen in practice; keep consistent)
        findings[f] = 0
        continue
      fm |= (m & np.uint8(1 << f))
      boxes[f] = cv2.boundingRect(m)
      if f in (_NODULE, _CONSOL, _EFFUSION):  # opacities hide the vessels
        cv2.bitwise_and(vess, cv2.bitwise_not(m), dst=vess)
    out_findings = {"findings": findings.astype(np.uint8), "finding_masks": fm, "boxes": boxes}

  cv2.bitwise_and(vess, lung_mask, dst=vess)
  cv2.add(add, vess, dst=add)
  if pleural_px is not None:
    _lines(add, [pleural_px], 255, max(1.0, geo.length(0.0035)))
  cv2.multiply(add, cv2.LUT(tissue, _VIS_LUT), dst=add, scale=1.0 / 255.0)

  # ------------------------------------------------------------ density -> film
  D = cv2.LUT(tissue, _BASE_LUT)
  D += cv2.LUT(add, _ADD_LUT)
  D += cv2.resize(F, (S, S), interpolation=cv2.INTER_LINEAR)
  if extra is not None:
    D += extra
  D = _blur(D, p["blur"] * S / 224.0)
  # signal-dependent noise: D_true + sigma * n * (D_true + _D0) = D * (1 + sigma * n)
  nz = cache["noise"]
  ox, oy = p["noise_off"][0] % S, p["noise_off"][1] % S
  D *= cv2.scaleAdd(nz[oy:oy + S, ox:ox + S], p["noise"], cache["ones"])
  a = p["gain"] * 255.0 / _FILM_MAX
  img8 = cv2.convertScaleAbs(D, alpha=a, beta=(p["offset"] - _D0 * p["gain"]) * 255.0 / _FILM_MAX)
  image = cv2.LUT(img8, _film_lut(p["knee"], p["gamma"]))

  out = {"image": image, "anatomy": anatomy}
  out.update(out_findings)
  return out


# ---------------------------------------------------------------------- findings
_PROBES = np.concatenate([[[0.0, 0.0]], np.stack([np.cos(_CIRC16[::2]), np.sin(_CIRC16[::2])], -1)])


def _pick_in_lung(rng, ctx, i, d_range, y_frac, radius):
  """A point (normalised image coords) inside lung i with a disc of ``radius`` around it
  also inside the (aerated) lung; the best of 24 random candidates."""
  outline = ctx["lungs"][i]
  y_top, y_bot = outline[:, 1].min(), outline[:, 1].max()
  tissue, geo = ctx["tissue"], ctx["geo"]
  S = tissue.shape[0]
  n = 24
  pts = _sp(rng.uniform(d_range[0], d_range[1], n),
       y_top + (y_bot - y_top) * rng.uniform(y_frac[0], y_frac[1], n), -1.0 if i == 0 else 1.0)
  probes = pts[:, None, :] + radius * _PROBES[None]                 # [n, 9, 2]
  q = np.clip(np.rint(geo.pxf(probes)).astype(np.intp), 0, S - 1)
  inside = (tissue[q[..., 1], q[..., 0]] == (_RLUNG, _LLUNG)[i]).sum(1)
  return pts[int(np.argmax(inside))]


def _nodules(p, rng, ctx) -> np.ndarray:
  geo, extra = ctx["geo"], ctx["extra"]
  S = extra.shape[0]
  layer = np.zeros((S, S), np.uint8)
  for _ in range(int(rng.integers(1, 4))):
    i = int(rng.integers(0, 2))
    r = rng.uniform(0.014, 0.03)
    c = _pick_in_lung(rng, ctx, i, (0.12, 0.34), (0.15, 0.85), radius=r + 0.015)
    rr = r * (1.0 + rng.uniform(-0.07, 0.07, 16))
    poly = c + np.stack([rr * np.cos(_CIRC16), rr * np.sin(_CIRC16)], -1)
    _fill(layer, [geo.px(poly)], 200)
    _fill(layer, [geo.px(c + (poly - c) * 0.55)], 255)
    q = np.clip(np.rint(geo.pxf(c[None])).astype(int), 0, S - 1)[0]
    layer[q[1], q[0]] = 255                 # at least one pixel at tiny sizes
  amp = rng.uniform(0.75, 1.05)
  extra += cv2.LUT(layer, _u8_to_f32(0.36 * amp))
  return cv2.inRange(layer, 1, 255)


def _smooth_noise(rng, S, cells):
  n = rng.standard_normal((cells, cells)).astype(np.float32)
  return cv2.resize(n, (S, S), interpolation=cv2.INTER_CUBIC)


def _consolidation(p, rng, ctx) -> np.ndarray:
  geo, tissue, extra = ctx["geo"], ctx["tissue"], ctx["extra"]
  S = extra.shape[0]
  pp = geo.length(1.0)
  i = int(rng.integers(0, 2))
  s = -1.0 if i == 0 else 1.0
  zone = int(rng.choice(3, p=[0.2, 0.3, 0.5]))
  y_frac = ((0.18, 0.35), (0.4, 0.6), (0.62, 0.8))[zone]
  c = _pick_in_lung(rng, ctx, i, (0.14, 0.3), y_frac, radius=0.04)
  blob = np.zeros((S, S), np.uint8)
  for _ in range(int(rng.integers(3, 7))):
    q = geo.pxf((c + rng.normal(0, 0.045, 2))[None])[0]
    ax = rng.uniform(0.035, 0.08, 2) * pp
    cv2.ellipse(blob, (int(q[0] * _ONE), int(q[1] * _ONE)),
          (int(ax[0] * _ONE), int(ax[1] * _ONE)),
          float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_8, _SHIFT)
  field = _blur(cv2.LUT(blob, _u8_to_f32(1.0)), 0.02 * pp)
  field += 0.35 * _smooth_noise(rng, S, 10)
  lung_i = cv2.inRange(tissue, (_RLUNG, _LLUNG)[i], (_RLUNG, _LLUNG)[i])
  region = cv2.bitwise_and(cv2.inRange(field, 0.55, 1e9), lung_i)
  q = np.clip(np.rint(geo.pxf(c[None])).astype(int), 0, S - 1)[0]
  if not cv2.countNonZero(region):            # guarantee a visible patch at tiny sizes
    region[max(0, q[1] - 1):q[1] + 2, max(0, q[0] - 1):q[0] + 2] = 255
    cv2.bitwise_and(region, lung_i, dst=region)
    if not cv2.countNonZero(region):
      region[q[1], q[0]] = 255
  tex = 0.62 + 0.22 * _smooth_noise(rng, S, max(8, S // 7)) + 0.25 * (field - 0.55)
  # air bronchograms: dark branching tubes within the opacity
  lines = []
  for _ in range(int(rng.integers(2, 4))):
    a0 = rng.uniform(-0.9, 1.25)
    seg = rng.uniform(0.025, 0.04, 4)
    ang = a0 + rng.normal(0, 0.25, 4).cumsum()
    start = c + rng.normal(0, 0.02, 2) - np.array([s * 0.04, 0.0])
    steps = np.stack([s * np.cos(ang) * seg, np.sin(ang) * seg], -1).cumsum(0)
    lines.append(geo.px(np.concatenate([start[None], start + steps])))
  br = np.zeros((S, S), np.uint8)
  _lines(br, lines, 255, geo.length(0.006))
  tex -= cv2.LUT(br, _u8_to_f32(0.45))
  np.clip(tex, 0.12, 0.95, out=tex)
  tex *= _blur(cv2.LUT(region, _u8_to_f32(0.42)), 0.004 * pp)
  extra += tex
  return region


def _effusion(p, rng, ctx) -> np.ndarray:
  geo, tissue, extra = ctx["geo"], ctx["tissue"], ctx["extra"]
  S = extra.shape[0]
  pp = geo.length(1.0)
  sides = [0, 1] if rng.uniform() < 0.2 else [int(rng.integers(0, 2))]
  mask = np.zeros((S, S), np.uint8)
  for i in sides:
    s = -1.0 if i == 0 else 1.0
    h = rng.uniform(0.07, 0.2)
    W = p["W"][i]
    d = np.linspace(0.0, W + 0.05, 24)
    u = np.clip(d / W, 0.0, 1.2)
    ytop = p["y_peak"][i] + 0.01 - h * (0.2 + 0.8 * u ** 2.6)   # meniscus
    poly = np.concatenate([_sp(d, ytop, s), _sp(np.array([W + 0.05, 0.0]), np.array([1.3, 1.3]), s)])
    layer = np.zeros((S, S), np.uint8)
    _fill(layer, [geo.px(poly)], 255)
    lung_i = cv2.inRange(tissue, (_RLUNG, _LLUNG)[i], (_RLUNG, _LLUNG)[i])
    cv2.bitwise_and(layer, lung_i, dst=layer)
    cv2.bitwise_or(mask, layer, dst=mask)
    soft = cv2.LUT(_blur(layer, 0.012 * pp), _u8_to_f32(rng.uniform(0.42, 0.5)))
    extra += soft
  return mask


def _pneumothorax_geometry(p, rng, lungs):
  """Side, retracted lung outline and visceral pleural line of a pneumothorax."""
  i = int(rng.integers(0, 2))
  s = -1.0 if i == 0 else 1.0
  outline = lungs[i]
  lung_h = p["y_peak"][i] - p["y_apex"]
  hil = np.array([0.5 + s * 0.1, p["y_apex"] + 0.5 * lung_h])
  ad = np.abs(outline[:, 0] - 0.5)
  yf = (outline[:, 1] - p["y_apex"]) / lung_h
  w = np.clip(1.5 - 2.0 * yf, 0.0, 1.0) * np.clip((ad - 0.06) / 0.08, 0.0, 1.0)
  w = np.maximum(w, np.clip(1.0 - yf / 0.15, 0.0, 1.0))   # the whole apical cap
  depth = rng.uniform(0.04, 0.1)
  vec = hil - outline
  vec /= np.linalg.norm(vec, axis=1, keepdims=True) + 1e-9
  inner = outline + vec * (w * depth)[:, None]
  idx = np.flatnonzero(w > 0.15)
  pleural = inner[idx.min():idx.max() + 1] if idx.size >= 2 else None
  return i, inner, pleural
