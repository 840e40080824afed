"""Procedural frontal (PA) chest-radiograph phantom: the embedded data source ``synthetic_cxr``.

``SyntheticCXR`` is a Grain random-access data source (``__len__`` + ``__getitem__``)
that renders a synthetic chest radiograph on the fly. Nothing is read from or written
to disk; every item is a pure function of ``(seed, split, index, image_size)``, so
the same arguments give byte-identical output in any process and in any order.

Image conventions are those of a radiograph read as a PA film: air is dark, soft
tissue grey, bone and fluid bright; the patient's right side is on the image left.

Rendered structures
  body outline (neck, shoulders, arms, chest wall) against dark air; both lungs
  (dark, brighter towards the bases and the periphery) with faint branching vascular
  markings and hilar shadows; mediastinum with aortic knob; the heart, bulging to the
  image right; trachea and main bronchi (dark air column); the thoracic spine with
  vertebral bodies, discs, pedicles and spinous processes; posterior ribs (bright
  arcs descending laterally, with cortical margins) and fainter anterior ribs
  (sloping down medially); clavicles; humeral heads and faint scapulae; the
  diaphragm domes (right dome higher) and the bright abdomen below them with a
  gastric air bubble; optional breast shadows. The film then gets a slight blur,
  quantum-like noise and a random exposure curve (gain / offset / gamma / heel
  gradient).

Patient variation: body size and habitus, translation, a few degrees of rotation,
scale, inspiration depth (diaphragm height), heart size and position, clavicle
height, rib spacing, contrast and noise. Geometry is defined in normalised
coordinates and rasterised directly at ``image_size``, so small images are fast.

Anatomy labels (``ANATOMY_NAMES``; one label per pixel, later entries in the paint
order win): background < soft_tissue < abdomen < lungs < ribs < mediastinum < heart
< spine < trachea < clavicles < humeri. ``right_lung`` is the patient's right lung,
i.e. the lung on the image left.

Splits
  ``"pretrain"``: normal images only (no findings, no finding fields).
  ``"labelled"``: each of the five ``FINDING_NAMES`` appears independently with
  probability ``FINDING_PROB`` (about 17 % of images are normal):
    nodule            1-3 small, round, sharply marginated opacities inside a lung;
    consolidation     patchy, irregular, textured air-space opacity confined to a
                      lung zone, with air bronchograms;
    pleural_effusion  homogeneous basal opacity with a meniscus (concave upper
                      border, higher laterally), blunting the costophrenic angle;
    cardiomegaly      enlarged heart silhouette (cardiothoracic ratio > 0.5); the
                      anatomy map shows the enlarged heart;
    pneumothorax      apicolateral hyperlucent rim without vascular markings
                      (ribs remain visible), bounded by a thin visceral pleural line.

Item format (dict of numpy arrays)
  ``image``          uint8 [S, S]  greyscale radiograph
  ``anatomy``        uint8 [S, S]  index into ``ANATOMY_NAMES``
  ``index``          int64 []      the (non-negative) index of the item
  labelled split only:
  ``findings``       uint8 [5]     multi-hot over ``FINDING_NAMES``
  ``finding_masks``  uint8 [S, S]  bit field, bit f set where finding f is present
                                   (cardiomegaly: the whole enlarged heart)
  ``boxes``          float32 [5,4] (x, y, w, h) in pixels: bounding box of each
                                   finding's mask (w = x_max - x_min + 1), zeros
                                   when the finding is absent
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__ = [
    "ANATOMY_NAMES",
    "FINDING_NAMES",
    "FINDING_PROB",
    "SPLITS",
    "SyntheticCXR",
    "cardiothoracic_ratio",
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

_SHIFT = 4  # fixed-point bits for cv2 drawing (sub-pixel accurate geometry)
_ONE = 1 << _SHIFT

# Base "density" (brightness before exposure mapping) per tissue class.
_TISSUE_DENSITY = np.zeros((1, 256), np.float32)
_TISSUE_DENSITY[0, [_SOFT, _ABD, _RLUNG, _LLUNG, _MED, _HEART, _TRACHEA]] = (
    0.36, 0.46, 0.36, 0.36, 0.55, 0.58, 0.36)
_LUNG_LUT = np.zeros((1, 256), np.float32)
_LUNG_LUT[0, [_RLUNG, _LLUNG]] = 1.0
_BODY_LUT = np.zeros((1, 256), np.float32)
_BODY_LUT[0, 1:len(ANATOMY_NAMES)] = 1.0


def _u8_lut(scale: float) -> np.ndarray:
    return (np.arange(256, dtype=np.float32) * np.float32(scale / 255.0)).reshape(1, 256)


_BONE_LUT = _u8_lut(0.16)
_ANT_LUT = _u8_lut(0.07)
_VESSEL_LUT = _u8_lut(0.2)
# Bone visibility through dense tissue (the ribs and spine fade behind heart/abdomen).
_BONE_VIS_LUT = np.ones((1, 256), np.float32)
_BONE_VIS_LUT[0, [_MED, _HEART, _ABD]] = (0.6, 0.45, 0.6)
_FILM_MAX = 1.25


def _film_lut(knee: float, gamma: float) -> np.ndarray:
    """Film characteristic curve: linear up to ``knee``, exponential shoulder, gamma."""
    x = np.arange(256, dtype=np.float64) * (_FILM_MAX / 255.0)
    w = 1.0 - knee
    y = np.where(x < knee, x, knee + w * (1.0 - np.exp(-(x - knee) / w)))
    return np.round(255.0 * np.clip(y, 0.0, 1.0) ** gamma).astype(np.uint8)


# --------------------------------------------------------------------------- helpers
def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return img
    k = 2 * int(math.ceil(2.5 * sigma)) + 1
    return cv2.GaussianBlur(img, (k, k), sigma, borderType=cv2.BORDER_REPLICATE)


def _side_pts(d: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    """Patient coordinates (distance d from the midline, y) -> normalised image (x, y)."""
    d, y = np.broadcast_arrays(np.asarray(d, np.float64), np.asarray(y, np.float64))
    return np.stack([0.5 + s * d, y], axis=-1)


def _band(center: np.ndarray, half_width: np.ndarray | float) -> np.ndarray:
    """Outline polygon(s) of a band of given half width around centre line(s) [..., T, 2]."""
    tang = np.gradient(center, axis=-2)
    tang /= np.linalg.norm(tang, axis=-1, keepdims=True) + 1e-9
    normal = np.stack([-tang[..., 1], tang[..., 0]], axis=-1)
    hw = np.asarray(half_width, np.float64)
    if hw.ndim:
        hw = hw[..., None]
    a = center + normal * hw
    b = center - normal * hw
    return np.concatenate([a, b[..., ::-1, :]], axis=-2)


class _Geo:
    """Per-sample geometry: affine from normalised patient space to pixels."""

    def __init__(self, p: dict[str, Any], size: int):
        self.size = size
        c, s = math.cos(p["rot"]), math.sin(p["rot"])
        sc = p["scale"]
        self.lin = np.array([[c * sc, -s * sc], [s * sc, c * sc]])
        self.off = np.array([0.5 + p["tx"], 0.5 + p["ty"]]) - self.lin @ np.array([0.5, 0.5])

    def norm(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.lin.T + self.off

    def px(self, pts: np.ndarray, size: int | None = None) -> np.ndarray:
        """Normalised points -> fixed-point int32 pixel coordinates (shift=_SHIFT)."""
        n = size or self.size
        q = self.norm(pts) * n - 0.5
        return np.round(q * _ONE).astype(np.int32)

    def pxf(self, pts: np.ndarray) -> np.ndarray:
        """Normalised points -> float pixel coordinates."""
        return self.norm(pts) * self.size - 0.5

    def length(self, v: float, size: int | None = None) -> float:
        """A normalised length in pixels (rotation-invariant)."""
        return v * math.hypot(*self.lin[0]) * (size or self.size)


def _fill(img, polys, value):
    cv2.fillPoly(img, list(polys), value, cv2.LINE_8, _SHIFT)


def _lines(img, lines, value, thick):
    cv2.polylines(img, list(lines), False, value, max(1, int(round(thick))), cv2.LINE_8, _SHIFT)


# ------------------------------------------------------------------ sampling of patients
def _sample_patient(rng: np.random.Generator) -> dict[str, Any]:
    p: dict[str, Any] = {}
    u = rng.uniform
    p["scale"] = u(0.90, 1.03)
    p["rot"] = math.radians(float(np.clip(rng.normal(0.0, 1.6), -4.5, 4.5)))
    p["tx"], p["ty"] = (float(v) for v in np.clip(rng.normal(0.0, 0.015, 2), -0.04, 0.04))
    p["y_apex"] = u(0.085, 0.125)
    insp = u(0.0, 1.0)                      # inspiration depth
    y_r = 0.59 + 0.11 * insp + u(-0.015, 0.015)
    p["y_peak"] = (y_r, y_r + u(0.01, 0.04))  # right dome higher
    p["d_peak"] = (u(0.17, 0.22), u(0.18, 0.23))
    p["cp_drop"] = (u(0.06, 0.09), u(0.06, 0.09))
    W = u(0.35, 0.41)
    p["W"] = (W + u(-0.008, 0.008), W + u(-0.008, 0.008))
    p["d_apex"] = (u(0.14, 0.17), u(0.14, 0.17))
    p["st"] = u(0.02, 0.075)               # soft-tissue thickness of the chest wall
    # heart: right border R and left border L from the midline (CTR ~ 0.36-0.48)
    p["heart_r"] = u(0.075, 0.105)
    p["heart_l"] = u(0.19, 0.245)
    p["heart_dx"] = u(-0.01, 0.01)
    p["heart_top"] = u(0.42, 0.5)
    p["med_w"] = u(0.9, 1.15)
    p["carina"] = u(0.28, 0.32)
    p["y_clav"] = p["y_apex"] + u(0.075, 0.11)
    p["clav_lat"] = p["y_apex"] + u(0.01, 0.045)
    p["rib_sp"] = u(0.042, 0.05)
    p["rib_drop"] = u(0.04, 0.065)
    p["rib_rise"] = u(0.045, 0.075)
    p["rib_w"] = u(0.0075, 0.0092)
    p["hum_d"] = u(0.415, 0.455)
    p["hum_y"] = p["y_apex"] + u(0.06, 0.1)
    p["arms"] = u() < 0.5
    p["breast"] = u() < 0.35
    p["breast_y"] = u(0.62, 0.75)
    p["bubble"] = u() < 0.8
    # vessels: primary angles and step jitter per lung
    p["vessel_seed"] = int(rng.integers(0, 2**31 - 1))
    # film / exposure
    p["gain"] = u(0.92, 1.12)
    p["offset"] = u(-0.07, 0.03)
    p["gamma"] = u(0.8, 1.25)
    p["knee"] = u(0.68, 0.8)
    p["heel"] = u(-0.12, 0.12)
    p["noise"] = u(0.012, 0.03)
    p["blur"] = u(0.45, 0.95)
    p["noise_off"] = (int(rng.integers(0, 1 << 30)), int(rng.integers(0, 1 << 30)))
    return p


def _sample_findings(rng: np.random.Generator) -> np.ndarray:
    return (rng.uniform(size=len(FINDING_NAMES)) < FINDING_PROB).astype(np.uint8)


# ----------------------------------------------------------------------- geometry
def _lateral_w(p, i: int, y: np.ndarray) -> np.ndarray:
    """Half-width of the lung (inner rib cage) on side i at height y."""
    y_apex = p["y_apex"]
    y_cp = p["y_peak"][i] + p["cp_drop"][i]
    t = np.clip((np.asarray(y) - y_apex) / (y_cp - y_apex), 0.0, 1.0)
    d0, W = p["d_apex"][i], p["W"][i]
    w = d0 + (W - d0) * (1.0 - (1.0 - t) ** 1.8)
    return w - 0.012 * np.clip((t - 0.85) / 0.15, 0.0, 1.0) ** 2


def _dome_y(p, i: int, d: np.ndarray) -> np.ndarray:
    """Diaphragm height at distance d (>= 0) from the midline on side i."""
    d = np.asarray(d, np.float64)
    yp, dp = p["y_peak"][i], p["d_peak"][i]
    y_cp = yp + p["cp_drop"][i]
    w_cp = float(_lateral_w(p, i, y_cp))
    lat = yp + (y_cp - yp) * ((d - dp) / (w_cp - dp)) ** 2
    med = yp + 0.035 * ((dp - np.maximum(d, 0.05)) / (dp - 0.05)) ** 2
    return np.where(d >= dp, np.minimum(lat, y_cp + 0.06), med)


def _dome_x(p, x: np.ndarray) -> np.ndarray:
    """Diaphragm height as a function of normalised image x (both sides)."""
    d = np.asarray(x) - 0.5
    return np.where(d < 0, _dome_y(p, 0, np.abs(d)), _dome_y(p, 1, np.abs(d)))


def _lung_outline(p, i: int, n: int = 56) -> np.ndarray:
    """Lung outline for side i (0 = patient right = image left) in normalised coords."""
    s = -1.0 if i == 0 else 1.0
    y_apex, d_apex = p["y_apex"], p["d_apex"][i]
    y_cp = p["y_peak"][i] + p["cp_drop"][i]
    t = np.linspace(0.0, 1.0, 10)
    cap_d = 0.055 + (d_apex - 0.055) * t
    cap_y = y_apex + 0.075 * (1.0 - t) ** 2
    ly = y_apex + (y_cp - y_apex) * np.linspace(0.0, 1.0, n // 2) ** 1.3
    ld = _lateral_w(p, i, ly)
    w_cp = float(ld[-1])
    dd = np.linspace(w_cp, 0.05, n // 3)
    dy = _dome_y(p, i, dd)
    d = np.concatenate([cap_d, ld[1:], dd[1:], [0.05]])
    y = np.concatenate([cap_y, ly[1:], dy[1:], [y_apex + 0.075]])
    return _side_pts(d, y, s)


def _heart_outline(p, ctr_target: float | None = None, n: int = 24):
    """Heart silhouette (normalised coords) and (x, y) of its widest level.

    Right border (image left) at distance R from the midline, left ventricle border at
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
    th = np.linspace(-0.5 * np.pi, 0.5 * np.pi, n)
    sides = []
    for width, frac, expo in ((R, 0.68, 0.8), (L, 0.8, 0.62)):
        yc = y_t + frac * (y_d - y_t)
        ry = np.where(th < 0, yc - y_t, (y_d - yc) + 0.09)
        sides.append((width * np.cos(th).clip(0.0, 1.0) ** expo, yc + ry * np.sin(th)))
    cx = 0.5 + p["heart_dx"]
    x = np.concatenate([cx - sides[0][0], (cx + sides[1][0])[::-1]])
    y = np.concatenate([sides[0][1], sides[1][1][::-1]])
    y = np.minimum(y, _dome_x(p, x) + 0.004)
    yc = y_t + 0.68 * (y_d - y_t)
    return np.stack([x, y], -1), (0.5, yc)


