"""Procedural chest/abdomen CT phantom in Hounsfield units: the embedded 3D source ``synthetic_ct``.

``subject(seed, index, shape)`` renders one synthetic chest CT (lung apices to the
kidneys) with organ labels, lobes, emphysema and nodules; ``SyntheticCT`` is a picklable
random-access source (``__len__`` + ``__getitem__``) over such subjects for pipelines.
Nothing is read from or written to disk. Every output is a pure function of ``(seed,
index, shape, fov_mm, disease)``: the same arguments give byte-identical arrays in any
process and in any order (per-subject generators ``np.random.default_rng([seed, index,
stream])``, one stream each for anatomy, textures, emphysema, vessel trees, noise and
nodules, so ``disease=False`` renders the very same subject without its disease).

Geometry. Volumes are ``anatjax.data.volume.Volume``s in the canonical LPS frame: [D, H, W]
arrays in (z, y, x) order, axis 0 toward the patient's superior, axis 1 posterior, axis 2
toward the patient's left, so the patient's right lung is at low x. The field of view
``fov_mm`` (default 400 x 360 x 360 mm, z y x) is centred on the physical origin and
rasterised at any ``shape`` (default 128^3): spacing = fov_mm / shape. Anatomy is defined
in mm in a subject frame (Z up, Y posterior, X to the left, origin at the carina, a
standard adult) and posed per subject: anisotropic scale, a few degrees of rotation about
z, a small tilt and a shift. Everything but the image noise is placed in mm, so renders
of one subject at two shapes show the same anatomy and disease.

Rendered structures (unenhanced HU). Air -1000 outside; the body wall from the skin in:
subcutaneous fat (-100, thicker behind and in the abdomen), muscle (40: pectorals,
paraspinal muscles, the shoulder girdle narrowing the thoracic inlet), the rib layer with
12 curved, downward-sloping ribs per side (cortex 750, marrow 280, costal cartilage 130)
and the sternum. Lungs: parenchyma -800..-880 (deeper inspiration is darker) with a
gravity gradient (denser behind, supine) and fine texture; intrapulmonary vessel trees
(blood 40, branching and tapering from ~6 mm to under 1 mm radius, partial-volume weighted;
arteries beside the bronchi, veins on a separate tree from the left atrium) and airway
trees (air lumen, 1.2 mm soft-tissue wall, to ~1 mm lumen radius), both grown by
recursive bisection of points filling each lung. Mediastinum: trachea and main bronchi,
heart (ventricles and atria, 38), aorta (ascending, arch, descending, abdominal), pulmonary
trunk and arteries, venae cavae, arch branches, oesophagus, in mediastinal fat. Under the
right and left diaphragm domes: liver (58), spleen (46), stomach (25, with gas rising
anteriorly), kidneys (30, with renal sinus and perirenal fat), psoas, and bowel (soft
tissue with gas pockets) in visceral fat. The spine: vertebral bodies (cancellous 260,
cortical shell 750), discs (85), canal (22), neural arches, spinous and transverse
processes, level by level (C6 to L5). The scanner: a 3-tap Gaussian point-spread
function (sigma 0.6 voxel) and correlated Gaussian noise of 10-20 HU (white noise through
the same blur; the white noise is a fixed per-shape texture that each subject takes at a
random cyclic shift and flip).

Labels (``labels``, uint8 indices into ``LABEL_NAMES``; one per voxel, later paints win,
nothing paints over the lungs): body (skin, muscle, soft tissue, bowel, diaphragm, discs,
canal, cartilage, oesophagus), fat, lungs, liver, stomach, kidneys, spleen, heart, great
vessels / aorta / airway, spine, ribs, sternum. ``lung_right`` / ``lung_left`` cover each
whole lung inside the pleura,
including its vessels, intrapulmonary airways, emphysema and nodules, so the lung mask is
exactly ``labels in (lung_right, lung_left)`` (equivalently ``regions > 0``); ``airway``
is the airways outside the lungs (trachea, main bronchi and the hilar stretches of the
bronchial trees; lumen and wall); ``great_vessels`` the pulmonary trunk and arteries,
venae cavae, arch branches and the hilar stretches of the lung vessels; ``spine`` the
vertebral bone; ``ribs`` the bony ribs.

Regions (``regions``, uint8 indices into ``REGION_NAMES``, 0 outside the lungs): the five
lobes, split by planar oblique (major) fissures on both sides and the horizontal (minor)
fissure on the right, with per-subject jitter.

Subject variation: body size and shape (scale per axis), subcutaneous fat, pose (shift,
rotation about z, tilt), inspiration depth (diaphragm height, so lung height and volume,
and lung density), heart size and position, organ sizes and positions, vertebral level
offsets, fissure positions, noise level. Lung volumes span roughly 3.5-7 L.

Disease (``disease=True``; ``disease=False`` gives the same subject healthy):
 emphysema  40 % of subjects have none. The others get clustered low-attenuation holes
            (about -995 HU, soft rims) in the parenchyma away from vessels and airways,
            with a target severity log-uniform in 1.5-50 % of the lung: centrilobular and
            upper-lobe predominant (75 %) or panlobular and lower-lobe predominant. Per
            lobe, a lobular-scale random field plus a cluster field and a height trend
            is thresholded at the quantile that leaves that lobe's target fraction.
            ``emphysema`` marks the lung voxels the disease touched that end up below
            ``LAA_THRESHOLD_HU`` (-950) in the final image; ``region_severity[i]`` is the
            fraction of lobe i + 1's voxels in that mask and ``severity`` the fraction of
            all lung voxels. Both are measured on the returned image (blur and noise
            included), so they are exact for it; they come out at about half the target,
            less at coarse shapes, as small holes lose contrast to the point-spread
            function. Healthy parenchyma hardly ever falls below -950 HU, and airway
            lumens are not counted.
 nodules    0-3 per subject (50 % none): solid (35 HU), lobulated spheres of 2-11 mm mean
            radius fully inside one lung; ``nodule_mask`` is the voxels at least half
            covered, ``nodules`` their physical centres (z, y, x) and mean radii in mm.

Preview: ``python -m anatjax.data.synthetic_ct --out=docs/synthetic_ct.png --index=11``
writes axial, coronal and sagittal cuts through the subject's largest nodule (or its lungs)
in lung and soft-tissue windows, and with a label overlay (emphysema yellow, nodules red).

Implementation notes: analytic shapes (superellipse-like body wall measured along rays
from the body axis, paraboloid diaphragm domes and lung apices, ellipsoid organs) are
evaluated only in their bounding boxes or z slabs; tubes (mediastinal vessels, airways,
ribs, vessel trees) are signed distances to segment chains, rasterised per segment box
in size-bucketed broadcasts merged with a scatter-max; smooth random fields are value
noise on mm lattices with separable linear interpolation. A 128^3 subject takes about
0.4-0.6 s of one CPU core, 96^3 about 0.2-0.3 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from typing import Sequence

import cv2
import numpy as np

from anatjax.data.volume import Volume

__all__ = [
  "CTSubject",
  "DEFAULT_FOV_MM",
  "DEFAULT_SHAPE",
  "LABEL_NAMES",
  "LAA_THRESHOLD_HU",
  "REGION_NAMES",
  "SyntheticCT",
  "main",
  "preview",
  "subject",
]

LABEL_NAMES: tuple[str, ...] = (
  "background",
  "body",
  "fat",
  "lung_right",
  "lung_left",
  "airway",
  "heart",
  "aorta",
  "great_vessels",
  "liver",
  "spleen",
  "stomach",
  "kidney_right",
  "kidney_left",
  "spine",
  "ribs",
  "sternum",
)
REGION_NAMES: tuple[str, ...] = (
  "outside",
  "right_upper",
  "right_middle",
  "right_lower",
  "left_upper",
  "left_lower",
)
DEFAULT_SHAPE = (128, 128, 128)
DEFAULT_FOV_MM = (400.0, 360.0, 360.0)
LAA_THRESHOLD_HU = -950

(_BG, _BODY, _FAT, _LUNG_R, _LUNG_L, _AIRWAY, _HEART, _AORTA, _VESSELS, _LIVER, _SPLEEN,
 _STOMACH, _KIDNEY_R, _KIDNEY_L, _SPINE, _RIBS, _STERNUM) = range(len(LABEL_NAMES))
_RU, _RM, _RL, _LU, _LL = range(1, len(REGION_NAMES))

# Unenhanced HU of each label, and the amplitude of its fine texture.
_BASE_HU = np.array([-1000, 40, -100, -850, -850, 40, 38, 42, 40, 58, 46, 25, 30, 30, 260, 300,
                     330], np.float32)
_TEXTURE_HU = np.array([0, 7, 9, 0, 0, 4, 4, 3, 3, 5, 4, 6, 5, 5, 45, 30, 40], np.float32)
_BLOOD_HU = 40.0
_AIR_HU = -1000.0
_CORTEX_HU = 750.0
_MARROW_HU = 280.0
_HOLE_HU = -995.0
_F32 = np.float32
_REACH_MM = 3.5          # signed-distance rasters keep values down to -_REACH_MM


def _smooth(x, e0: float, e1: float):
  """Smoothstep from 0 at e0 to 1 at e1 (either order)."""
  t = np.clip((np.asarray(x, _F32) - _F32(e0)) * _F32(1.0 / (e1 - e0)), 0, 1)
  return t * t * (3 - 2 * t)


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class _Grid:
  """The voxel grid: `shape` voxels over `fov` mm, centred on the physical origin."""
  shape: tuple[int, int, int]
  fov: np.ndarray

  @property
  def spacing(self) -> np.ndarray:
    return self.fov / np.asarray(self.shape)

  @property
  def origin(self) -> np.ndarray:
    return (-self.fov + self.spacing) / 2

  @property
  def voxel(self) -> float:
    """Edge of the cube with the voxel's volume, mm: the partial-volume length."""
    return float(np.prod(self.spacing) ** (1 / 3))

  def axis(self, k: int, box: slice = slice(None)) -> np.ndarray:
    return self.origin[k] + np.arange(self.shape[k])[box] * self.spacing[k]

  def box(self, points: np.ndarray, pad: float = 0.0) -> tuple[slice, slice, slice]:
    """Index slices covering physical points [N, 3] (z, y, x) plus `pad` mm."""
    lo = np.floor((points.min(0) - pad - self.origin) / self.spacing).astype(int)
    hi = np.ceil((points.max(0) + pad - self.origin) / self.spacing).astype(int) + 1
    lo = np.clip(lo, 0, self.shape)
    hi = np.clip(hi, lo, self.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


@dataclasses.dataclass(frozen=True)
class _Pose:
  """Subject frame (Z up, Y posterior, X to the patient's left; mm of a standard body with
  the carina at 0) -> physical (z, y, x): scale, an in-plane rotation, then a shift whose
  in-plane part varies linearly with z (a small tilt)."""
  centre: np.ndarray   # physical (z, y, x) of the subject origin
  scale: np.ndarray    # (Z, Y, X) stretch
  angle: float         # rotation about the z axis, rad
  tilt: np.ndarray     # in-plane shift per mm of z: (dy/dz, dx/dz)

  def to_physical(self, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    c, s = math.cos(self.angle), math.sin(self.angle)
    dz = self.scale[0] * a[..., 0]
    v, u = self.scale[1] * a[..., 1], self.scale[2] * a[..., 2]
    y = self.centre[1] + self.tilt[0] * dz + s * u + c * v
    x = self.centre[2] + self.tilt[1] * dz + c * u - s * v
    return np.stack([self.centre[0] + dz, y, x], -1)

  def grid(self, grid: _Grid):
    """Subject coordinates of every voxel: Z [D, 1, 1], Y and X [D, H, W] (float32)."""
    c, s = math.cos(self.angle), math.sin(self.angle)
    dz = grid.axis(0) - self.centre[0]
    oy = self.centre[1] + self.tilt[0] * dz
    ox = self.centre[2] + self.tilt[1] * dz
    y, x = grid.axis(1)[:, None], grid.axis(2)[None, :]
    sy, sx = self.scale[1], self.scale[2]
    Y = (c * y - s * x).astype(_F32)[None] / _F32(sy) - ((c * oy - s * ox) / sy).astype(
        _F32)[:, None, None]
    X = (c * x + s * y).astype(_F32)[None] / _F32(sx) - ((c * ox + s * oy) / sx).astype(
        _F32)[:, None, None]
    return (dz / self.scale[0]).astype(_F32)[:, None, None], Y, X

  @property
  def mean_scale(self) -> float:
    return float(np.prod(self.scale) ** (1 / 3))


# ------------------------------------------------------------------- anatomy
# Body outline without subcutaneous fat, (Z, half-width X, half-depth Y) in subject mm.
_BODY_Z = np.array([-330, -230, -160, -60, 40, 100, 160], np.float64)
_BODY_A = np.array([136, 138, 146, 152, 146, 138, 130], np.float64)
_BODY_B = np.array([94, 95, 97, 100, 98, 92, 82], np.float64)
# Vertebral column: centre depth and body half-axes against Z.
_SPINE_Z = np.array([-330, -220, -120, 0, 130], np.float64)
_SPINE_Y = np.array([14, 22, 30, 32, 26], np.float64)
_SPINE_AX = np.array([25, 23, 20, 17, 15], np.float64)
_SPINE_AY = np.array([18, 17, 16, 14, 12], np.float64)
# Rib drop (mm, head to anterior end) and the angle (from posterior, rad) where bone ends.
_RIB_DROP = np.array([35, 60, 80, 95, 105, 110, 112, 110, 100, 90, 60, 40], np.float64)
_RIB_END = np.array([2.55, 2.6, 2.6, 2.6, 2.6, 2.58, 2.5, 2.35, 2.15, 1.95, 1.6, 1.25])


def _ellipsoid_q(Z, Y, X, centre, axes, rot):
  """Squared normalised radius of an ellipsoid (< 1 inside); rot rows are its unit axes in
  (Z, Y, X)."""
  dz, dy, dx = Z - _F32(centre[0]), Y - _F32(centre[1]), X - _F32(centre[2])
  q = 0
  for e, a in zip(np.asarray(rot, _F32), np.asarray(axes, _F32)):
    t = (e[0] * dz + e[1] * dy + e[2] * dx) * (1 / a)
    q = q + t * t
  return q


def _frame(long_axis, last_axis=(0.0, 0.0, 1.0)) -> np.ndarray:
  """An orthonormal frame (rows) whose first axis is `long_axis` (Z, Y, X) and whose last
  axis is as close to `last_axis` as that allows."""
  e1 = _unit(long_axis)
  e2 = np.cross(last_axis, e1)
  e2 = _unit(e2 if np.linalg.norm(e2) > 0.1 else np.cross([1.0, 0, 0], e1))
  return np.stack([e1, e2, np.cross(e1, e2)])


def _ellipsoid_extent(axes, rot) -> np.ndarray:
  """Half-extent along (Z, Y, X) of an ellipsoid."""
  return np.sqrt(((np.asarray(axes)[:, None] * np.asarray(rot)) ** 2).sum(0))


class _Anatomy:
  """One subject's shape parameters (subject frame, mm) and the implicit shapes built from
  them. Every method takes broadcastable Z, Y, X arrays: voxel grids and point sets alike."""

  def __init__(self, rng: np.random.Generator):
    u, n = rng.uniform, rng.normal
    sx = u(0.88, 1.06)
    self.pose = _Pose(centre=np.array([82.0 + u(-12, 12), u(-10, 10), u(-12, 12)]),
                      scale=np.array([u(0.93, 1.07), sx * u(0.93, 1.07), sx]),
                      angle=float(np.clip(n(0, 0.035), -0.09, 0.09)),
                      tilt=np.clip(n(0, 0.02, 2), -0.05, 0.05))
    self.fat = u(4, 26)                 # subcutaneous fat thickness scale, mm
    self.insp = u(0, 1)                 # inspiration depth
    self.dome_r = -105 - 40 * self.insp + n(0, 5)
    self.dome_l = self.dome_r - 14 + n(0, 4)
    self.tendon = min(self.dome_r, self.dome_l) - 6
    self.apex_z = 86 + n(0, 4)
    self.mid_x = 3.0 + n(0, 2)
    self.lung_hu = float(np.clip(-810 - 65 * self.insp + n(0, 6), -880, -800))
    self.gravity = u(10, 30)            # HU denser per 100 mm toward posterior (supine)
    self.noise_hu = u(10, 20)
    self.spine_dy = n(0, 4)             # depth offset of the spine
    self.fissure = n(0, 6, 4)           # offsets of the major (R, L), minor fissure; slope
    # Heart: a ventricular ellipsoid on the central tendon plus two atria.
    hs = float(np.clip(rng.lognormal(0, 0.1), 0.85, 1.35))
    self.heart_scale = hs
    rot = _frame(_unit([-0.42, -0.5, 0.76]) + n(0, 0.06, 3))
    axes = np.array([62, 47, 42]) * hs
    ext = _ellipsoid_extent(axes, rot)
    hc = np.array([self.tendon + ext[0] - 8, -26 + n(0, 4), 14 + n(0, 4)])
    self.heart = [(hc, axes, rot),
                  (hc + np.array([30, 26, -8]) * hs, np.array([22, 16, 32]) * hs, np.eye(3)),
                  (hc + np.array([10, 8, -28]) * hs, np.array([28, 22, 20]) * hs, np.eye(3))]
    self.hc = hc
    # Abdominal organs.
    dl = self.dome_l
    self.liver_drop = 125 * u(0.85, 1.15)
    self.spleen = (np.array([dl - 60, 34 + n(0, 5), 92 + n(0, 4)]),
                   np.array([55, 42, 22]) * u(0.85, 1.15), _frame([0.7, 0.6, -0.35],
                                                                  [0, -0.3, 1]))
    self.stomach = (np.array([dl - 48, -18 + n(0, 5), 56 + n(0, 5)]),
                    np.array([48, 36, 44]) * u(0.85, 1.15), _frame([0.6, 0.2, 0.6]))
    self.gas = u(0.1, 0.45)             # fraction of the stomach's depth holding gas
    kz = -212 + n(0, 8)
    self.kidneys = [
      (np.array([kz - 14 + n(0, 5), 54, -72 + n(0, 4)]), np.array([52, 24, 30]),
       _frame([1, 0.15, 0.28])),
      (np.array([kz + n(0, 5), 54, 72 + n(0, 4)]), np.array([52, 24, 30]),
       _frame([1, 0.15, -0.28]))]
    self.vertebrae = self._vertebral_levels(n(0, 4))
    self.ribs = self._rib_paths()

  # ------------------------------------------------------------- body wall
  def body_axes(self, Z):
    belly = 1 + 0.5 * _smooth(Z, -120, -220)
    a = np.interp(Z, _BODY_Z, _BODY_A).astype(_F32) + _F32(0.95 * self.fat) * belly
    b = np.interp(Z, _BODY_Z, _BODY_B).astype(_F32) + _F32(0.75 * self.fat) * belly
    return a, b

  def _thickness(self, Z, ux, uy):
    """Subcutaneous fat and muscle thickness (mm) in direction (ux, uy) from the body axis:
    fat thicker behind and in the abdomen; pectorals in front of the upper chest, paraspinal
    muscles behind, and the shoulder girdle narrowing the thoracic inlet at the top."""
    belly = 1 + 0.5 * _smooth(Z, -120, -220)
    ux2 = ux * ux
    fat = 0.2 * ux2
    fat += 0.25 * uy
    fat += 0.75
    fat *= _F32(self.fat) * belly
    post = np.clip(uy, 0, 1)
    post *= post
    post *= post
    post *= post
    muscle = np.clip(-uy, 0, 1)
    muscle *= np.abs(ux)
    muscle *= 30 * _smooth(Z, -110, -40)
    muscle += 30 * post
    muscle += 5
    upper = np.maximum(Z - 30, 0)
    muscle += upper * 0.25 + (upper * 0.55) * ux2
    return fat, muscle

  def wall(self, Z, Y, X):
    """depth below the skin along rays from the body axis, and the depths where the fat
    ends and where the rib layer ends (the inner chest/abdominal wall)."""
    a, b = self.body_axes(Z)
    u, v = X * (1 / a), Y * (1 / b)
    rho = np.maximum(np.abs(u), np.abs(v))
    rho *= 0.28
    u *= u
    v *= v
    u += v
    np.sqrt(u, out=u)
    u *= 0.72
    rho += u
    rho += _F32(1e-6)
    r = X * X
    r += Y * Y
    np.sqrt(r, out=r)
    r += _F32(1e-3)
    depth = r / rho
    depth -= r
    fat, muscle = self._thickness(Z, X / r, Y / r)
    muscle += fat
    muscle += 10
    return depth, fat, muscle

  def surface_radius(self, Z, ux, uy):
    """Distance from the body axis to the skin along unit direction (ux, uy)."""
    a, b = self.body_axes(Z)
    u, v = ux / a, uy / b
    return 1 / (0.72 * np.sqrt(u * u + v * v) + 0.28 * np.maximum(np.abs(u), np.abs(v)))

  # ------------------------------------------------------------- thorax
  def diaphragm(self, Y, X):
    """Height of the diaphragm: right and left domes and the central tendon under the heart."""
    back = Y + 5                       # the domes fall away faster behind than in front
    back *= back
    back *= np.where(Y < -5, _F32(0.6 / 110), _F32(1 / 110))
    right = X + 62
    right *= right
    right *= _F32(-1 / 80)
    right += _F32(self.dome_r)
    left = X - 62
    left *= left
    left *= _F32(-1 / 80)
    left += _F32(self.dome_l)
    height = np.maximum(right, left, out=right)
    height -= back
    tendon = X - _F32(self.hc[2])
    tendon *= tendon
    back = Y - _F32(self.hc[1])
    back *= back
    tendon += back
    tendon *= _F32(-1 / 150)
    tendon += _F32(self.tendon)
    return np.maximum(height, tendon, out=height)

  def apex(self, Y, X):
    """Upper surface of each lung (a rounded cap over the apex)."""
    xa = np.where(X < self.mid_x, _F32(-58), _F32(58))
    q = np.sqrt(((X - xa) ** 2 + 0.3 * (Y - 5) ** 2) * (1 / 70 ** 2))
    q *= np.sqrt(q)
    return _F32(self.apex_z) - 95 * q

  def band(self, Z, Y, X):
    """The mediastinal band between the lungs (narrow in front, wider around the spine and
    in the superior mediastinum)."""
    w = 12 + 11 * _smooth(Y, -45, 5) + 9 * _smooth(Z, 10, 60)
    return np.abs(X - _F32(self.mid_x)) < w

  def heart_q(self, Z, Y, X, grow: float = 0.0):
    """min over the heart's ellipsoids of the squared normalised radius (< 1 inside)."""
    return np.minimum.reduce([_ellipsoid_q(Z, Y, X, c, a + grow, r) for c, a, r in self.heart])

  def heart_shadow(self, Z, Y, X, grow: float):
    """Inside a heart ellipsoid grown by `grow` mm, or below one: the heart rests on the
    diaphragm, so pericardial fat, not lung, fills the space under it."""
    out = False
    for c, a, rot in self.heart:
      e = np.asarray(rot) / (np.asarray(a) + grow)[:, None]     # rows: axis / half-length
      w = [_F32(e[i, 1]) * (Y - _F32(c[1])) + _F32(e[i, 2]) * (X - _F32(c[2]))
           for i in range(3)]
      # The squared normalised radius is quadratic in Z: A dz^2 + B dz + C.
      A = _F32((e[:, 0] ** 2).sum())
      B = 2 * sum(_F32(e[i, 0]) * w[i] for i in range(3))
      C = sum(wi * wi for wi in w)
      dz = Z - _F32(c[0])
      lowest = C - B * B / (4 * A)
      out = out | (((A * dz + B) * dz + C < 1) | ((dz < -B / (2 * A)) & (lowest < 1)))
    return out

  def heart_box(self, grow: float):
    lo = np.min([c - _ellipsoid_extent(a + grow, r) for c, a, r in self.heart], 0)
    hi = np.max([c + _ellipsoid_extent(a + grow, r) for c, a, r in self.heart], 0)
    return lo, hi

  def lung_side(self, Z, Y, X, tube_sd=None):
    """3 (right lung), 4 (left lung) or 0 at subject points; tube_sd: the mediastinal tubes'
    signed distance there (see _rasterise), None to ignore them."""
    depth, _, cavity = self.wall(Z, Y, X)
    inside = ((depth > cavity) & (Z > self.diaphragm(Y, X)) & (Z < self.apex(Y, X))
              & ~self.band(Z, Y, X) & ~self.heart_shadow(Z, Y, X, 6.0))
    if tube_sd is not None:
      inside &= tube_sd < -3
    return np.where(inside, np.where(X < self.mid_x, _LUNG_R, _LUNG_L), 0).astype(np.uint8)

  def lobes(self, Z, Y, X, side):
    """Lobe (REGION_NAMES index) of lung points of the given side labels."""
    f = self.fissure
    slope = 1.15 + 0.05 * f[3]
    major_r = 14 + f[0] + slope * (Y - 75)       # below: right lower lobe
    major_l = 24 + f[1] + slope * (Y - 75)
    minor = -42 + f[2] - 0.1 * Y
    right = np.where(Z < major_r, _RL, np.where(Z < minor, _RM, _RU))
    left = np.where(Z < major_l, _LL, _LU)
    return np.where(side == _LUNG_R, right, np.where(side == _LUNG_L, left, 0)).astype(np.uint8)

  # ------------------------------------------------------------- tubes
  def tubes(self) -> dict[int, list[np.ndarray]]:
    """Mediastinal and abdominal tubes by label: polylines of (Z, Y, X, radius) rows;
    airway radii are the lumen."""
    hc, hs = self.hc, self.heart_scale
    root_a = hc + np.array([34, 2, -8]) * hs
    root_p = hc + np.array([32, -22, 2]) * hs
    ra = hc + np.array([10, 8, -28]) * hs
    bif = np.array([-18, -20, 12])
    return {
      _AIRWAY: [
        np.array([[170, -8, -1, 9.5], [60, -4, -1, 9.5], [0, 2, 0, 9]]),
        np.array([[0, 2, 0, 7.5], [-14, 4, -16, 7], [-24, 6, -30, 6.5]]),
        np.array([[0, 2, 0, 7], [-12, 5, 18, 6.5], [-28, 9, 40, 6]])],
      _AORTA: [np.array([
        [*root_a, 13], [-38, -24, 0, 15], [8, -26, -1, 14], [32, -16, 6, 13],
        [38, 0, 16, 12.5], [30, 14, 22, 12], [0, 17, 24, 12], [-80, 16, 22, 11.5],
        [self.tendon - 10, 10, 14, 11], [-230, 2, 8, 10], [-340, -2, 6, 9.5]])],
      _VESSELS: [
        np.array([[*root_p, 13], [-32, -34, 14, 13], [*bif, 12]]),                # trunk
        np.array([[*bif, 11], [-26, -12, -10, 10.5], [-30, -12, -32, 10]]),       # RPA
        np.array([[*bif, 10], [-12, -6, 24, 10], [-8, 2, 42, 9.5]]),              # LPA
        np.array([[170, -22, -26, 9], [20, -22, -28, 10], [*ra, 10]]),            # SVC
        np.array([[-340, 8, -22, 11], [self.tendon - 40, 2, -26, 12], [*ra, 12]]),  # IVC
        np.array([[32, -14, 2, 7], [170, -12, -14, 7]]),          # brachiocephalic trunk
        np.array([[38, -6, 9, 5], [170, -4, 0, 5]]),              # left common carotid
        np.array([[38, 2, 14, 6], [120, 8, 22, 6], [170, 12, 36, 6]]),  # left subclavian
        np.array([[60, -36, 40, 7], [50, -34, 0, 7.5], [40, -24, -26, 8]])],  # L brachioceph.
      _BODY: [np.array([[170, 14, 3, 7], [0, 14, 6, 7], [-120, 10, 14, 7],
                        [self.tendon - 22, -2, 34, 7]])],                  # oesophagus
    }

  def tree_roots(self):
    """Per lung (right, left): airway root (main bronchus end), pulmonary artery root (its
    end), pulmonary vein root (at the left atrium)."""
    la = self.heart[1][0]
    t = self.tubes()
    return [(t[_AIRWAY][1][-1, :3], t[_VESSELS][1][-1, :3], la + np.array([-4, 2, -30])),
            (t[_AIRWAY][2][-1, :3], t[_VESSELS][2][-1, :3], la + np.array([-4, 2, 30]))]

  # ------------------------------------------------------------- skeleton
  def _vertebral_levels(self, shift: float) -> np.ndarray:
    """Upper boundaries (Z, descending) of vertebra+disc levels C6..L5; T4/T5 at the carina."""
    heights = np.concatenate([[18, 19], 20 + 0.7 * np.arange(1, 13), [32, 33, 34, 34, 34]])
    top = -2 + shift + heights[:6].sum()          # C6..T4 lie above the T4/T5 disc
    return top - np.concatenate([[0], np.cumsum(heights)])

  def spine_fraction(self, Z):
    """Height within the vertebra+disc level holding Z: 0 at its bottom, 1 at its top."""
    b = self.vertebrae
    k = np.clip(np.searchsorted(-b, -Z) - 1, 0, len(b) - 2)
    return (Z - b[k + 1]) / (b[k] - b[k + 1])

  def _rib_paths(self):
    """12 ribs per side as (Z, Y, X, radius) polylines following the inner chest wall, and
    the costal cartilages of ribs 1-7."""
    b = self.vertebrae
    ribs, cartilage = [], []
    for k in range(12):
      top, bottom = b[k + 2], b[k + 3]          # T(k+1)
      z0 = bottom + 0.75 * (top - bottom)
      theta = np.linspace(0.3, _RIB_END[k], 20)
      f = (theta - 0.3) / (2.6 - 0.3)
      Z = z0 + 10 * f * (1 - f) - _RIB_DROP[k] * f ** 1.6
      r = 3.6 if k in (0, 10, 11) else 4.3
      for side in (-1, 1):
        ribs.append(self._on_wall(Z, theta, side, r, head=True))
        if k < 7:
          th = np.linspace(_RIB_END[k], 3.0, 5)
          zc = Z[-1] + 6 * (th - th[0]) / (th[-1] - th[0])
          cartilage.append(self._on_wall(zc, th, side, 3.5))
    return ribs, cartilage

  def _on_wall(self, Z, theta, side, radius, head=False):
    """Points of the rib layer at angles theta from posterior (side -1: patient right);
    head: start at the transverse process, where the rib articulates."""
    ux, uy = side * np.sin(theta), np.cos(theta)
    R = self.surface_radius(Z, ux, uy).astype(np.float64)
    fat, muscle = self._thickness(Z.astype(_F32), ux.astype(_F32), uy.astype(_F32))
    rr = R - fat - muscle - 4.5
    pts = np.stack([Z, rr * uy, rr * ux, np.full_like(Z, radius)], -1)
    if not head:
      return pts
    z_head = Z[0] + 4
    y_head = np.interp(z_head, _SPINE_Z, _SPINE_Y) + self.spine_dy + 30
    return np.concatenate([[[z_head, y_head, side * 26, radius]], pts])


# ------------------------------------------------------------------- rasterisation
def _segments(polylines, pose: _Pose, max_len: float = 12.0):
  """Subject-frame polylines of (Z, Y, X, radius) rows -> physical tube segments (p0, p1,
  r0, r1), each polyline edge cut into pieces <= max_len mm (tight bounding boxes)."""
  lines = [np.asarray(line, np.float64) for line in polylines]
  a = np.concatenate([line[:-1] for line in lines])
  b = np.concatenate([line[1:] for line in lines])
  pieces = np.maximum(1, np.ceil(np.linalg.norm(b[:, :3] - a[:, :3], axis=1) / max_len)).astype(
      int)
  edge = np.repeat(np.arange(len(a)), pieces)
  k = np.arange(len(edge)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
  t0 = (k / pieces[edge])[:, None]
  t1 = ((k + 1) / pieces[edge])[:, None]
  q0 = a[edge] + t0 * (b[edge] - a[edge])
  q1 = a[edge] + t1 * (b[edge] - a[edge])
  s = pose.mean_scale
  return (pose.to_physical(q0[:, :3]), pose.to_physical(q1[:, :3]), q0[:, 3] * s, q1[:, 3] * s)


def _tube_sd_points(points, segs):
  """max over tube segments of (radius - distance) at physical points [P, 3]."""
  p0, p1, r0, r1 = segs
  v = p1 - p0
  d = points[:, None, :] - p0[None]
  t = np.clip((d * v).sum(-1) / ((v * v).sum(-1) + 1e-9), 0, 1)
  dist = np.linalg.norm(d - t[..., None] * v, axis=-1)
  return (r0 + t * (r1 - r0) - dist).max(1)


def _rasterise(grid: _Grid, segs, occupancy: bool = False, reach: float = _REACH_MM,
               tags: np.ndarray | None = None) -> np.ndarray:
  """Tube segments on the voxel grid, each evaluated in its own bounding box.

  Boxes are bucketed by size so that each bucket is one broadcast [segments, z, y, x]
  computation (no per-voxel gathers), merged into the grid with a scatter-max.

  occupancy=False: the signed distance max_s(r_s(t) - d_s) in mm (> 0 inside), floored at
  -reach. occupancy=True: the partial-volume fraction, a linear ramp one voxel wide across
  the wall, scaled down for tubes thinner than a voxel so that their integrated contrast
  stays near the true cross-section. tags (ints < 16, one per segment; signed distance
  only): return instead an int32 field packing the distance with the tag of the deepest
  segment (see _unpack).
  """
  p0, p1, r0, r1 = (np.asarray(a, np.float64) for a in segs)
  shape = np.asarray(grid.shape)
  _, H, W = grid.shape
  h = grid.voxel
  floor = 0.0 if occupancy else -reach
  pad = np.maximum(r0, r1) + 0.5 * h - floor
  lo = np.floor((np.minimum(p0, p1) - pad[:, None] - grid.origin) / grid.spacing).astype(int)
  hi = np.ceil((np.maximum(p0, p1) + pad[:, None] - grid.origin) / grid.spacing).astype(int)
  hit = (hi >= 0).all(1) & (lo < shape).all(1)
  size = (hi - lo) // 2 * 2 + 2                   # buckets of even box sizes
  if tags is None:
    out = np.full(grid.shape, floor, _F32)
  else:
    out = np.full(grid.shape, _pack(floor, 0), np.int32)
  flat_out = out.reshape(-1)
  v = p1 - p0
  vv = (v * v).sum(1).clip(1e-9)
  rm = (r0 + r1) / 2 / h
  gain = np.minimum(1, np.pi * rm ** 2 / np.minimum(1, rm + 0.5))
  buckets, which = np.unique(size[hit], axis=0, return_inverse=True)
  index = np.flatnonzero(hit)
  for b, n in enumerate(buckets):
    sel = index[which.reshape(-1) == b]
    g = [lo[sel, k][:, None] + np.arange(n[k]) for k in range(3)]
    d = [(g[k] * grid.spacing[k] + (grid.origin[k] - p0[sel, k])[:, None]).astype(_F32)
         for k in range(3)]
    col = lambda a: a.astype(_F32)[:, None, None, None]     # noqa: E731  (per segment)
    dz, dy, dx = d[0][:, :, None, None], d[1][:, None, :, None], d[2][:, None, None, :]
    # Squared distance to the segment from |d|^2, d.v and the clamped projection t.
    dv = (dz * col(v[sel, 0]) + dy * col(v[sel, 1])) + dx * col(v[sel, 2])
    t = np.clip(dv * col(1 / vv[sel]), 0, 1)
    dist = (dz * dz + dy * dy) + dx * dx
    dv *= 2
    dv -= t * col(vv[sel])
    dv *= t
    dist -= dv
    np.maximum(dist, 0, out=dist)
    np.sqrt(dist, out=dist)
    val = t * col(r1[sel] - r0[sel])
    val += col(r0[sel])
    val -= dist
    if occupancy:
      val *= _F32(1 / h)
      val += _F32(0.5)
      np.clip(val, 0, 1, out=val)
      val *= col(gain[sel])
    keep = val > floor
    if (lo[sel] < 0).any() or (lo[sel] + n > shape).any():
      valid = [(gk >= 0) & (gk < m) for gk, m in zip(g, grid.shape)]
      keep &= (valid[0][:, :, None, None] & valid[1][:, None, :, None]) & valid[2][:, None,
                                                                                   None, :]
    g = [gk.astype(np.int32) for gk in g]
    flat = ((g[0] * (H * W))[:, :, None, None] + (g[1] * W)[:, None, :, None]
            + g[2][:, None, None, :])[keep]
    val = val[keep]
    if tags is not None:
      val = _pack(val, np.broadcast_to(tags[sel][:, None, None, None], keep.shape)[keep])
    np.maximum.at(flat_out, flat, val)
  return out


def _pack(sd, tag):
  """Signed distance (1/256 mm steps) and a tag < 16 in one int32 that orders by distance."""
  return (np.floor(np.asarray(sd) * 256).astype(np.int32) << 4) | np.asarray(tag, np.int32)


def _unpack(packed: np.ndarray):
  """(signed distance, tag) from _pack."""
  return (packed >> 4).astype(_F32) / 256, (packed & 15).astype(np.uint8)


def _value_noise(rng: np.random.Generator, grid: _Grid, cell_mm: float,
                 box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
  """Smooth, roughly unit-variance random field with features of ~cell_mm, on the voxels of
  `box`. The random lattice covers the whole field of view in mm, so the field is the same
  function of physical position at every grid shape and for every box."""
  n = np.ceil(grid.fov / cell_mm).astype(int) + 4
  lat = rng.standard_normal(tuple(n), dtype=_F32)
  for axis in range(3):                       # [1, 2, 1] / 4 smoothing, periodic
    lat = 0.5 * lat + 0.25 * (np.roll(lat, 1, axis) + np.roll(lat, -1, axis))
  lat *= _F32(1 / 0.375 ** 1.5)               # the smoothing's variance gain is 0.375^3
  box = box or (slice(None),) * 3
  idx, wts = [], []
  for k in range(3):
    pos = (grid.axis(k, box[k]) + grid.fov[k] / 2) / cell_mm + 1.5
    i0 = np.floor(pos).astype(int)
    idx.append(i0)
    wts.append((pos - i0).astype(_F32))
  (iz, iy, ix), (wz, wy, wx) = idx, wts
  lat = lat[iz.min():iz.max() + 2, iy.min():iy.max() + 2]
  iz, iy = iz - iz.min(), iy - iy.min()
  f = lat[:, :, ix] * (1 - wx) + lat[:, :, ix + 1] * wx
  f = f[:, iy] * (1 - wy)[:, None] + f[:, iy + 1] * wy[:, None]
  return f[iz] * (1 - wz)[:, None, None] + f[iz + 1] * wz[:, None, None]


def _blur(vol: np.ndarray, sigma: float) -> None:
  """In-place 3-tap Gaussian blur along every axis (the scanner's point-spread function)."""
  k = np.exp(-0.5 / sigma ** 2)
  k = np.array([k, 1, k], _F32) / _F32(1 + 2 * k)
  kernel = k[:, None]
  for z in range(vol.shape[0]):
    cv2.sepFilter2D(vol[z], -1, kernel, kernel, dst=vol[z], borderType=cv2.BORDER_REPLICATE)
  prev = vol[0].copy()
  for z in range(vol.shape[0]):              # along z, in place, keeping the unblurred z-1
    cur = vol[z].copy()
    nxt = vol[min(z + 1, vol.shape[0] - 1)]
    vol[z] = k[0] * prev + k[1] * cur + k[2] * nxt
    prev = cur


# ------------------------------------------------------------------- trees
def _bisection_tree(points: np.ndarray, root: np.ndarray, step: float = 0.45):
  """A branching tree from `root` whose leaves are `points` (recursive bisection, after
  Kitaoka's and Tawhai's airway models): each branch runs `step` of the way towards the
  centroid of the points it supplies, which are then halved across their principal axis
  between its two children. Built one generation at a time, vectorised over the branches
  of a generation. Returns per branch: start, end [S, 3], number of leaves supplied, and
  parent index (-1 for the root branch)."""
  starts = np.asarray(root, np.float64)[None]
  parents = np.array([-1])
  group = np.zeros(len(points), int)          # which branch of this generation feeds a point
  out, first = [], 0
  while len(starts):
    G = len(starts)
    count = np.bincount(group, minlength=G)
    centroid = np.stack([np.bincount(group, points[:, k], G) for k in range(3)], 1)
    centroid /= count[:, None]
    single = count == 1
    ends = np.where(single[:, None], centroid, starts + step * (centroid - starts))
    out.append((starts, ends, count, parents))
    split = ~single
    keep = split[group]
    points, group = points[keep], group[keep]
    c = points - centroid[group]
    cov = np.zeros((G, 3, 3))
    for i in range(3):
      for j in range(i, 3):
        cov[:, i, j] = cov[:, j, i] = np.bincount(group, c[:, i] * c[:, j], G)
    axis = np.linalg.eigh(cov)[1][:, :, -1]
    proj = (c * axis[group]).sum(1)
    order = np.lexsort((proj, group))
    rank = np.empty(len(order), int)
    rank[order] = np.arange(len(order)) - np.searchsorted(group[order], group[order])
    child = np.cumsum(split) - 1                # index among the branches that split
    group = 2 * child[group] + (rank >= count[group] // 2)
    starts = np.repeat(ends[split], 2, axis=0)
    parents = np.repeat(first + np.flatnonzero(split), 2)
    first += G
  starts, ends, count, parents = (np.concatenate(x) for x in zip(*out))
  return starts, ends, count, parents


def _offset_tree(starts, ends, parents, root, gap):
  """The tree's branches shifted sideways by `gap` [S] (mm) along a perpendicular that is
  continuous from parent to child: the artery beside each bronchus. The root branch starts
  at `root` instead."""
  u = _unit(ends - starts + 1e-9)
  side = np.cross(u, _unit([0.3, 0.5, 0.8]))
  side /= np.linalg.norm(side, axis=1, keepdims=True).clip(1e-6)
  new_ends = ends + side * gap[:, None]
  new_starts = np.where((parents < 0)[:, None], root, new_ends[np.maximum(parents, 0)])
  return new_starts, new_ends


# ------------------------------------------------------------------- subjects
@dataclasses.dataclass
class CTSubject:
  """One rendered subject (see the module docstring for the conventions).

  Attributes:
   image: int16 HU volume.
   labels: uint8 label map over LABEL_NAMES, same geometry.
   regions: uint8 lobe map over REGION_NAMES (0 outside the lungs).
   emphysema: bool [D, H, W], the lung voxels the emphysema pushed below LAA_THRESHOLD_HU.
   region_severity: float32 [len(REGION_NAMES) - 1]; entry i is the fraction of region
    i + 1's voxels in `emphysema`.
   severity: fraction of all lung voxels in `emphysema`.
   nodule_mask: bool [D, H, W], voxels at least half covered by a nodule (inside lungs).
   nodules: float64 [K, 4], each nodule's physical centre (z, y, x) and mean radius, mm.
   index: the subject index.
  """
  image: Volume
  labels: Volume
  regions: Volume
  emphysema: np.ndarray
  region_severity: np.ndarray
  severity: float
  nodule_mask: np.ndarray
  nodules: np.ndarray
  index: int = 0


def _sample_in_lungs(anat: _Anatomy, tube_segs, rng: np.random.Generator, counts):
  """Uniform subject-frame points inside each lung: counts[0] right, counts[1] left."""
  lo = np.array([min(anat.dome_r, anat.dome_l) - 110, -110, -150])
  hi = np.array([anat.apex_z, 110, 150])
  found = [np.zeros((0, 3)), np.zeros((0, 3))]
  while any(len(f) < c for f, c in zip(found, counts)):
    pts = rng.uniform(lo, hi, (2048, 3))
    side = anat.lung_side(*(pts[:, k].astype(_F32) for k in range(3)))
    near = np.flatnonzero(side & (np.abs(pts[:, 2]) < 65))    # the tubes are central
    sd = _tube_sd_points(anat.pose.to_physical(pts[near]), tube_segs)
    side[near[sd >= -3]] = 0
    for k, lab in enumerate((_LUNG_R, _LUNG_L)):
      found[k] = np.concatenate([found[k], pts[side == lab]])
  return [f[:c] for f, c in zip(found, counts)]


def _trees(anat: _Anatomy, tube_segs, rng: np.random.Generator):
  """Intrapulmonary airways (lumen radii) and vessels (arteries beside the bronchi, veins on
  their own tree from the left atrium), as physical tube segments."""
  n_art, n_vein = 640, 448
  pts = _sample_in_lungs(anat, tube_segs, rng, (n_art + n_vein,) * 2)
  airways, vessels = [], []
  for (air_root, art_root, vein_root), p in zip(anat.tree_roots(), pts):
    starts, ends, leaves, parents = _bisection_tree(p[:n_art], air_root)
    frac = leaves / n_art
    r_air = 5.5 * frac ** 0.38
    r_art = 6.0 * frac ** 0.32
    keep = r_air >= 1.0
    airways.append((starts[keep], ends[keep], r_air[keep], 0.9 * r_air[keep]))
    a_starts, a_ends = _offset_tree(starts, ends, parents, art_root, r_air + 1.7 + r_art)
    vessels.append((a_starts, a_ends, r_art, 0.9 * r_art))
    starts, ends, leaves, _ = _bisection_tree(p[n_art:], vein_root)
    r_vein = 6.5 * (leaves / n_vein) ** 0.32
    vessels.append((starts, ends, r_vein, 0.9 * r_vein))
  s = anat.pose.mean_scale
  to_phys = anat.pose.to_physical

  def physical(parts):
    p0, p1, r0, r1 = (np.concatenate(x) for x in zip(*parts))
    return to_phys(p0), to_phys(p1), r0 * s, r1 * s
  return physical(airways), physical(vessels)


def _nodules(anat: _Anatomy, tube_segs, rng: np.random.Generator):
  """0-3 nodules (physical centre, radius mm, lobulation bumps and amplitudes), each fully
  inside one lung with a margin."""
  count = rng.choice(4, p=[0.5, 0.3, 0.15, 0.05])
  if not count:
    return []
  pool = _sample_in_lungs(anat, tube_segs, rng, (24, 24))
  dirs = _unit(np.concatenate([np.eye(3), -np.eye(3), np.array(np.meshgrid(
      [-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T]))
  out = []
  for _ in range(count):
    radius = float(np.exp(rng.uniform(np.log(2.0), np.log(11.0))))
    bumps = _unit(rng.normal(size=(3, 3)))
    amps = rng.uniform(0, 0.35, 3)
    for centre in pool[int(rng.random() < 0.45)]:
      probe = centre + dirs * (radius * 1.4 + 3) / anat.pose.mean_scale
      sd = _tube_sd_points(anat.pose.to_physical(probe), tube_segs).astype(_F32)
      side = anat.lung_side(*(probe[:, k].astype(_F32) for k in range(3)), sd)
      if side[0] and (side == side[0]).all():
        out.append((anat.pose.to_physical(centre), radius, bumps, amps))
        break
  return out


def _z_slab(Zc: np.ndarray, lo: float, hi: float) -> slice:
  """The slices whose subject height lies in [lo, hi] (Z depends on the slice only)."""
  k = np.flatnonzero((Zc >= lo) & (Zc <= hi))
  return slice(int(k[0]), int(k[-1]) + 1) if len(k) else slice(0, 0)


class _Painter:
  """One subject being rasterised: the subject-frame coordinates of every voxel, the label
  map, and what each stage leaves for the later ones. Stages run in the order of
  `_render`; shapes are evaluated only in their bounding boxes or z slabs."""

  def __init__(self, anat: _Anatomy, grid: _Grid):
    self.anat, self.grid, self.h = anat, grid, grid.voxel
    self.Z, self.Y, self.X = anat.pose.grid(grid)
    self.Zc = self.Z[:, 0, 0]
    self.labels = np.zeros(grid.shape, np.uint8)
    self.flat_labels = self.labels.reshape(-1)
    self.specials = []    # (box, mask, label, HU, texture amplitude): tissues within labels

  def box(self, lo, hi):
    """Index box of a subject-frame box."""
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    return self.grid.box(self.anat.pose.to_physical(corners), self.h)

  def coords(self, b):
    return self.Z[b[0]], self.Y[b], self.X[b]

  def ellipsoid(self, centre, axes, rot, grow=0.0):
    """(box, mask in the box) of an ellipsoid."""
    axes = np.asarray(axes, np.float64) + grow
    ext = _ellipsoid_extent(axes, rot)
    b = self.box(centre - ext, centre + ext)
    return b, _ellipsoid_q(*self.coords(b), centre, axes, rot) < 1

  def tubes(self):
    """Mediastinal and abdominal tubes in one packed raster (the lungs avoid them)."""
    pose = self.anat.pose
    self.wall_mm = 2.0 * pose.mean_scale
    segs, tags = [], []
    for lab, lines in self.anat.tubes().items():
      if lab == _AIRWAY:           # rasterise the outer wall; the lumen is wall_mm inside
        lines = [line + np.array([0, 0, 0, 2.0]) for line in lines]
      seg = _segments(lines, pose)
      segs.append(seg)
      tags.append(np.full(len(seg[0]), lab))
    self.tube_segs = tuple(np.concatenate(x) for x in zip(*segs))
    self.tube_packed = _rasterise(self.grid, self.tube_segs, tags=np.concatenate(tags))

  def body_wall(self, rng: np.random.Generator):
    """Skin, fat, muscle and rib layers (within the body's bounding box); the cavity inside
    them, split by the diaphragm; fat and bowel wherever organs will not be."""
    anat, Z = self.anat, self.Z
    a, b = anat.body_axes(np.linspace(-400.0, 400.0, 81))
    wb = self.body_box = self.box([-400, -b.max() - 6, -a.max() - 6],
                                  [400, b.max() + 6, a.max() + 6])
    depth, fat_end, cavity_end = anat.wall(*self.coords(wb))
    self.body = np.zeros(self.grid.shape, bool)
    self.body[wb] = depth > 0
    self.labels[wb][self.body[wb]] = _BODY
    self.labels[wb][(depth > 2) & (depth < fat_end)] = _FAT
    cavity = np.zeros(self.grid.shape, bool)
    cavity[wb] = depth > cavity_end
    self.inner = np.full(self.grid.shape, -np.inf, _F32)     # depth below the inner wall
    self.inner[wb] = depth - cavity_end
    self.top = max(anat.dome_r, anat.dome_l, anat.tendon) + 1
    ds = _z_slab(self.Zc, -np.inf, self.top)       # the diaphragm lies below its top
    zd = anat.diaphragm(self.Y[ds], self.X[ds])
    self.thorax = cavity.copy()
    self.thorax[ds] &= Z[ds] > zd
    self.abdomen = np.zeros(self.grid.shape, bool)
    self.abdomen[ds] = cavity[ds] & (Z[ds] < zd - 5)
    # Mostly fat in the chest (mediastinal fat), more soft tissue in the neck and abdomen.
    mix = _value_noise(rng, self.grid, 11.0, wb)
    neck = _F32(0.4) * (Z[wb[0]] > anat.apex_z - 25)
    cut = np.where(self.thorax[wb], _F32(-1.2) + neck, _F32(0.3 - 0.03 * anat.fat))
    self.labels[wb][cavity[wb] & (mix > cut)] = _FAT
    gas = np.zeros(self.grid.shape, bool)                 # bowel gas
    gas[wb] = mix < -1.9
    self.specials.append((ds, self.abdomen[ds] & gas[ds], _BODY, -960.0, 20.0))

  def lungs(self):
    """Thorax minus the mediastinum: below the apex caps, outside the mediastinal band, the
    heart and the tubes (with margins)."""
    anat = self.anat
    ts = _z_slab(self.Zc, min(anat.dome_r, anat.dome_l) - 110, anat.apex_z + 1)
    Zt, Yt, Xt = self.Z[ts], self.Y[ts], self.X[ts]
    self.lung = np.zeros(self.grid.shape, bool)
    self.lung[ts] = (self.thorax[ts] & (Zt < anat.apex(Yt, Xt)) & ~anat.band(Zt, Yt, Xt)
                     & (self.tube_packed[ts] < _pack(-3, 0)))
    lo, hi = anat.heart_box(6.0)
    b = self.box(lo - np.array([80.0, 0, 0]), hi)
    self.lung[b] &= ~anat.heart_shadow(*self.coords(b), 6.0)
    self.heart_box = self.box(lo, hi)
    self.lung_idx = np.flatnonzero(self.lung)
    right = self.X.reshape(-1)[self.lung_idx] < anat.mid_x
    self.side = np.where(right, _LUNG_R, _LUNG_L).astype(np.uint8)
    self.flat_labels[self.lung_idx] = self.side

  def abdominal_organs(self):
    """Liver, stomach (with gas), kidneys in perirenal fat, spleen, psoas; later win."""
    anat, labels, abdomen = self.anat, self.labels, self.abdomen
    b = self.box([anat.dome_r - anat.liver_drop - 10, -150, -175], [self.top, 150, 120])
    Zb, Yb, Xb = self.coords(b)
    labels[b][abdomen[b] & (Zb > _F32(anat.dome_r - anat.liver_drop) + 0.7 * (Xb + 100)
                            + 0.35 * Yb)
              & (Xb < 55 - 0.45 * Yb) & ~((np.abs(Xb - 6) < 30) & (Yb > -2))] = _LIVER
    c, a, r = anat.stomach
    b, m = self.ellipsoid(c, a, r)
    m &= abdomen[b]
    labels[b][m] = _STOMACH
    gas_y = c[1] + _ellipsoid_extent(a, r)[1] * (2 * anat.gas - 1)
    self.specials.append((b, m & (self.Y[b] < gas_y), _STOMACH, -960.0, 20.0))  # supine
    for (c, a, r), lab, medial in zip(anat.kidneys, (_KIDNEY_R, _KIDNEY_L), (1, -1)):
      b, m = self.ellipsoid(c, a, r, grow=8.0)
      labels[b][m & abdomen[b]] = _FAT                     # perirenal fat
      b, m = self.ellipsoid(c, a, r)
      labels[b][m & abdomen[b]] = lab
      b, m = self.ellipsoid(c + np.array([0, -4, 14 * medial]), [24, 10, 10], r)
      labels[b][m & abdomen[b]] = _FAT                     # renal sinus
    b, m = self.ellipsoid(*anat.spleen)
    labels[b][m & abdomen[b]] = _SPLEEN
    b = self.box([-400, -20, -80], [-190, 90, 80])
    Zb, Yb, Xb = self.coords(b)
    below = -190 - Zb
    ys = np.interp(Zb, _SPINE_Z, _SPINE_Y).astype(_F32)
    labels[b][((np.abs(Xb) - (26 + 0.12 * below)) ** 2 + (Yb - ys - 2) ** 2
               < np.minimum(4 + 0.2 * below, 22) ** 2) & abdomen[b]] = _BODY     # psoas

  def mediastinum(self):
    """The heart, then the tubes over everything but the lungs."""
    hb = self.heart_box
    self.labels[hb][self.anat.heart_q(*self.coords(hb)) < 1] = _HEART
    self.tube_idx = np.flatnonzero((self.tube_packed >= 0) & self.body)
    self.tube_sd, self.tube_lab = _unpack(self.tube_packed.reshape(-1)[self.tube_idx])
    self.flat_labels[self.tube_idx] = self.tube_lab

  def spine(self):
    """Level by level: bodies with cortical shells, discs, the canal, neural arches,
    spinous and transverse processes, within paraspinal soft tissue."""
    anat, labels = self.anat, self.labels
    b = self.box([-400, _SPINE_Y.min() - 30, -55], [250, _SPINE_Y.max() + 80, 55])
    Zb, Yb, Xb = self.coords(b)
    frac = anat.spine_fraction(Zb[:, 0, 0]).astype(_F32)[:, None, None]
    ys = np.interp(Zb, _SPINE_Z, _SPINE_Y).astype(_F32) + _F32(anat.spine_dy)
    ax = np.interp(Zb, _SPINE_Z, _SPINE_AX).astype(_F32)
    ay = np.interp(Zb, _SPINE_Z, _SPINE_AY).astype(_F32)
    q = (Xb / ax) ** 2 + ((Yb - ys) / ay) ** 2
    disc = (q < 1) & (frac < 0.18)
    vbody = (q < 1) & ~disc
    rc = np.where(Zb < -200, _F32(9), _F32(7.5))
    cy = ys + ay + rc + 1
    dc = np.sqrt(Xb * Xb + (Yb - cy) ** 2)
    canal = dc < rc
    arch = (frac > 0.25) & (frac < 0.92)
    posterior = (((dc < rc + 5.5) & ~canal & (Yb > ys + 0.5 * ay) & arch)
                 | ((np.abs(Xb) < 4) & (Yb > cy + rc) & (Yb < cy + rc + 26) & arch)
                 | ((np.abs(Xb) > 6) & (np.abs(Xb) < 30) & (frac > 0.35) & (frac < 0.8)
                    & (np.abs(Yb - cy - 0.2 * np.abs(Xb)) < 4.5)))
    free = ~self.lung[b] & self.body[b]
    labels[b][(labels[b] == _FAT) & (np.abs(Xb) < 26) & (Yb > ys) & free] = _BODY
    labels[b][(vbody | posterior) & free] = _SPINE
    labels[b][(disc | canal) & free] = _BODY
    self.specials += [(b, vbody & (q > (1 - 2.2 / ay) ** 2), _SPINE, _CORTEX_HU, 40.0),
                      (b, posterior, _SPINE, 520.0, 40.0), (b, disc, _BODY, 85.0, 5.0),
                      (b, canal, _BODY, 22.0, 4.0)]

  def chest_wall_bones(self):
    """Ribs (tag 1) and costal cartilages (tag 2) in one raster; the sternum."""
    pose, h = self.anat.pose, self.h
    rib_lines, cart_lines = self.anat.ribs
    segs = [_segments(rib_lines, pose, 8.0), _segments(cart_lines, pose, 8.0)]
    packed = _rasterise(self.grid, tuple(np.concatenate(x) for x in zip(*segs)), reach=h,
                        tags=np.repeat([1, 2], [len(segs[0][0]), len(segs[1][0])]))
    idx = np.flatnonzero(packed > _pack(-h, 0))
    self.rib_idx = idx[~self.lung.reshape(-1)[idx]]
    self.rib_sd, self.rib_tag = _unpack(packed.reshape(-1)[self.rib_idx])
    inside = self.rib_sd > 0
    self.flat_labels[self.rib_idx[inside & (self.rib_tag == 1)]] = _RIBS
    self.flat_labels[self.rib_idx[inside & (self.rib_tag == 2)]] = _BODY
    b = self.box([-140, -160, -40], [65, -30, 40])
    Zb, Yb, Xb = self.coords(b)
    sternum = ((np.abs(Xb) < np.where(Zb > 40, _F32(24), _F32(14)))
               & (Yb < -0.85 * np.sqrt(Xb * Xb + Yb * Yb)) & (self.inner[b] > -11)
               & (self.inner[b] < -1) & (Zb > -135) & (Zb < 62))
    self.labels[b][sternum & ~self.lung[b]] = _STERNUM

  def lobes(self) -> np.ndarray:
    regions = np.zeros(self.grid.shape, np.uint8)
    idx = self.lung_idx
    _, H, W = self.grid.shape
    regions.reshape(-1)[idx] = self.anat.lobes(self.Zc[idx // (H * W)], self.Y.reshape(-1)[idx],
                                               self.X.reshape(-1)[idx], self.side)
    return regions

  def intensities(self, rng: np.random.Generator) -> np.ndarray:
    """HU: each label's value with texture, the lung parenchyma, special tissues, airway
    lumens and the ribs' partial volumes."""
    anat, h, labels = self.anat, self.h, self.labels
    self.tex = np.zeros(self.grid.shape, _F32)
    self.tex[self.body_box] = _value_noise(rng, self.grid, 5.0, self.body_box)
    hu = _BASE_HU[labels]
    hu += self.tex * _TEXTURE_HU[labels]
    flat = hu.reshape(-1)
    idx = self.lung_idx
    flat[idx] = (_F32(anat.lung_hu) + _F32(anat.gravity / 100) * self.Y.reshape(-1)[idx]
                 + 14 * self.tex.reshape(-1)[idx])
    for b, m, lab, value, amp in self.specials:
      m &= labels[b] == lab
      hu[b][m] = value + amp * self.tex[b][m]
    airway = self.tube_lab == _AIRWAY
    lumen = np.clip((self.tube_sd[airway] - self.wall_mm) / h + 0.5, 0, 1)
    idx = self.tube_idx[airway]
    flat[idx] += (_AIR_HU - flat[idx]) * lumen
    outer = np.clip(self.rib_sd / h + 0.5, 0, 1)
    inner = np.clip((self.rib_sd - 1.4) / h + 0.5, 0, 1)
    v = flat[self.rib_idx]
    flat[self.rib_idx] = np.where(
        self.rib_tag == 1, v * (1 - outer) + _CORTEX_HU * (outer - inner) + _MARROW_HU * inner,
        v + (130 - v) * outer)
    return hu

  def trees(self, hu: np.ndarray, vessel_occ: np.ndarray, air_sd: np.ndarray):
    """Vessels and airways into `hu` in the lungs and on through the mediastinal fat to the
    hila (labelled great vessels and airway there)."""
    flat, h = hu.reshape(-1), self.h
    hilar = (self.labels == _FAT) & self.thorax
    lung_or_hilar = self.lung | hilar
    idx = np.flatnonzero(vessel_occ > 0)
    idx = idx[lung_or_hilar.reshape(-1)[idx]]
    occ = vessel_occ.reshape(-1)[idx]
    flat[idx] += (_BLOOD_HU - flat[idx]) * occ
    outside = idx[(occ > 0.5) & hilar.reshape(-1)[idx]]
    idx = np.flatnonzero(air_sd > -_REACH_MM)
    idx = idx[lung_or_hilar.reshape(-1)[idx]]
    sd = air_sd.reshape(-1)[idx]
    wall = np.clip((sd + 1.2) / h + 0.5, 0, 1)
    lumen = np.clip(sd / h + 0.5, 0, 1)
    flat[idx] = flat[idx] * (1 - wall) + _BLOOD_HU * (wall - lumen) + _AIR_HU * lumen
    self.flat_labels[outside] = _VESSELS
    self.flat_labels[idx[(sd > -1.2) & hilar.reshape(-1)[idx]]] = _AIRWAY

  def nodules(self, hu: np.ndarray, nodules) -> np.ndarray:
    """Paint lobulated solid nodules (35 HU, partial volume) into `hu` within the lungs;
    returns their occupancy."""
    grid, h = self.grid, self.h
    occupancy = np.zeros(grid.shape, _F32)
    for centre, radius, bumps, amps in nodules:
      b = grid.box(centre[None], pad=radius * 1.5 + 2 * h)
      d = [grid.axis(k, b[k]).astype(_F32) - _F32(centre[k]) for k in range(3)]
      dz, dy, dx = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
      dist = np.sqrt(dz * dz + dy * dy + dx * dx) + _F32(1e-3)
      r_eff = _F32(radius)
      for e, amp in zip(bumps, amps):
        cosine = (e[0] * dz + e[1] * dy + e[2] * dx) / dist
        r_eff = r_eff + _F32(radius * amp) * (cosine * cosine - _F32(1 / 3))
      occ = np.clip((r_eff - dist) / h + 0.5, 0, 1) * self.lung[b]
      np.maximum(occupancy[b], occ, out=occupancy[b])
      hu[b] += (35 - hu[b]) * occ
    return occupancy


def _render(seed: int, index: int, grid: _Grid, disease: bool) -> CTSubject:
  anat = _Anatomy(np.random.default_rng([seed, index, 0]))
  tex_rng = np.random.default_rng([seed, index, 1])
  dis_rng = np.random.default_rng([seed, index, 2])
  paint = _Painter(anat, grid)
  paint.tubes()
  paint.body_wall(tex_rng)
  paint.lungs()
  paint.abdominal_organs()
  paint.mediastinum()
  paint.spine()
  paint.chest_wall_bones()
  regions = paint.lobes()
  airways, vessels = _trees(anat, paint.tube_segs, np.random.default_rng([seed, index, 3]))
  vessel_occ = _rasterise(grid, vessels, occupancy=True)
  air_sd = _rasterise(grid, airways)
  hu = paint.intensities(tex_rng)

  lung_idx = paint.lung_idx
  lung_regions = regions.reshape(-1)[lung_idx]
  touched = np.zeros(0, np.int64)
  nodules = []
  if disease:
    parenchyma = ((vessel_occ.reshape(-1)[lung_idx] < 0.2)
                  & (air_sd.reshape(-1)[lung_idx] < -1.5))
    touched = _emphysema(anat, grid, dis_rng, lung_idx, lung_regions * parenchyma,
                         hu.reshape(-1))
    nodules = _nodules(anat, paint.tube_segs, np.random.default_rng([seed, index, 5]))
  paint.trees(hu, vessel_occ, air_sd)
  nodule_occ = paint.nodules(hu, nodules)

  # Scanner: correlated noise (white noise through the point-spread function).
  noise_rng = np.random.default_rng([seed, index, 4])
  noise = np.roll(_noise_texture(grid.shape), noise_rng.integers(0, grid.shape), (0, 1, 2))
  flip = tuple(slice(None, None, -1 if f else 1) for f in noise_rng.random(3) < 0.5)
  hu += noise[flip] * _F32(anat.noise_hu / math.sqrt(_blur_gain(0.6)))
  _blur(hu, 0.6)
  image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

  touched = touched[image.reshape(-1)[touched] < LAA_THRESHOLD_HU]
  emphysema = np.zeros(grid.shape, bool)
  emphysema.reshape(-1)[touched] = True
  n = len(REGION_NAMES)
  lung_count = np.bincount(lung_regions, minlength=n)[1:]
  emph_count = np.bincount(regions.reshape(-1)[touched], minlength=n)[1:]
  geom = dict(spacing=tuple(grid.spacing), origin=tuple(grid.origin))
  return CTSubject(
      image=Volume(image, **geom), labels=Volume(paint.labels, **geom),
      regions=Volume(regions, **geom), emphysema=emphysema,
      region_severity=(emph_count / np.maximum(lung_count, 1)).astype(_F32),
      severity=float(emph_count.sum() / max(lung_count.sum(), 1)),
      nodule_mask=nodule_occ >= 0.5,
      nodules=np.array([[*c, r] for c, r, _, _ in nodules], np.float64).reshape(-1, 4),
      index=index)


@functools.lru_cache(maxsize=4)
def _noise_texture(shape: tuple[int, int, int]) -> np.ndarray:
  """White Gaussian noise for one grid shape, from a fixed seed (the same in every
  process); each subject takes it at a random cyclic shift and flip, which is much cheaper
  than drawing fresh normals."""
  noise = np.random.default_rng(0x5C7C7).standard_normal(shape, dtype=_F32)
  noise.flags.writeable = False
  return noise


def _blur_gain(sigma: float) -> float:
  """Variance gain of white noise through _blur."""
  k = math.exp(-0.5 / sigma ** 2)
  return ((1 + 2 * k * k) / (1 + 2 * k) ** 2) ** 3


def _emphysema(anat, grid, rng, lung_idx, region, flat_hu):
  """Paint clustered low-attenuation holes into the lung voxels `lung_idx` of `flat_hu` (in
  place); `region` is their lobe, 0 where they are not parenchyma. Returns the flat indices
  of the voxels it touched.

  A lobular-scale field plus a coarser cluster field and a height trend score every
  parenchymal voxel; in each lobe, the voxels scoring above the quantile that leaves the
  lobe's target fraction become holes, with a soft rim."""
  if rng.random() < 0.4 or not len(lung_idx):
    return np.zeros(0, np.int64)
  severity = math.exp(rng.uniform(math.log(0.015), math.log(0.5)))
  if rng.random() < 0.75:        # centrilobular, upper-lobe predominant
    weights, height, cluster = np.array([1.0, 0.55, 0.3, 0.9, 0.3]), 0.8, 1.2
  else:                          # panlobular, lower-lobe predominant
    weights, height, cluster = np.array([0.35, 0.6, 1.0, 0.4, 1.0]), -0.8, 0.6
  weights = weights * rng.lognormal(0, 0.25, 5)
  _, H, W = grid.shape
  zyx = np.stack([lung_idx // (H * W), lung_idx // W % H, lung_idx % W])
  lo = zyx.min(1)
  box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, zyx.max(1)))
  local = tuple(zyx - lo[:, None])
  fine = _value_noise(rng, grid, 6.0, box)[local]
  coarse = _value_noise(rng, grid, 20.0, box)[local]
  z = grid.axis(0)[zyx[0]] - anat.pose.centre[0]
  score = fine + _F32(cluster) * coarse + _F32(height / 200) * z.astype(_F32)
  n = len(REGION_NAMES)
  count = np.bincount(region, minlength=n)[1:]
  k = severity * count.sum() / max(float((weights * count).sum()), 1.0)
  target = np.minimum(k * weights, 0.85)
  threshold = np.full(n, np.inf, _F32)
  for r in range(1, n):
    if count[r - 1]:
      threshold[r] = np.quantile(score[region == r], 1 - target[r - 1])
  strength = np.clip((score - threshold[region]) * _F32(1 / 0.25) + 1, 0, 1)
  hit = np.flatnonzero(strength > 0)
  v = flat_hu[lung_idx[hit]]
  flat_hu[lung_idx[hit]] = v + (_HOLE_HU - v) * strength[hit]
  return lung_idx[hit]


def _shape3(shape) -> tuple[int, int, int]:
  shape = (shape,) * 3 if isinstance(shape, (int, np.integer)) else tuple(shape)
  if len(shape) != 3 or any(isinstance(s, bool) or int(s) != s or s < 16 for s in shape):
    raise ValueError(f"shape must be an int or three ints >= 16, got {shape!r}")
  return tuple(int(s) for s in shape)


def subject(seed: int, index: int, shape: int | Sequence[int] = DEFAULT_SHAPE,
            fov_mm: Sequence[float] = DEFAULT_FOV_MM, disease: bool = True) -> CTSubject:
  """Render subject `index` of the population `seed` on a `shape` grid over `fov_mm`.

  Args:
   seed, index: non-negative ints; the subject is a pure function of (seed, index, shape,
    fov_mm, disease).
   shape: voxels (z, y, x), or one int for a cube; spacing is fov_mm / shape.
   fov_mm: field of view (z, y, x), centred on the physical origin.
   disease: False renders the same subject without emphysema or nodules.
  """
  for name, v in (("seed", seed), ("index", index)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name} must be a non-negative int, got {v!r}")
  fov = np.asarray(fov_mm, np.float64)
  if fov.shape != (3,) or (fov <= 0).any():
    raise ValueError(f"fov_mm must be three positive mm values (z, y, x), got {fov_mm!r}")
  return _render(int(seed), int(index), _Grid(_shape3(shape), fov), bool(disease))


class SyntheticCT:
  """Random-access source of synthetic CT subjects (``__len__`` + ``__getitem__``, a plain
  picklable object): item i is ``subject(seed, i, shape, fov_mm, disease)``."""

  def __init__(self, num_subjects: int = 1000, seed: int = 0,
               shape: int | Sequence[int] = DEFAULT_SHAPE,
               fov_mm: Sequence[float] = DEFAULT_FOV_MM, disease: bool = True):
    if (isinstance(num_subjects, bool) or not isinstance(num_subjects, (int, np.integer))
        or num_subjects < 1):
      raise ValueError(f"num_subjects must be a positive int, got {num_subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    self.num_subjects = int(num_subjects)
    self.seed = int(seed)
    self.shape = _shape3(shape)
    self.fov_mm = tuple(float(f) for f in fov_mm)
    self.disease = bool(disease)

  def __repr__(self) -> str:
    return (f"SyntheticCT(num_subjects={self.num_subjects}, seed={self.seed}, "
            f"shape={self.shape}, fov_mm={self.fov_mm}, disease={self.disease})")

  def __len__(self) -> int:
    return self.num_subjects

  def __getitem__(self, index) -> CTSubject:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"index must be an integer, got {type(index).__name__}")
    idx = int(index) + (self.num_subjects if index < 0 else 0)
    if not 0 <= idx < self.num_subjects:
      raise IndexError(f"index {int(index)} out of range for SyntheticCT of length "
                       f"{self.num_subjects}")
    return subject(self.seed, idx, self.shape, self.fov_mm, self.disease)


# ------------------------------------------------------------------- preview
# BGR label colours for the overlay (background uncoloured).
_LABEL_BGR = np.array([
  (0, 0, 0), (120, 120, 120), (80, 200, 240), (220, 140, 60), (240, 190, 110),
  (250, 250, 250), (60, 60, 230), (40, 40, 160), (200, 60, 200), (40, 110, 170),
  (150, 40, 120), (90, 200, 90), (60, 150, 60), (110, 230, 110), (230, 230, 60),
  (200, 255, 255), (160, 240, 255)], np.uint8)
_EMPHYSEMA_BGR = (0, 230, 255)
_NODULE_BGR = (40, 40, 255)
_WINDOWS = (("lung W1500 L-600", -600.0, 1500.0), ("soft tissue W400 L40", 40.0, 400.0))


def _panels(centre) -> list[tuple[str, tuple, bool]]:
  """Axial, coronal and sagittal cuts through voxel `centre`, displayed radiologically:
  patient right on the left of axial and coronal views, anterior up (axial) or left
  (sagittal), superior up."""
  z, y, x = (int(round(c)) for c in centre)
  return [("axial", (z, slice(None), slice(None)), False),
          ("coronal", (slice(None), y, slice(None)), True),
          ("sagittal", (slice(None), slice(None), x), True)]


def preview(ct: CTSubject, mm_per_px: float = 1.0) -> np.ndarray:
  """A BGR uint8 montage of `ct`: rows lung window, soft-tissue window, label overlay
  (emphysema yellow, nodules red); columns axial, coronal, sagittal through the largest
  nodule, or through the lungs' centre when there is none."""
  img, lab = ct.image.array.astype(_F32), ct.labels.array
  if len(ct.nodules):
    centre = ct.image.point_to_index(ct.nodules[np.argmax(ct.nodules[:, 3]), :3])
  elif ct.regions.array.any():
    centre = np.mean(np.nonzero(ct.regions.array), axis=1)
  else:
    centre = (np.asarray(img.shape) - 1) / 2
  spacing = np.asarray(ct.image.spacing)
  fov = spacing * np.asarray(img.shape)
  side = [int(round(f / mm_per_px)) for f in fov]
  height = max(side[0], side[1])
  rows = []
  for row in range(3):
    tiles = []
    for name, cut, vertical in _panels(centre):
      a, m = img[cut], lab[cut]
      extra = [ct.emphysema[cut], ct.nodule_mask[cut]]
      if vertical:                        # z up
        a, m, extra = a[::-1], m[::-1], [e[::-1] for e in extra]
      size = (side[2] if name != "sagittal" else side[1],
              side[0] if vertical else side[1])
      title, c, w = _WINDOWS[min(row, 1)]
      grey = np.clip((a - (c - w / 2)) * (255 / w), 0, 255).astype(np.uint8)
      tile = cv2.cvtColor(cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR),
                          cv2.COLOR_GRAY2BGR)
      if row == 2:
        title = "labels"
        colour = _LABEL_BGR[m]
        colour[extra[0]] = _EMPHYSEMA_BGR
        colour[extra[1]] = _NODULE_BGR
        colour = cv2.resize(colour, size, interpolation=cv2.INTER_NEAREST)
        alpha = cv2.resize((m > 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        blend = cv2.addWeighted(tile, 0.45, colour, 0.55, 0)
        tile = np.where(alpha[..., None] > 0, blend, tile)
      tile = np.pad(tile, ((0, height - tile.shape[0]), (0, 4), (0, 0)))
      cv2.putText(tile, f"{name}, {title}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                  (255, 255, 255), 1, cv2.LINE_AA)
      tiles.append(tile)
    rows.append(np.pad(np.concatenate(tiles, 1), ((0, 4), (0, 0), (0, 0))))
  out = np.concatenate(rows, 0)
  litres = np.count_nonzero(ct.regions.array) * float(np.prod(spacing)) / 1e6
  info = (f"subject {ct.index}  lungs {litres:.1f} L  emphysema {100 * ct.severity:.1f}%  "
          f"nodules {len(ct.nodules)}")
  bar = np.zeros((26, out.shape[1], 3), np.uint8)
  cv2.putText(bar, info, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
              cv2.LINE_AA)
  return np.concatenate([bar, out], 0)


def main(argv: Sequence[str] | None = None) -> None:
  """Render one subject's preview montage to a PNG."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", default="docs/synthetic_ct.png", help="PNG path to write")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--index", type=int, default=0)
  parser.add_argument("--shape", type=int, default=DEFAULT_SHAPE[0],
                      help="voxels along each axis")
  args = parser.parse_args(argv)
  ct = subject(args.seed, args.index, args.shape)
  if not cv2.imwrite(args.out, preview(ct), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
    raise OSError(f"could not write {args.out}")
  print(f"wrote {args.out}: subject {args.index}, severity {ct.severity:.3f}, "
        f"{len(ct.nodules)} nodule(s)")


if __name__ == "__main__":
  main()
