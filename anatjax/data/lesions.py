"""Synthetic Lesion Mask (SLM) generation for AFiRe, on the host (numpy + OpenCV).

Specification: ``methods/afire.md`` sections 2.3 and 8. This module turns one clean
greyscale radiograph (uint8, ``[H, W]``) into the student's input ``slm`` (uint8,
``[H, W]``), the integer lesion map ``noise`` (int32, ``[H, W]``) and the token labels
``abn`` (bool, ``[L]``, ``L = (H / patch_size) * (W / patch_size)``, row-major).

Algorithm
---------
1. Texture source (:func:`lesion_texture`). Threshold the clean image with Otsu
   (``cv2.threshold`` + ``THRESH_OTSU``; foreground = pixels above the threshold), keep the
   largest external contour of the foreground by ``cv2.contourArea`` and take the centre of
   its minimum enclosing circle, truncated to integers: ``cx`` is the column, ``cy`` the row.
   Crop ``src = clean[max(cy-r, 0):min(cy+r, H), max(cx-r, 0):min(cx+r, W)]`` with ``r`` the
   crop radius (30 on the 224 grid). Rows are indexed with ``cy`` and columns with ``cx``;
   the reference swaps the two (defect D2), we do not. Near a border the crop is legitimately
   smaller than ``2r x 2r``; that is not an error.
2. Soft elliptical falloff on the ``h x w`` crop: ``a = w/2``, ``b = h/2``, centre
   ``(w//2, h//2)``, ``e = exp(-(((x - w//2)/a)^2 + ((y - h//2)/b)^2) / 0.5)``, min-max
   normalised to ``[0, 0.5]``; the texture is ``floor(clip(src * e, 0, 255))`` as uint8.
   All of this is float32. ``e`` depends only on ``(h, w)`` and is cached. The texture depends
   only on the image, so the pipeline may compute it once per image and reuse it for every
   variant.
3. Lesions (:func:`draw_boxes`, :func:`synthesize`). ``n ~ UniformInt{1..max_lesions}``;
   per lesion ``h_l, w_l ~ UniformInt{min_size..max_size}`` (both ends inclusive) and a
   top-left corner drawn uniformly among the positions that keep the box fully inside the
   image (so the box is not restricted to the lungs). The texture is resized to
   ``(h_l, w_l)`` with ``cv2.resize(..., (w_l, h_l), INTER_LINEAR)`` (OpenCV takes
   ``(width, height)``) and added into an int32 accumulator. Overlapping lesions therefore
   sum without wrapping modulo 256; the reference accumulated in uint8 and produced dark
   holes (defect D1).
4. Blend. Where ``noise == 0`` the output is the clean pixel, byte for byte. Where
   ``noise > 0`` it is ``max(clean, min(clean + noise, ceiling))`` (ceiling 235). Lesions
   brighten up to the ceiling and never darken a pixel; a clean pixel already above the
   ceiling is kept as is. The reference clipped every pixel of the image to ``[0, 235]``, so
   "normal" tokens differed between student and teacher inputs (defect D3); here they do not.
5. Token labels (:func:`token_flags`): ``abn[j]`` is True iff some pixel of ``noise`` inside
   the ``patch_size x patch_size`` patch ``j = row * grid_w + col`` is ``> 0``. A lesion box
   whose resized texture is zero at its rim (the falloff reaches 0 at the crop corners) marks
   only the tokens where it actually adds intensity; this is the spec's definition and is kept.
6. ``p_no_lesion``: with this probability the sample is left clean (``slm = clean``,
   ``noise = 0``, ``abn`` all False).

Random draws use only the ``np.random.Generator`` handed in, so a per-example seed gives a
deterministic sample. :func:`synthesize` first draws the boxes (exactly :func:`draw_boxes`
on the same generator) and then one uniform number for the ``p_no_lesion`` coin, which is
drawn even when ``p_no_lesion`` is 0. Consequently the boxes produced for a given generator
state do not depend on ``p_no_lesion``: raising it only blanks some samples.

Fallback texture (our decision; the spec only requires "a defined texture, counted, never
crash"). The bright-region search *fails*, and :func:`lesion_texture` returns
``(fallback_texture(crop_radius), True)``, when any of these holds:

* the image has no contrast (``min == max``: blank, constant), so Otsu cannot split it;
* the Otsu foreground is empty or covers the whole image, or has no external contour;
* the largest contour is tiny: its ``cv2.contourArea`` is below
  ``MIN_REGION_FRACTION`` (1%) of the image area (a bright speck, a line, a single pixel)
  - a radiograph's body region is far larger than that;
* the crop is smaller than ``MIN_CROP_SIDE`` (2) pixels along either axis (the falloff is
  undefined on a single row/column);
* the resulting texture is all zeros (e.g. a crop whose pixels are all 0 or 1). Such a
  texture would paint invisible lesions, and since ``abn`` is defined by ``noise > 0`` no
  token would be marked either; the augmentation would silently vanish, so it counts as a
  failure.

The fallback texture is the same falloff applied to a constant mid-grey source
(``FALLBACK_GREY`` = 128) of size ``2r x 2r``: a smooth blob peaking at 64, independent of
the image, so fallback samples still receive visible, correctly labelled lesions. The
boolean lets the pipeline count fallbacks.

Sizes are in pixels. :meth:`LesionConfig.for_image_size` rescales the 224-grid defaults
(``min_size`` 16, ``max_size`` 128, ``crop_radius`` 30) to another square image size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import cv2
import numpy as np

__all__ = [
        "FALLBACK_GREY",
        "MIN_CROP_SIDE",
        "MIN_REGION_FRACTION",
        "REFERENCE_IMAGE_SIZE",
        "LesionConfig",
        "draw_boxes",
        "fallback_texture",
        "falloff",
        "lesion_texture",
        "synthesize",
        "token_flags",
]

REFERENCE_IMAGE_SIZE = 224
"""Image size on which the pixel defaults of :class:`LesionConfig` are defined."""

MIN_REGION_FRACTION = 0.01
"""The largest Otsu contour must enclose at least this fraction of the image area."""

MIN_CROP_SIDE = 2
"""The texture crop must be at least this many pixels along each axis."""

FALLBACK_GREY = 128
"""Constant intensity of the source the fallback texture is made from."""

_FALLOFF_DIVISOR = 0.5  # e = exp(-d^2 / 0.5)
_FALLOFF_PEAK = 0.5  # e is min-max normalised to [0, 0.5]


# ----------------------------------------------------------------------------- validation


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
  if not _is_int(value):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {value}")
  return value


def _check_image(name: str, image) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
  if image.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [H, W] greyscale image, got shape {image.shape}")
  if image.dtype != np.uint8:
    raise TypeError(f"{name} must have dtype uint8, got {image.dtype}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{name} must be non-empty, got shape {image.shape}")
  return image


def _check_patch_grid(name: str, shape: tuple[int, int], patch_size) -> int:
  patch_size = _check_int("patch_size", patch_size, minimum=1)
  height, width = shape
  if height % patch_size or width % patch_size:
    raise ValueError(
        f"{name} shape {height}x{width} (HxW) is not divisible by patch_size={patch_size}")
  return patch_size


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LesionConfig:
  """Synthetic-lesion parameters; sizes in pixels of the image being augmented.

  Attributes:
    max_lesions: lesion count is drawn from UniformInt{1..max_lesions}.
    min_size: smallest lesion box side (inclusive).
    max_size: largest lesion box side (inclusive); must fit in the image.
    crop_radius: half-side of the texture crop around the bright-region centre.
    ceiling: lesion pixels are brightened up to this value (never darkened).
    p_no_lesion: probability of leaving a sample clean (no lesion, abn all False).
  """

  max_lesions: int = 4
  min_size: int = 16
  max_size: int = 128
  crop_radius: int = 30
  ceiling: int = 235
  p_no_lesion: float = 0.0

  def __post_init__(self):
    _check_int("LesionConfig.max_lesions", self.max_lesions, minimum=1)
    _check_int("LesionConfig.min_size", self.min_size, minimum=1)
    _check_int("LesionConfig.max_size", self.max_size, minimum=1)
    if self.min_size > self.max_size:
      raise ValueError(
          f"LesionConfig.min_size ({self.min_size}) must be <= LesionConfig.max_size "
          f"({self.max_size})")
    _check_int("LesionConfig.crop_radius", self.crop_radius, minimum=1)
    _check_int("LesionConfig.ceiling", self.ceiling, minimum=0, maximum=255)
    p = self.p_no_lesion
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
      raise TypeError(f"LesionConfig.p_no_lesion must be a float, got {p!r}")
    if not 0.0 <= float(p) <= 1.0:
      raise ValueError(f"LesionConfig.p_no_lesion must be in [0, 1], got {p}")

  @classmethod
  def for_image_size(cls, image_size: int, **fields) -> "LesionConfig":
    """A config given on the 224 grid, rescaled to a square ``image_size``.

    ``fields`` (default: the recipe's values) are in pixels of a 224 image, as the recipe
    states them. ``min_size``, ``max_size`` and ``crop_radius`` are multiplied by
    ``image_size / 224`` and rounded half up, then kept in range: ``min_size >= 1``,
    ``crop_radius >= 1``, ``min_size <= max_size <= image_size``. At 224 the recipe is
    (16, 128, 30); at 64 it is (5, 37, 9).
    """
    image_size = _check_int("image_size", image_size, minimum=1)
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise TypeError(f"LesionConfig.for_image_size: unknown field(s) {sorted(unknown)}")
    values = {f.name: fields.get(f.name, f.default) for f in dataclasses.fields(cls)}
    scale = image_size / REFERENCE_IMAGE_SIZE

    def scaled(value: int) -> int:
      return int(math.floor(value * scale + 0.5))

    values["min_size"] = min(max(1, scaled(values["min_size"])), image_size)
    values["max_size"] = min(max(values["min_size"], scaled(values["max_size"])), image_size)
    values["crop_radius"] = max(1, scaled(values["crop_radius"]))
    return cls(**values)


# ----------------------------------------------------------------------------- texture


@functools.lru_cache(maxsize=256)
def _falloff_cached(height: int, width: int) -> np.ndarray:
  y = np.arange(height, dtype=np.float32)[:, None]
  x = np.arange(width, dtype=np.float32)[None, :]
  a = np.float32(width / 2)
  b = np.float32(height / 2)
  d2 = ((x - np.float32(width // 2)) / a) ** 2 + ((y - np.float32(height // 2)) / b) ** 2
  e = np.exp(-d2 / np.float32(_FALLOFF_DIVISOR))
  lo, hi = e.min(), e.max()
  if hi > lo:
    e = (e - lo) / (hi - lo) * np.float32(_FALLOFF_PEAK)
  else:  # 1x1 only; unreachable through lesion_texture (crops are >= 2x2)
    e = np.full_like(e, _FALLOFF_PEAK)
  e = e.astype(np.float32)
  e.setflags(write=False)
  return e


def falloff(height: int, width: int) -> np.ndarray:
  """The min-max normalised soft elliptical falloff ``e`` in ``[0, 0.5]``, float32 [h, w].

  Read-only (cached per shape).
  """
  height = _check_int("height", height, minimum=1)
  width = _check_int("width", width, minimum=1)
  return _falloff_cached(height, width)


def _apply_falloff(src: np.ndarray) -> np.ndarray:
  product = src.astype(np.float32) * _falloff_cached(*src.shape)
  # src <= 255 and e <= 0.5, so the clip never binds; it is kept to mirror the spec.
  return np.floor(np.clip(product, 0, 255)).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _fallback_cached(crop_radius: int) -> np.ndarray:
  side = 2 * crop_radius
  texture = _apply_falloff(np.full((side, side), FALLBACK_GREY, dtype=np.uint8))
  texture.setflags(write=False)
  return texture


def fallback_texture(crop_radius: int) -> np.ndarray:
  """The defined texture used when the bright-region search fails (uint8 [2r, 2r]).

  It is the falloff applied to a constant ``FALLBACK_GREY`` source; its peak is 64.
  Returns a fresh, writable array.
  """
  crop_radius = _check_int("crop_radius", crop_radius, minimum=1)
  return _fallback_cached(crop_radius).copy()


def _texture_source(clean: np.ndarray, crop_radius: int) -> tuple[np.ndarray | None, str]:
  """Finds the texture crop. Returns ``(src, "ok")`` or ``(None, reason)`` on failure."""
  height, width = clean.shape
  lo, hi = cv2.minMaxLoc(clean)[:2]
  if lo == hi:
    return None, "no contrast (constant image)"
  _, mask = cv2.threshold(clean, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
  nonzero = cv2.countNonZero(mask)
  if nonzero == 0 or nonzero == mask.size:
    return None, "Otsu foreground empty or everything"
  contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  if not contours:
    return None, "no foreground contour"
  areas = [cv2.contourArea(c) for c in contours]
  best = int(np.argmax(areas))
  if areas[best] < MIN_REGION_FRACTION * height * width:
    return None, f"largest bright region too small (area {areas[best]:g})"
  (cx_f, cy_f), _ = cv2.minEnclosingCircle(contours[best])
  # The centre lies inside the convex hull of the contour, hence inside the image; the
  # clamp only guards against float round-off.
  cx = min(max(int(cx_f), 0), width - 1)
  cy = min(max(int(cy_f), 0), height - 1)
  src = clean[max(cy - crop_radius, 0):min(cy + crop_radius, height),
              max(cx - crop_radius, 0):min(cx + crop_radius, width)]
  if src.shape[0] < MIN_CROP_SIDE or src.shape[1] < MIN_CROP_SIDE:
    return None, f"texture crop too small ({src.shape[0]}x{src.shape[1]})"
  return src, "ok"


def lesion_texture(clean: np.ndarray, crop_radius: int) -> tuple[np.ndarray, bool]:
  """Lesion texture of one clean image: ``(texture uint8 [h, w], used_fallback)``.

  ``h, w <= 2 * crop_radius`` (smaller when the bright-region centre is near a border).
  Never raises for a valid 2-D uint8 image; when the bright-region search fails (see the
  module docstring) it returns ``(fallback_texture(crop_radius), True)``.
  """
  clean = _check_image("clean", clean)
  crop_radius = _check_int("crop_radius", crop_radius, minimum=1)
  clean = np.ascontiguousarray(clean)  # OpenCV needs a contiguous buffer; no-op normally
  src, _ = _texture_source(clean, crop_radius)
  if src is not None:
    texture = _apply_falloff(src)
    if texture.any():
      return texture, False
  return fallback_texture(crop_radius), True


# ----------------------------------------------------------------------------- lesions


def draw_boxes(rng: np.random.Generator, config: LesionConfig, height: int,
               width: int) -> np.ndarray:
  """Draws the lesion boxes: int64 ``[n, 4]`` rows ``(top, left, box_height, box_width)``.

  ``n ~ UniformInt{1..max_lesions}``; sides ~ ``UniformInt{min_size..max_size}``; the
  top-left corner is uniform over positions keeping the box inside the ``height x width``
  image. :func:`synthesize` uses exactly these draws.
  """
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
  if not isinstance(config, LesionConfig):
    raise TypeError(f"config must be a LesionConfig, got {type(config).__name__}")
  height = _check_int("height", height, minimum=1)
  width = _check_int("width", width, minimum=1)
  for field in ("min_size", "max_size"):
    if getattr(config, field) > min(height, width):
      raise ValueError(
          f"config.{field}={getattr(config, field)} does not fit the {height}x{width} "
          "image (HxW); build the config with LesionConfig.for_image_size(image_size)")
  n = int(rng.integers(1, config.max_lesions, endpoint=True))
  sizes = rng.integers(config.min_size, config.max_size, size=(n, 2), endpoint=True)
  tops = rng.integers(0, height - sizes[:, 0], endpoint=True)
  lefts = rng.integers(0, width - sizes[:, 1], endpoint=True)
  return np.stack([tops, lefts, sizes[:, 0], sizes[:, 1]], axis=1).astype(np.int64)


def token_flags(noise: np.ndarray, patch_size: int) -> np.ndarray:
  """``abn[j] = any(noise[patch j] > 0)`` for row-major patches: bool ``[L]``."""
  if not isinstance(noise, np.ndarray) or noise.ndim != 2:
    got = getattr(noise, "shape", type(noise).__name__)
    raise ValueError(f"noise must be a 2-D numpy array, got {got}")
  patch_size = _check_patch_grid("noise", noise.shape, patch_size)
  height, width = noise.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  # "any pixel > 0" == "patch maximum > 0". Reducing the rows of each patch band first and
  # then the columns keeps both reductions on contiguous memory (~4x faster than one
  # reduction over axes (1, 3)).
  band_max = noise.reshape(grid_h, patch_size, width).max(axis=1)
  return band_max.reshape(grid_h * grid_w, patch_size).max(axis=1) > 0


def synthesize(clean: np.ndarray, texture: np.ndarray, rng: np.random.Generator,
               config: LesionConfig,
               patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Paints synthetic lesions: ``(slm uint8 [H, W], noise int32 [H, W], abn bool [L])``.

  Args:
    clean: the clean uint8 ``[H, W]`` image; H and W divisible by ``patch_size``.
    texture: uint8 ``[h, w]`` lesion texture, normally from :func:`lesion_texture`.
    rng: the only source of randomness (seed it per example for determinism).
    config: lesion parameters in pixels of this image.
    patch_size: token patch side; ``L = (H // patch_size) * (W // patch_size)``.
  """
  clean = _check_image("clean", clean)
  texture = _check_image("texture", texture)
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
  if not isinstance(config, LesionConfig):
    raise TypeError(f"config must be a LesionConfig, got {type(config).__name__}")
  height, width = clean.shape
  patch_size = _check_patch_grid("clean", clean.shape, patch_size)

  boxes = draw_boxes(rng, config, height, width)
  skip = rng.random() < config.p_no_lesion
  noise = np.zeros((height, width), dtype=np.int32)
  if skip:
    num_tokens = (height // patch_size) * (width // patch_size)
    return clean.copy(), noise, np.zeros((num_tokens,), dtype=bool)

  clean = np.ascontiguousarray(clean)  # OpenCV needs contiguous buffers; no-op normally
  texture = np.ascontiguousarray(texture)
  for top, left, box_h, box_w in boxes.tolist():
    patch = cv2.resize(texture, (box_w, box_h), interpolation=cv2.INTER_LINEAR)
    noise[top:top + box_h, left:left + box_w] += patch

  # slm = max(clean, min(clean + noise, ceiling)) evaluated on every pixel: where noise == 0
  # this is max(clean, min(clean, ceiling)) == clean, so non-lesion pixels are untouched
  # without a mask. Done in uint8 with OpenCV (about 3x faster than int32 numpy): noise >= 0
  # is saturated to 255 first, which cannot change the result because the ceiling is <= 255.
  lifted = cv2.add(clean, cv2.convertScaleAbs(noise))  # saturating uint8 add
  cv2.threshold(lifted, config.ceiling, config.ceiling, cv2.THRESH_TRUNC, dst=lifted)
  slm = cv2.max(lifted, clean)
  return slm, noise, token_flags(noise, patch_size)