def _mediastinum_outline(p, heart_cy: float) -> np.ndarray:
    mw = p["med_w"]
    top = p["y_apex"] - 0.03
    y_ak = p["carina"] - 0.04
    right = _side_pts(np.array([0.058, 0.062, 0.068, 0.075, 0.085]) * mw,
                      np.array([top, 0.2, y_ak + 0.05, y_ak + 0.12, heart_cy]), -1.0)
    left = _side_pts(np.array([0.09, 0.08, 0.072, 0.095, 0.085, 0.09, 0.083, 0.055]) * mw,
                     np.array([heart_cy, y_ak + 0.12, y_ak + 0.09, y_ak + 0.02, y_ak - 0.01,
                               y_ak - 0.035, y_ak - 0.07, top]), 1.0)
    return np.concatenate([right, left])


def _body_outline(p, with_arms: bool) -> np.ndarray:
    wb = max(p["W"]) + p["st"]
    sh = p["hum_y"] - 0.05
    d = [0.12, 0.125, 0.2, 0.32, wb + 0.03, wb + 0.06]
    y = [-0.2, 0.02, 0.065, sh - 0.02, sh + 0.01, sh + 0.05]
    if with_arms and p["arms"]:   # arms alongside the chest: soft tissue to the edges
        d += [0.56, 0.62, 0.62]
        y += [sh + 0.08, sh + 0.2, 1.2]
    else:                         # arms abducted: air lateral to the chest wall
        if with_arms:
            d += [wb + 0.1, wb + 0.08, wb + 0.03]
            y += [sh + 0.08, sh + 0.13, sh + 0.16]
        d += [wb, wb, wb - 0.03]
        y += [sh + 0.22, 0.75, 1.2]
    d, y = np.array(d), np.array(y)
    right = _side_pts(d, y, -1.0)
    left = _side_pts(d[::-1], y[::-1], 1.0)
    return np.concatenate([right, left])


