"""One image file -> a uint8 [size, size] greyscale image, the same way for every source.

Three steps, each configurable from the data config:

1. read: 8/16-bit PNG and JPEG through OpenCV (colour -> grey), DICOM through pydicom with
   the display pipeline of the standard: modality LUT (Rescale Slope/Intercept), VOI LUT or
   Window Center/Width, MONOCHROME1 inverted so that bright always means dense. Compressed
   DICOM (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) decodes through pydicom's
   pixel-data plugins (pylibjpeg and its libjpeg/openjpeg/rle back ends);
2. intensity (`data.intensity`): per-image `minmax`, or `percentile` between
   `data.percentiles` (clipping the tails, e.g. burnt-in labels and collimator edges);
3. geometry (`data.geometry`): `resize` the whole image to the square without keeping the
   aspect ratio (default; AFiRe: a grid position must keep meaning the same anatomy),
   `pad` (aspect-preserving resize, centred on black), or `crop` (centre square).

Every way a file can be unusable raises `BadImageError` naming the file and the reason,
so callers can skip and count bad files without catching anything else.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

INTENSITY_MODES = ("minmax", "percentile")
GEOMETRIES = ("resize", "pad", "crop")
_PNG_MAGIC, _JPEG_MAGIC, _DICOM_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"DICM"
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)


class BadImageError(ValueError):
  """A file that cannot be used as an image: missing, corrupt, not 2-D, constant, ..."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the geometry step put the original image: output = input * scale + offset
  (x and y separately, in pixel-corner coordinates). Moves boxes along with the image."""
  scale_x: float
  scale_y: float
  offset_x: float
  offset_y: float

  def boxes(self, boxes: np.ndarray, size: int) -> np.ndarray:
    """float [K, 4] (x, y, w, h) in original pixels -> output pixels, clipped to the image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x0 = boxes[:, 0] * self.scale_x + self.offset_x
    y0 = boxes[:, 1] * self.scale_y + self.offset_y
    x1 = x0 + boxes[:, 2] * self.scale_x
    y1 = y0 + boxes[:, 3] * self.scale_y
    x0, x1, y0, y1 = (np.clip(v, 0, size) for v in (x0, x1, y0, y1))
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How files become model-sized images (see the module docstring)."""
  size: int
  intensity: str = "minmax"
  percentiles: tuple[float, float] = (0.5, 99.5)
  geometry: str = "resize"

  def __post_init__(self):
    if self.intensity not in INTENSITY_MODES:
      raise ValueError(f"config data.intensity={self.intensity!r}: use one of "
                       f"{INTENSITY_MODES}")
    if self.geometry not in GEOMETRIES:
      raise ValueError(f"config data.geometry={self.geometry!r}: use one of {GEOMETRIES}")
    low, high = self.percentiles
    if not 0 <= low < high <= 100:
      raise ValueError(f"config data.percentiles={tuple(self.percentiles)!r}: expected "
                       "(low, high) with 0 <= low < high <= 100")

  @classmethod
  def from_config(cls, data_config) -> DecodeOptions:
    return cls(size=data_config.image_size, intensity=data_config.intensity,
               percentiles=tuple(float(p) for p in data_config.percentiles),
               geometry=data_config.geometry)

  def load(self, path: str) -> tuple[np.ndarray, Placement]:
    """(uint8 [size, size] image, where the original went). Raises BadImageError."""
    values = read_intensities(path)
    low, high = self.intensity_range(values)
    if not high > low:
      raise BadImageError(path, f"constant image (every {self.intensity} value is {low:g})")
    return fit(to_uint8(values, low, high), self.size, self.geometry)

  def intensity_range(self, values: np.ndarray) -> tuple[float, float]:
    """The values mapped to 0 and 255."""
    if self.intensity == "minmax":
      return float(values.min()), float(values.max())
    low, high = np.percentile(values, self.percentiles)
    return float(low), float(high)


def read_intensities(path: str) -> np.ndarray:
  """A 2-D array of display intensities (higher = brighter) of a PNG, JPEG or DICOM file.

  The format is recognised from the file's first bytes, so misnamed files still read;
  DICOM files written without the 128-byte preamble are recognised by their suffix.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise BadImageError(path, "missing") from None
  except OSError as e:
    raise BadImageError(path, f"unreadable file ({e.strerror})") from None
  if not data:
    raise BadImageError(path, "empty file")
  if data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
    values = _decode_png_or_jpeg(path, data)
  elif data[128:132] == _DICOM_MAGIC or path.lower().endswith(DICOM_SUFFIXES):
    values = _decode_dicom(path)
  else:
    raise BadImageError(path, "not a PNG, JPEG or DICOM file")
  if values.ndim != 2 or min(values.shape) < 2:
    raise BadImageError(path, f"expected a 2-D greyscale image, got shape {values.shape}")
  return values