def _abdomen_outline(p) -> np.ndarray:
    wb = max(p["W"]) + 0.5 * p["st"]
    dd = np.linspace(wb, 0.0, 24)
    lift = 0.05 * np.clip((0.07 - dd) / 0.02, 0.0, 1.0)  # fill in under the heart
    right = _side_pts(dd, _dome_y(p, 0, dd) - lift, -1.0)
    left = _side_pts(dd[::-1], (_dome_y(p, 1, dd) - lift)[::-1], 1.0)
    bottom = np.array([[0.5 + wb, 1.2], [0.5 - wb, 1.2]])
    return np.concatenate([right, left, bottom])


def _ribs(p, i: int):
    """Posterior and anterior rib centre lines [R, T, 2] and half widths for side i."""
    s = -1.0 if i == 0 else 1.0
    k = np.arange(10, dtype=np.float64)[:, None]
    T = 14
    t = np.linspace(0.0, 1.0, T)[None, :]
    y0 = p["y_apex"] - 0.012 + p["rib_sp"] * (k + 0.02 * k ** 2)
    drop = p["rib_drop"] * (1.0 + 0.035 * k)
    rise = p["rib_rise"] * (1.0 - 0.04 * k)
    y_lat = y0 + drop
    d_lat = _lateral_w(p, i, y_lat) + 0.008
    d0 = 0.028
    d = d0 + (d_lat - d0) * t ** 0.95
    y = y0 - rise * t + (drop + rise) * t ** 3
    post = _side_pts(d, y, s)
    hw_post = p["rib_w"] * (1.0 + 0.04 * k) * np.minimum(1.0, 0.55 + 3.0 * t) * (1.0 - 0.3 * t ** 8)
    ka = k[:7]
    d_end = 0.085 + 0.018 * ka
    slope = 0.42 + 0.04 * ka
    d_l = d_lat[:7]
    y_l = y_lat[:7]
    da = d_l + (d_end - d_l) * t
    ya = y_l + slope * (d_l - d_end) * t ** 1.15 - 0.012 * np.sin(np.pi * t)
    ant = _side_pts(da, ya, s)
    hw_ant = 0.0125 * (1.0 - 0.6 * t ** 3)
    return post, hw_post, ant, hw_ant


def _vessels(p, rng: np.random.Generator, i: int, hilum: tuple[float, float], lung_h: float):
    """Branching vessel polylines (three calibre tiers) for side i."""
    s = -1.0 if i == 0 else 1.0
    n_p, steps = 8, 6
    ang = np.linspace(-1.35, 1.25, n_p) + rng.normal(0, 0.12, n_p)
    dth = rng.normal(0, 0.22, (n_p, steps)).cumsum(axis=1)
    th = ang[:, None] + dth
    step = lung_h * 0.085 * rng.uniform(0.75, 1.15, (n_p, steps))
    vx = (s * np.cos(th) * step).cumsum(axis=1)
    vy = (np.sin(th) * step).cumsum(axis=1)
    hx, hy = 0.5 + s * hilum[0], hilum[1]
    pts = np.stack([np.concatenate([np.full((n_p, 1), hx), hx + vx], 1),
                    np.concatenate([np.full((n_p, 1), hy), hy + vy], 1)], -1)  # [n_p, 7, 2]
    # secondary branches from points 2 and 3 of each primary
    roots = pts[:, 2:4].reshape(-1, 2)
    sign = np.where(rng.uniform(size=roots.shape[0]) < 0.5, -1.0, 1.0)
    th2 = np.repeat(th[:, 2:4].reshape(-1), 1) + sign * rng.uniform(0.4, 0.8, roots.shape[0])
    th2 = th2[:, None] + rng.normal(0, 0.2, (roots.shape[0], 3)).cumsum(1)
    st2 = lung_h * 0.06 * rng.uniform(0.7, 1.2, (roots.shape[0], 3))
    sx = (s * np.cos(th2) * st2).cumsum(1)
    sy = (np.sin(th2) * st2).cumsum(1)
    sec = np.stack([np.concatenate([roots[:, :1], roots[:, :1] + sx], 1),
                    np.concatenate([roots[:, 1:], roots[:, 1:] + sy], 1)], -1)
    return pts, sec


def cardiothoracic_ratio(anatomy: np.ndarray) -> float:
    """Cardiothoracic ratio measured on an anatomy label map.

    Maximal horizontal width of the heart divided by the maximal horizontal extent of
    the lungs (outer lung border to outer lung border).
    """
    heart_cols = np.flatnonzero((anatomy == _HEART).any(axis=0))
    lungs = (anatomy == _RLUNG) | (anatomy == _LLUNG)
    lung_cols = np.flatnonzero(lungs.any(axis=0))
    if heart_cols.size == 0 or lung_cols.size == 0:
        return float("nan")
    return float(heart_cols[-1] - heart_cols[0] + 1) / float(lung_cols[-1] - lung_cols[0] + 1)