def _decode_png_or_jpeg(path: str, data: bytes) -> np.ndarray:
  # IMREAD_UNCHANGED keeps 16-bit depth (and an alpha channel, dropped below). OpenCV 5
  # returns None for truncated PNG and JPEG data rather than a grey-filled image.
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise BadImageError(path, "corrupt or truncated image data")
  if image.ndim == 3:
    channels = image.shape[2]
    if channels not in (3, 4):
      raise BadImageError(path, f"{channels}-channel image")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY)
  return image


def _decode_dicom(path: str) -> np.ndarray:
  # Imported here: only DICOM sources pay pydicom's import time.
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom import pixels  # pylint: disable=g-import-not-at-top
  # pydicom and its decoder plugins raise many exception types for broken files (invalid
  # headers, short pixel data, codec errors, missing plugins): all mean "cannot use this".
  try:
    ds = pydicom.dcmread(path, force=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stored = ds.pixel_array if "PixelData" in ds and frames == 1 else None
  except Exception as e:  # pylint: disable=broad-except
    raise BadImageError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
  if stored is None:
    raise BadImageError(path, f"multi-frame DICOM ({frames} frames)" if frames > 1
                        else "DICOM without pixel data")
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
  if not photometric.startswith("MONOCHROME"):
    # Colour secondary captures: pydicom returns RGB; the LUT modules apply to grey only.
    if stored.ndim != 3 or stored.shape[-1] != 3:
      raise BadImageError(path, f"{photometric} pixel data of shape {stored.shape}")
    return cv2.cvtColor(np.ascontiguousarray(stored), cv2.COLOR_RGB2GRAY)
  try:
    values = pixels.apply_voi_lut(pixels.apply_modality_lut(stored, ds), ds)
  except Exception as e:  # pylint: disable=broad-except
    raise BadImageError(path, f"invalid DICOM LUT or window ({type(e).__name__}: "
                              f"{e})") from None
  values = values.astype(np.float32)
  if photometric == "MONOCHROME1":  # stored bright-is-low: invert (any affine inversion
    values = values.max() - values  # gives the same image after intensity normalisation)
  return values


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """`values` clipped to [low, high] and mapped linearly onto 0..255 (high > low)."""
  scaled = (np.clip(values.astype(np.float32), low, high) - low) * (255.0 / (high - low))
  return np.rint(scaled).astype(np.uint8)


def fit(image: np.ndarray, size: int, geometry: str) -> tuple[np.ndarray, Placement]:
  """A uint8 [H, W] image -> ([size, size], placement) by `geometry` (see GEOMETRIES)."""
  height, width = image.shape
  if geometry == "resize":
    placement = Placement(size / width, size / height, 0.0, 0.0)
    return _resize(image, size, size), placement
  if geometry == "pad":
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    out = np.zeros((size, size), np.uint8)
    out[top:top + new_h, left:left + new_w] = _resize(image, new_w, new_h)
    return out, Placement(new_w / width, new_h / height, float(left), float(top))
  if geometry == "crop":
    side = min(height, width)
    left, top = (width - side) // 2, (height - side) // 2
    scale = size / side
    placement = Placement(scale, scale, -left * scale, -top * scale)
    return _resize(image[top:top + side, left:left + side], size, size), placement
  raise ValueError(f"unknown geometry {geometry!r}; use one of {GEOMETRIES}")


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
  if image.shape == (height, width):
    return image
  # Area averaging when shrinking (radiographs are 2-4k pixels: no aliasing of fine
  # trabecular and line patterns), bilinear when enlarging.
  shrinking = width * height < image.shape[0] * image.shape[1]
  return cv2.resize(image, (width, height),
                    interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def is_image_file(path: str) -> bool:
  """Whether a file name looks like an image this module reads (for folder scans)."""
  return os.path.basename(path).lower().endswith(IMAGE_SUFFIXES)