# ------------------------------------------------------------------------- source
class SyntheticCXR:
    """Random-access source of synthetic PA chest radiographs (see module docstring).

    Args:
      split: "pretrain" (normal images) or "labelled" (with findings and their masks).
      image_size: side S of the square images, >= 32.
      num_examples: length of the source (defaults: 100_000 pretrain, 10_000 labelled).
      seed: non-negative integer; items are a pure function of (seed, split, index).
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
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
                or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.split = split
        self.image_size = int(image_size)
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self._cache: dict[str, Any] | None = None

    # pickling: drop the lazily built caches
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def __setstate__(self, state):
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
            lo = max(16, S // 4)
            noise = np.random.default_rng(0x5C7A).standard_normal((2 * S, 2 * S), np.float32)
            noise = cv2.GaussianBlur(noise, (3, 3), 0.45)
            noise *= np.float32(1.0 / noise.std())
            self._cache = {
                "lo": lo,
                "ylo": ((np.arange(lo, dtype=np.float32) + 0.5) / lo)[:, None],
                "yhi": ((np.arange(S, dtype=np.float32) + 0.5) / S - 0.5)[:, None],
                "noise": noise,
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


# ------------------------------------------------------------------------ rendering
def _render(p, findings, rng, S, cache) -> dict[str, np.ndarray]:
    geo = _Geo(p, S)
    lo = cache["lo"]
    px_per = geo.length(1.0)        # pixels per normalised unit
    labelled = findings is not None
    has = (lambda f: bool(findings[f])) if labelled else (lambda f: False)

    ctr = rng.uniform(0.56, 0.68) if has(_CARDIO) else None
    heart, (hcx, hcy) = _heart_outline(p, ctr)
    lungs = [_lung_outline(p, 0), _lung_outline(p, 1)]
    med = _mediastinum_outline(p, hcy)
    body = _body_outline(p, with_arms=True)
    abdomen = _abdomen_outline(p)

    # ---- tissue partition
    tissue = np.zeros((S, S), np.uint8)
    _fill(tissue, [geo.px(body)], _SOFT)
    abd_px = geo.px(abdomen)
    _fill(tissue, [abd_px], _ABD)
    lung_px = [geo.px(l) for l in lungs]
    _fill(tissue, [lung_px[0]], _RLUNG)
    _fill(tissue, [lung_px[1]], _LLUNG)
    med_px = geo.px(med)
    heart_px = geo.px(heart)
    _fill(tissue, [med_px], _MED)
    _fill(tissue, [heart_px], _HEART)
    # keep the abdomen outside the body as background
    bodymask = np.zeros((S, S), np.uint8)
    _fill(bodymask, [geo.px(body)], 1)
    tissue *= bodymask

    carina = p["carina"]
    trachea_c = _side_pts(np.array([0.0, 0.004, 0.0, 0.0]),
                          np.array([-0.1, 0.15, carina - 0.06, carina]), -1.0)
    bron_r = _side_pts(np.array([0.0, 0.04, 0.075]), np.array([carina, carina + 0.035, carina + 0.075]), -1.0)
    bron_l = _side_pts(np.array([0.0, 0.05, 0.095]), np.array([carina, carina + 0.03, carina + 0.085]), 1.0)
    tr_px = geo.px(trachea_c)
    br_px = [geo.px(bron_r), geo.px(bron_l)]
    _lines(tissue, [tr_px], _TRACHEA, 0.032 * px_per)
    _lines(tissue, br_px, _TRACHEA, 0.02 * px_per)

    # ---- bones
    bone = np.zeros((S, S), np.uint8)
    ant = np.zeros((S, S), np.uint8)
    post_polys, ant_polys, post_inner, ant_inner = [], [], [], []
    for i in (0, 1):
        post, hwp, antc, hwa = _ribs(p, i)
        post_polys += list(geo.px(_band(post, hwp)))
        post_inner += list(geo.px(_band(post, hwp * 0.45)))
        ant_polys += list(geo.px(_band(antc, hwa)))
        ant_inner += list(geo.px(_band(antc, hwa * 0.4)))
    # scapulae (faint)
    scap = []
    for s in (-1.0, 1.0):
        hd, hy = p["hum_d"], p["hum_y"]
        scap.append(geo.px(_side_pts(np.array([hd - 0.05, hd - 0.16, hd - 0.15, hd - 0.1, hd - 0.045]),
                                     np.array([hy - 0.03, hy - 0.055, hy + 0.06, hy + 0.24, hy + 0.05]), s)))
    _fill(bone, scap, 45)
    _fill(bone, post_polys, 255)
    _fill(bone, post_inner, 200)
    _fill(ant, ant_polys, 255)
    _fill(ant, ant_inner, 185)

    # spine
    y = -0.03
    verts, peds, spinous, discs = [], [], [], []
    j = 0
    while y < 1.15:
        h = (0.033 + 0.0021 * j) * (0.85 + 0.25 * (p["y_peak"][0] - 0.59) / 0.11 + 0.1)
        hw = 0.029 + 0.0011 * j
        g = 0.18 * h
        y1, y2 = y + g / 2, y + h - g / 2
        verts.append(_side_pts(np.array([-hw, -hw * 0.93, -hw, hw, hw * 0.93, hw]),
                               np.array([y1, 0.5 * (y1 + y2), y2, y2, 0.5 * (y1 + y2), y1]), 1.0))
        for s in (-1.0, 1.0):
            th = np.linspace(0, 2 * np.pi, 10, endpoint=False)
            peds.append(_side_pts(0.6 * hw + 0.22 * hw * np.cos(th), y1 + 0.32 * h + 0.24 * h * np.sin(th), s))
        spinous.append(_side_pts(np.array([0.0, 0.2 * hw, 0.0, -0.2 * hw]),
                                 np.array([y1 + 0.45 * h, y1 + 0.7 * h, y2 + 0.2 * h, y1 + 0.7 * h]), 1.0))
        y += h
        j += 1
    col_d = np.array([0.031, 0.031 + 0.0011 * 25])
    column = _side_pts(np.array([-col_d[0], -col_d[1], col_d[1], col_d[0]]),
                       np.array([-0.1, 1.2, 1.2, -0.1]), 1.0)
    col_px = geo.px(column)
    _fill(bone, [col_px], 70)
    _fill(bone, [geo.px(v) for v in verts], 100)
    cv2.polylines(bone, [geo.px(v) for v in peds], True, 150, max(1, int(round(0.004 * px_per))),
                  cv2.LINE_8, _SHIFT)
    _fill(bone, [geo.px(v) for v in spinous], 125)

    # clavicles
    clav_polys, clav_inner = [], []
    t = np.linspace(0.0, 1.0, 14)
    for s in (-1.0, 1.0):
        d = 0.02 + (0.33 - 0.02) * t
        yc = p["y_clav"] + (p["clav_lat"] - p["y_clav"]) * t + 0.014 * np.sin(2 * np.pi * t)
        c = _side_pts(d, yc, s)
        hwc = 0.0115 * (1.25 - 0.35 * t)
        clav_polys.append(geo.px(_band(c, hwc)))
        clav_inner.append(geo.px(_band(c, hwc * 0.45)))
    _fill(bone, clav_polys, 235)
    _fill(bone, clav_inner, 195)

    # humeri
    hum_polys = []
    for s in (-1.0, 1.0):
        hd, hy = p["hum_d"], p["hum_y"]
        th = np.linspace(-0.35 * np.pi, 1.35 * np.pi, 24)
        r = 0.052
        head = _side_pts(hd + 0.012 + r * np.cos(th), hy + r * np.sin(-th), s)
        y_end = hy + 0.1
        shaft = _side_pts(np.array([hd + 0.058, hd + 0.075, hd + 0.04, hd + 0.0]),
                          np.array([hy + 0.05, y_end, y_end, hy + 0.05]), s)
        hum_polys.append(geo.px(np.concatenate([head, shaft[:2], shaft[2:]])))
    for hp in hum_polys:
        _fill(bone, [hp], 225)

    # ---- anatomy label map (paint order = priority)
    anatomy = tissue.copy()
    _fill(anatomy, post_polys, _RIBS)
    _fill(anatomy, ant_polys, _RIBS)
    # restore mediastinum/heart/trachea over ribs, then the rest
    _fill(anatomy, [med_px], _MED)
    _fill(anatomy, [heart_px], _HEART)
    _fill(anatomy, [col_px], _SPINE)
    _fill(anatomy, [heart_px], _HEART)
    _lines(anatomy, [tr_px], _TRACHEA, 0.032 * px_per)
    _lines(anatomy, br_px, _TRACHEA, 0.02 * px_per)
    _fill(anatomy, clav_polys, _CLAV)
    for hp in hum_polys:
        _fill(anatomy, [hp], _HUM)
    anatomy *= bodymask

    # ---- low-resolution smooth fields
    lo_body = np.zeros((lo, lo), np.float32)
    _fill(lo_body, [geo.px(_body_outline(p, with_arms=False), lo)], 1.0)
    lo_body = _blur(lo_body, 0.075 * lo)
    lo_abd = np.zeros((lo, lo), np.float32)
    _fill(lo_abd, [geo.px(abdomen, lo)], 1.0)
    lo_body += _blur(lo_abd, 0.03 * lo) * 0.6
    lo_lung = np.zeros((lo, lo), np.float32)
    _fill(lo_lung, [geo.px(lungs[0], lo)], 1.0)
    _fill(lo_lung, [geo.px(lungs[1], lo)], 1.0)
    lo_lung = _blur(lo_lung, 0.035 * lo)
    ylo = cache["ylo"]
    ymid = p["y_apex"] + 0.45 * (p["y_peak"][0] - p["y_apex"])
    zone = 1.0 - 0.3 * np.clip((ylo - ymid) / (p["y_peak"][0] - ymid), 0.0, 1.0)
    zone -= 0.2 * np.clip((p["y_apex"] + 0.12 - ylo) / 0.12, 0.0, 1.0)
    lo_dark = (0.15 + 0.26 * lo_lung) * zone
    soft = lo_body * 0.25
    if p["breast"]:
        br = np.zeros((lo, lo), np.float32)
        for s in (-1.0, 1.0):
            cx, cy = 0.5 + s * 0.24, p["breast_y"]
            c = geo.px(np.array([[cx, cy]]), lo)[0]
            ax = (int(0.2 * lo * _ONE), int(0.13 * lo * _ONE))
            cv2.ellipse(br, (int(c[0]), int(c[1])), ax, math.degrees(p["rot"]), 0, 360, 1.0, -1,
                        cv2.LINE_8, _SHIFT)
        soft += _blur(br, 0.02 * lo) * 0.07
    up = lambda a: cv2.resize(a, (S, S), interpolation=cv2.INTER_LINEAR)
    soft_up = up(soft)
    dark_up = up(lo_dark)
    lung_up = up(lo_lung)

    lm = cv2.LUT(tissue, _LUNG_LUT)
    bm = cv2.LUT(tissue, _BODY_LUT)
    D = cv2.LUT(tissue, _TISSUE_DENSITY)
    D += soft_up * bm

    # ---- vessels
    vess = np.zeros((S, S), np.uint8)
    vrng = np.random.default_rng(p["vessel_seed"])
    thick, med_, thin, hila = [], [], [], []
    for i in (0, 1):
        s = -1.0 if i == 0 else 1.0
        lung_h = p["y_peak"][i] - p["y_apex"]
        hil = (0.105 if i == 0 else 0.11, p["y_apex"] + (0.5 if i == 0 else 0.46) * lung_h)
        prim, sec = _vessels(p, vrng, i, hil, lung_h)
        ppx = geo.px(prim)
        thick += list(ppx[:, 0:3])
        med_ += list(ppx[:, 2:5])
        thin += list(ppx[:, 4:])
        thin += list(geo.px(sec))
        hx, hy = 0.5 + s * hil[0], hil[1]
        hila.append(geo.px(np.array([[hx - s * 0.02, hy - 0.045], [hx + s * 0.01, hy - 0.01],
                                     [hx + s * 0.025, hy + 0.05]])))
    _lines(vess, thin, 110, 0.0045 * px_per)
    _lines(vess, med_, 170, 0.007 * px_per)
    _lines(vess, thick, 220, 0.011 * px_per)
    _lines(vess, hila, 255, 0.026 * px_per)

    finding_masks = None
    boxes = None
    opac = None
    ptx = None
    pleural = None
    if labelled:
        finding_masks = np.zeros((S, S), np.uint8)
        boxes = np.zeros((len(FINDING_NAMES), 4), np.float32)
        masks: dict[int, np.ndarray] = {}
        opac = np.zeros((S, S), np.float32)
        geoms = dict(lungs=lungs, lung_up=lung_up, tissue=tissue, geo=geo, px_per=px_per,
                     lo=lo, cache=cache, extra=D)
        if has(_NODULE):
            masks[_NODULE] = _nodules(p, rng, opac, geoms)
        if has(_CONSOL):
            masks[_CONSOL] = _consolidation(p, rng, opac, geoms)
        if has(_EFFUSION):
            masks[_EFFUSION] = _effusion(p, rng, opac, geoms)
        if has(_PTX):
            ptx, pleural, ptx_lung_i = _pneumothorax(p, rng, geoms)
            masks[_PTX] = ptx
        if has(_CARDIO):
            masks[_CARDIO] = (tissue == _HEART).view(np.uint8)
        for f, m in masks.items():
            if not m.any():
                findings[f] = 0
                continue
            finding_masks |= m.astype(bool).view(np.uint8) << np.uint8(f)
            boxes[f] = cv2.boundingRect(m.astype(np.uint8))
        np.clip(opac, 0.0, 1.0, out=opac)

    # ---- lung darkening, vessels, findings
    lung_term = lm * dark_up
    vterm = cv2.LUT(vess, _VESSEL_LUT)
    vterm *= lm
    vterm *= lung_up
    if opac is not None:
        keep = 1.0 - opac
        lung_term *= keep
        vterm *= keep
    if ptx is not None:
        ptxf = ptx.astype(np.float32)
        vterm *= 1.0 - ptxf
        lung_term += ptxf * (0.16 * lm)
        lung_term *= 1.0 - 0.25 * (ptx_lung_i & ~ptx).astype(np.float32)  # collapsed lung: denser
        D += cv2.LUT(pleural, _u8_lut(0.22))
    D -= lung_term
    D += vterm
    bterm = cv2.LUT(bone, _BONE_LUT)
    bterm *= cv2.LUT(tissue, _BONE_VIS_LUT)
    D += bterm
    D += cv2.LUT(ant, _ANT_LUT)

    # gastric bubble under the left dome
    if p["bubble"]:
        gb = np.zeros((S, S), np.uint8)
        dpk = p["d_peak"][1] + 0.02
        yb = float(_dome_y(p, 1, dpk)) + 0.045
        c = geo.pxf(np.array([[0.5 + dpk, yb]]))[0]
        ax = (int(0.06 * px_per * _ONE), int(0.03 * px_per * _ONE))
        cv2.ellipse(gb, (int(c[0] * _ONE), int(c[1] * _ONE)), ax, math.degrees(p["rot"]), 180, 360, 255, -1,
                    cv2.LINE_8, _SHIFT)
        D -= cv2.LUT(gb, _u8_lut(0.12))

    # ---- film: blur, heel effect, exposure, noise
    D = _blur(D, p["blur"] * S / 224.0)
    D *= np.float32(p["gain"]) * (1.0 + np.float32(p["heel"]) * cache["yhi"])
    D += np.float32(p["offset"])
    nz = cache["noise"]
    ox, oy = p["noise_off"][0] % S, p["noise_off"][1] % S
    noise = nz[oy:oy + S, ox:ox + S]
    D += noise * (np.float32(p["noise"]) * (0.25 + D))
    img8 = cv2.convertScaleAbs(D, alpha=255.0 / _FILM_MAX)
    image = cv2.LUT(img8, _film_lut(p["knee"], p["gamma"]))

    out = {"image": image, "anatomy": anatomy}
    if labelled:
        out["findings"] = findings.astype(np.uint8)
        out["finding_masks"] = finding_masks
        out["boxes"] = boxes
    return out


# ----------------------------------------------------------------------- findings
def _lung_side_mask(tissue, i):
    return (tissue == (_RLUNG if i == 0 else _LLUNG))


def _pick_in_lung(rng, g, i, d_range, y_frac, margin=0.5):
    """Pick a point (normalised image coords) inside lung i away from its borders."""
    p_lungs = g["lungs"][i]
    y_top, y_bot = p_lungs[:, 1].min(), p_lungs[:, 1].max()
    s = -1.0 if i == 0 else 1.0
    lung_up, tissue, geo = g["lung_up"], g["tissue"], g["geo"]
    S = tissue.shape[0]
    want = _RLUNG if i == 0 else _LLUNG
    n = 24
    d = rng.uniform(d_range[0], d_range[1], n)
    y = y_top + (y_bot - y_top) * rng.uniform(y_frac[0], y_frac[1], n)
    pts = _side_pts(d, y, s)
    q = np.clip(np.round(geo.pxf(pts)).astype(int), 0, S - 1)
    ok = (tissue[q[:, 1], q[:, 0]] == want) & (lung_up[q[:, 1], q[:, 0]] > margin)
    k = int(np.argmax(ok)) if ok.any() else 0
    return pts[k], bool(ok.any())


def _nodules(p, rng, opac, g):
    S = opac.shape[0]
    geo, px_per = g["geo"], g["px_per"]
    layer = np.zeros((S, S), np.uint8)
    core = np.zeros((S, S), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(0, 2))
        c, _ = _pick_in_lung(rng, g, i, (0.12, 0.36), (0.15, 0.85), margin=0.6)
        r = rng.uniform(0.014, 0.03)
        th = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        rr = r * (1.0 + rng.uniform(-0.07, 0.07, 16))
        poly = c + np.stack([rr * np.cos(th), rr * np.sin(th)], -1)
        _fill(layer, [geo.px(poly)], 255)
        _fill(core, [geo.px(c + (poly - c) * 0.55)], 255)
        if r * px_per < 1.0:
            q = np.clip(np.round(geo.pxf(c[None])).astype(int), 0, S - 1)[0]
            layer[q[1], q[0]] = 255
    amp = rng.uniform(0.7, 1.0)
    opac += cv2.LUT(layer, _u8_lut(amp * 0.8))
    opac += cv2.LUT(core, _u8_lut(amp * 0.2))
    g["extra"] += cv2.LUT(layer, _u8_lut(0.05 * amp))
    return layer > 0


def _smooth_noise(rng, S, cells):
    n = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(n, (S, S), interpolation=cv2.INTER_CUBIC)


def _consolidation(p, rng, opac, g):
    S = opac.shape[0]
    geo, px_per, tissue = g["geo"], g["px_per"], g["tissue"]
    i = int(rng.integers(0, 2))
    zone = rng.choice(3, p=[0.2, 0.3, 0.5])
    y_frac = [(0.18, 0.35), (0.4, 0.6), (0.62, 0.8)][zone]
    c, _ = _pick_in_lung(rng, g, i, (0.14, 0.3), y_frac, margin=0.55)
    blob = np.zeros((S, S), np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        off = rng.normal(0, 0.045, 2)
        ax = rng.uniform(0.035, 0.08, 2)
        q = geo.pxf((c + off)[None])[0]
        cv2.ellipse(blob, (int(q[0] * _ONE), int(q[1] * _ONE)),
                    (int(ax[0] * px_per * _ONE), int(ax[1] * px_per * _ONE)),
                    float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_8, _SHIFT)
    field = _blur(cv2.LUT(blob, _u8_lut(1.0)), 0.02 * px_per)
    field += 0.35 * _smooth_noise(rng, S, 10)
    lung_i = _lung_side_mask(tissue, i)
    region = (field > 0.55) & lung_i
    if not region.any():  # guarantee a visible patch at tiny sizes
        q = np.clip(np.round(geo.pxf(c[None])).astype(int), 0, S - 1)[0]
        region[max(0, q[1] - 1):q[1] + 2, max(0, q[0] - 1):q[0] + 2] = True
        region &= lung_i
    tex = np.clip(0.62 + 0.22 * _smooth_noise(rng, S, max(8, S // 7)) + 0.25 * (field - 0.55), 0.15, 0.95)
    # air bronchograms: dark branching tubes within the opacity
    br = np.zeros((S, S), np.uint8)
    s = -1.0 if i == 0 else 1.0
    lines = []
    for _ in range(int(rng.integers(2, 4))):
        a0 = math.atan2(1.0, 1.0) * rng.uniform(-1.2, 1.6)
        seg = rng.uniform(0.025, 0.04, 4)
        ang = a0 + rng.normal(0, 0.25, 4).cumsum()
        start = c + rng.normal(0, 0.02, 2) - np.array([s * 0.04, 0.0])
        pts = np.concatenate([start[None], start + np.stack([s * np.cos(ang) * seg, np.sin(ang) * seg], -1).cumsum(0)])
        lines.append(geo.px(pts))
    _lines(br, lines, 255, 0.006 * px_per)
    tex -= cv2.LUT(br, _u8_lut(0.45))
    regf = _blur(region.astype(np.float32), 0.004 * px_per)
    opac += regf * tex
    return region


def _effusion(p, rng, opac, g):
    S = opac.shape[0]
    geo, px_per, tissue = g["geo"], g["px_per"], g["tissue"]
    sides = [int(rng.integers(0, 2))]
    if rng.uniform() < 0.2:
        sides = [0, 1]
    mask = np.zeros((S, S), bool)
    for i in sides:
        s = -1.0 if i == 0 else 1.0
        h = rng.uniform(0.07, 0.2)
        W = p["W"][i]
        y_base = p["y_peak"][i] + 0.01
        d = np.linspace(0.0, W + 0.05, 24)
        u = np.clip(d / W, 0, 1.2)
        ytop = y_base - h * (0.2 + 0.8 * u ** 2.6)
        poly = np.concatenate([_side_pts(d, ytop, s), _side_pts(np.array([W + 0.05, 0.0]), np.array([1.3, 1.3]), s)])
        layer = np.zeros((S, S), np.uint8)
        _fill(layer, [geo.px(poly)], 255)
        m = (layer > 0) & _lung_side_mask(tissue, i)
        if not m.any():
            continue
        mask |= m
        soft = _blur(layer, 0.012 * px_per)  # soft meniscus edge
        opac += cv2.LUT(soft, _u8_lut(rng.uniform(0.92, 1.0)))
        fluid = cv2.LUT(soft, _u8_lut(rng.uniform(0.1, 0.16)))
        fluid *= _lung_side_mask(tissue, i)
        g["extra"] += fluid
    return mask


def _pneumothorax(p, rng, g):
    S = g["tissue"].shape[0]
    geo, px_per, tissue = g["geo"], g["px_per"], g["tissue"]
    i = int(rng.integers(0, 2))
    s = -1.0 if i == 0 else 1.0
    outline = g["lungs"][i]
    lung_h = p["y_peak"][i] - p["y_apex"]
    hil = np.array([0.5 + s * 0.1, p["y_apex"] + 0.5 * lung_h])
    dpt = outline[:, 0] - 0.5
    ad = np.abs(dpt)
    yf = (outline[:, 1] - p["y_apex"]) / lung_h
    w = np.clip(1.5 - 2.0 * yf, 0.0, 1.0) * np.clip((ad - 0.06) / 0.08, 0.0, 1.0)
    w = np.maximum(w, np.clip(1.0 - yf / 0.15, 0, 1))  # whole apex cap
    depth = rng.uniform(0.04, 0.1)
    vec = hil - outline
    vec /= np.linalg.norm(vec, axis=1, keepdims=True) + 1e-9
    inner = outline + vec * (w * depth)[:, None]
    ret = np.zeros((S, S), np.uint8)
    _fill(ret, [geo.px(inner)], 1)
    lung_i = _lung_side_mask(tissue, i)
    ptx = lung_i & (ret == 0)
    pleural = np.zeros((S, S), np.uint8)
    sel = w > 0.15
    idx = np.flatnonzero(sel)
    if idx.size >= 2:
        _lines(pleural, [geo.px(inner[idx.min():idx.max() + 1])], 255, max(1.0, 0.0035 * px_per))
        pleural &= lung_i.view(np.uint8) * np.uint8(255)
    return ptx, pleural, lung_i
