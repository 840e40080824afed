"""CT volumes from NIfTI files and DICOM series, in the canonical frame of `volume.Volume`.

`read_volume` picks the reader from the path: `.nii` / `.nii.gz` files go to `read_nifti`,
directories and lists of files to `read_dicom_series`. Both readers describe the stored
array the same way (a direction matrix whose columns are the LPS directions of the array
axes, a spacing per array axis, the LPS point of voxel 0) and hand it to
`canonical_volume`, the one place where images are reoriented, by axis permutations and
flips only: an oblique image would need resampling, which is left to the caller so that
interpolation never happens silently.

Intensities are the modality values (Hounsfield units for CT): NIfTI scl_slope/scl_inter
and DICOM Rescale Slope/Intercept (per slice) are applied. The result is int16 when every
value is an integer int16 holds (CT in HU: half the memory of float32), else float32.

A DICOM series must form a regular grid: one orientation, slice positions along the slice
normal (no gantry tilt), no duplicate positions, even spacing (no missing slice). A
single slice is accepted, its thickness taken from Spacing Between Slices or Slice
Thickness. Every unusable input raises `BadVolumeError` naming the file or directory, what
was found and, where there is one, what to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from anatjax.data.decode import DICOM_SUFFIXES
from anatjax.data.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Largest off-axis direction cosine (the sine of the angle to the nearest patient axis,
# 1e-3 ~ 0.06 deg) still treated as axis-aligned: at most 0.5 mm of drift across 500 mm.
AXIS_TOLERANCE = 1e-3
# Slice gaps may differ from the series' median gap by this fraction (scanners write
# positions rounded to a few decimals); more is a missing slice or uneven spacing.
SPACING_TOLERANCE = 0.01
# Slice positions closer than this (mm) along the normal are the same position.
DUPLICATE_MM = 1e-3
# Absolute slack (mm) for slice positions off the normal, on top of AXIS_TOLERANCE per mm
# along it: absorbs the rounding of positions to a few decimals.
POSITION_SLACK_MM = 0.01
_INT16 = np.iinfo(np.int16)
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


class BadVolumeError(ValueError):
  """A file, directory or file list that cannot be read as one CT volume."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path, self.reason = path, reason


def read_volume(path) -> Volume:
  """A NIfTI file (`.nii`, `.nii.gz`), or a DICOM series given as a directory or a list
  of files, as a canonical Volume. Raises BadVolumeError."""
  if isinstance(path, (list, tuple)):
    return read_dicom_series(path)
  path = os.fspath(path)
  if os.path.isdir(path):
    return read_dicom_series(path)
  lower = path.lower()
  if lower.endswith(NIFTI_SUFFIXES):
    return read_nifti(path)
  if lower.endswith(DICOM_SUFFIXES):
    raise BadVolumeError(path, "a single DICOM file holds one slice, not a volume: pass the "
                               "directory of its series or the list of its files")
  if not os.path.exists(path):
    raise BadVolumeError(path, "missing")
  raise BadVolumeError(path, "not a CT volume: expected a NIfTI file (.nii, .nii.gz), a "
                             "DICOM series directory or a list of DICOM files")


# ----------------------------------------------------------------------- reorientation

def canonical_volume(array: np.ndarray, direction, spacing, origin,
                     source: str = "<array>") -> Volume:
  """An image described in its own index order -> the canonical Volume (LPS, (z, y, x)).

  Args:
    array: [N0, N1, N2] values in the image's index order.
    direction: [3, 3]; column a is the LPS (x, y, z) direction in which index a grows.
    spacing: mm between voxel centres along each array axis.
    origin: LPS (x, y, z) mm of voxel [0, 0, 0].
    source: the file or directory the image came from, for error messages.

  Returns:
    The same voxels transposed and flipped so that index axes 0, 1, 2 grow towards the
    patient's superior, posterior and left; origin = the point of the new voxel [0, 0, 0].

  Raises:
    BadVolumeError: an array axis is more than AXIS_TOLERANCE off every patient axis
      (oblique), or two array axes run along the same patient axis.
  """
  direction = np.asarray(direction, np.float64)
  spacing = np.asarray(spacing, np.float64)
  direction = direction / np.linalg.norm(direction, axis=0)
  patient_axis = np.argmax(np.abs(direction), axis=0)  # LPS axis each array axis follows
  for a in range(3):
    off_axis = np.linalg.norm(np.delete(direction[:, a], patient_axis[a]))
    if off_axis > AXIS_TOLERANCE:
      angle = np.degrees(np.arcsin(min(off_axis, 1.0)))
      raise BadVolumeError(
          source, f"oblique image: array axis {a} is {angle:.2f} deg off the nearest "
                  f"patient axis (LPS direction {np.round(direction[:, a], 4).tolist()}, "
                  f"tolerance {np.degrees(np.arcsin(AXIS_TOLERANCE)):.2f} deg); only axis "
                  "permutations and flips are applied here, so resample the image onto an "
                  "axis-aligned grid first (e.g. SimpleITK.Resample to an identity direction)")
  if sorted(patient_axis) != [0, 1, 2]:
    raise BadVolumeError(source, "degenerate orientation: two array axes run along the same "
                                 f"patient axis (LPS direction matrix {direction.tolist()})")
  flipped = [a for a in range(3) if direction[patient_axis[a], a] < 0]
  # Canonical axis c (z, y, x) follows LPS axis 2 - c.
  order = [int(np.flatnonzero(patient_axis == 2 - c)[0]) for c in range(3)]
  # After the flips, voxel 0 is the old last voxel along every flipped axis; its position
  # uses the exact (unsnapped) directions, so the physical extent is kept.
  first = np.zeros(3)
  first[flipped] = np.asarray(array.shape, np.float64)[flipped] - 1
  first_point = np.asarray(origin, np.float64) + direction @ (first * spacing)
  reoriented = np.transpose(np.flip(array, axis=flipped), order)
  return Volume(np.ascontiguousarray(reoriented), spacing[order], first_point[::-1])


def _rescaled(slices: Sequence[np.ndarray], slopes, intercepts) -> np.ndarray:
  """[len(slices), ...] of slices[i] * slopes[i] + intercepts[i]: int16 when every value
  is an integer that int16 holds, else float32.

  Slice by slice in float64, twice (the first pass only decides the dtype), so the whole
  volume is never held in float64.
  """
  def values(i):
    return slices[i] * np.float64(slopes[i]) + np.float64(intercepts[i])

  fits_int16 = True
  for i in range(len(slices)):
    v = values(i)
    if not (v.min() >= _INT16.min and v.max() <= _INT16.max and np.array_equal(v, np.rint(v))):
      fits_int16 = False
      break
  out = np.empty((len(slices), *slices[0].shape), np.int16 if fits_int16 else np.float32)
  for i in range(len(slices)):
    out[i] = values(i)
  return out


# ------------------------------------------------------------------------------- NIfTI

def read_nifti(path) -> Volume:
  """A 3D NIfTI-1/2 file (a 4D one with a single volume is accepted) -> canonical Volume.

  The affine (nibabel's choice of sform/qform) maps voxel indices to RAS+ mm; it must be
  axis-aligned up to permutations and flips. Raises BadVolumeError.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top  (3D sources only)
  path = os.fspath(path)
  try:
    image = nib.load(path)
  except FileNotFoundError:
    raise BadVolumeError(path, "missing") from None
  # nibabel raises several types for broken headers and files; all mean "cannot use".
  except Exception as e:  # pylint: disable=broad-except
    raise BadVolumeError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
  if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
    raise BadVolumeError(path, f"not a NIfTI image (nibabel read a {type(image).__name__})")
  shape = image.shape
  if len(shape) < 3 or any(n != 1 for n in shape[3:]):
    raise BadVolumeError(path, f"{len(shape)}D image of shape {shape}: expected one 3D "
                               "volume; extract it first (e.g. nibabel.funcs.four_to_three)")
  if 0 in shape:
    raise BadVolumeError(path, f"empty image of shape {shape}")
  proxy = image.dataobj
  # The stored values, memory-mapped for uncompressed files; scaling is applied slice by
  # slice below (nibabel's scaled read would materialise the volume in float64).
  stored = np.asanyarray(proxy.get_unscaled()).reshape(shape[:3])
  if not (np.issubdtype(stored.dtype, np.integer) or np.issubdtype(stored.dtype, np.floating)):
    raise BadVolumeError(path, f"unsupported NIfTI data type {stored.dtype}")
  linear = image.affine[:3, :3]
  spacing = np.linalg.norm(linear, axis=0)
  if not spacing.min() > 0:
    raise BadVolumeError(path, f"degenerate affine (a voxel size is 0): {image.affine.tolist()}")
  direction = _RAS_TO_LPS[:, None] * linear / spacing
  origin = _RAS_TO_LPS * image.affine[:3, 3]
  n = shape[0]
  values = _rescaled(stored, np.full(n, proxy.slope), np.full(n, proxy.inter))
  return canonical_volume(values, direction, spacing, origin, source=path)


# ------------------------------------------------------------------------------- DICOM

@dataclasses.dataclass(frozen=True)
class _Slice:
  """What grouping, sorting and checking need from one image file's header."""
  path: str
  name: str             # path relative to the series' directory, for messages
  series: str
  description: str      # modality and series description, for listing series
  position: np.ndarray  # ImagePositionPatient: LPS mm of pixel [0, 0]
  orientation: np.ndarray  # ImageOrientationPatient: row direction, then column direction
  size: tuple           # (Rows, Columns)
  pixel_spacing: tuple  # (between rows, between columns), mm
  thickness: float      # Spacing Between Slices, else Slice Thickness; 0 if neither


def read_dicom_series(path, series_uid: str | None = None) -> Volume:
  """One DICOM image series -> canonical Volume in modality units (HU for CT).

  Args:
    path: a directory (searched recursively; files that are not DICOM are skipped) or a
      list of DICOM files.
    series_uid: the SeriesInstanceUID to read; required when there are several image
      series.

  Image slices are the files with a position, an orientation and a pixel matrix
  (localizers excluded). They are sorted along the slice normal (the cross product of
  the row and column directions), so file names and instance numbers do not matter.

  Raises:
    BadVolumeError: no or several series, mixed orientations or matrix sizes, duplicate
      positions, gantry tilt, uneven spacing or a missing slice, an oblique orientation,
      unreadable pixel data.
  """
  source, files, from_directory = _dicom_files(path)
  slices, skipped = [], []
  for file in files:
    header = _read_header(file, source, required=not from_directory)
    if header is None:
      skipped.append("not DICOM")
      continue
    item = _slice(file, source, header)
    if isinstance(item, str):
      skipped.append(item)
    else:
      slices.append(item)
  if not files:
    raise BadVolumeError(source, "no files (an empty directory)")
  if not slices:
    found = ", ".join(f"{reason}: {skipped.count(reason)}" for reason in sorted(set(skipped)))
    raise BadVolumeError(source, f"no DICOM image slices found ({len(files)} files; {found})")
  chosen = _choose_series(slices, series_uid, source)
  chosen, along = _sorted_regular(chosen, source)
  first = chosen[0]
  if len(chosen) > 1:
    slice_spacing = (along[-1] - along[0]) / (len(chosen) - 1)
  elif first.thickness > 0:
    slice_spacing = first.thickness
  else:
    raise BadVolumeError(source, f"a single slice ({first.name}) without Spacing Between "
                                 "Slices or Slice Thickness: its slice spacing is unknown")
  pixels, slopes, intercepts = [], [], []
  for item in chosen:
    stored, slope, intercept = _read_pixels(item)
    pixels.append(stored)
    slopes.append(slope)
    intercepts.append(intercept)
  row, col = first.orientation[:3], first.orientation[3:]
  # Array axes: slice (along the normal, positions ascending), row (down the image, along
  # the column direction), column (along the row direction).
  direction = np.stack([np.cross(row, col), col, row], axis=1)
  spacing = (slice_spacing, *first.pixel_spacing)
  return canonical_volume(_rescaled(pixels, slopes, intercepts), direction, spacing,
                          first.position, source=source)


def _dicom_files(path) -> tuple[str, list, bool]:
  """(name for messages, files, whether they came from a directory scan)."""
  if isinstance(path, (list, tuple)):
    files = [os.fspath(f) for f in path]
    if not files:
      raise BadVolumeError("<empty file list>", "no DICOM files given")
    source = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return source, files, False
  source = os.fspath(path)
  if not os.path.isdir(source):
    raise BadVolumeError(source, "not a directory (a DICOM series is read from its "
                                 "directory or a list of its files)")
  files = []
  for folder, dirs, names in os.walk(source):
    dirs.sort()
    files += [os.path.join(folder, name) for name in sorted(names)]
  return source, files, True


def _read_header(file: str, source: str, required: bool):
  """The header (no pixel data) of a DICOM file; None for a non-DICOM file in a directory
  scan. Files that are DICOM but broken always raise: skipping one would surface later
  as a confusing 'missing slice'."""
  import pydicom  # pylint: disable=g-import-not-at-top  (DICOM sources only)
  from pydicom.errors import InvalidDicomError  # pylint: disable=g-import-not-at-top
  try:
    # Files written without the 128-byte preamble are recognised by their suffix.
    return pydicom.dcmread(file, stop_before_pixels=True,
                           force=file.lower().endswith(DICOM_SUFFIXES))
  except InvalidDicomError:
    if required:
      raise BadVolumeError(file, "not a DICOM file") from None
    return None
  except FileNotFoundError:
    raise BadVolumeError(file, "missing") from None
  except Exception as e:  # pylint: disable=broad-except  (pydicom's many parse errors)
    raise BadVolumeError(file, f"unreadable DICOM header in the series of {source} "
                               f"({type(e).__name__}: {e})") from None


def _slice(file: str, source: str, header) -> _Slice | str:
  """The slice a header describes, or why it is not one (a short reason to count)."""
  if int(header.get("NumberOfFrames", 1) or 1) > 1:
    return "multi-frame (not supported)"
  needed = ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns")
  if any(not header.get(k) for k in needed):
    return "no image position, orientation or size"
  if "LOCALIZER" in [str(t).upper() for t in header.get("ImageType", [])]:
    return "localizer"
  name = os.path.relpath(file, source)
  try:
    position = np.asarray(header.ImagePositionPatient, np.float64)
    orientation = np.asarray(header.ImageOrientationPatient, np.float64)
    pixel_spacing = tuple(float(s) for s in header.get("PixelSpacing") or ())
    thickness = _number(header, "SpacingBetweenSlices", _number(header, "SliceThickness", 0.0))
  except (TypeError, ValueError) as e:
    raise BadVolumeError(source, f"slice {name}: invalid geometry ({e})") from None
  if position.shape != (3,) or orientation.shape != (6,):
    raise BadVolumeError(source, f"slice {name}: ImagePositionPatient {position.tolist()} / "
                                 f"ImageOrientationPatient {orientation.tolist()} should "
                                 "hold 3 / 6 numbers")
  if len(pixel_spacing) != 2 or min(pixel_spacing) <= 0:
    raise BadVolumeError(source, f"slice {name}: PixelSpacing {list(pixel_spacing)} should "
                                 "be two positive mm values")
  description = " ".join(str(header.get(k, "")).strip() for k in ("Modality", "SeriesDescription"))
  return _Slice(file, name, str(header.get("SeriesInstanceUID", "")), description.strip(),
                position, orientation, (int(header.Rows), int(header.Columns)),
                pixel_spacing, thickness)


def _choose_series(slices: list, series_uid: str | None, source: str) -> list:
  by_series = {}
  for item in slices:
    by_series.setdefault(item.series, []).append(item)
  if series_uid is None and len(by_series) == 1:
    return next(iter(by_series.values()))
  if series_uid in by_series:
    return by_series[series_uid]
  listing = "; ".join(f"{uid or '<no SeriesInstanceUID>'} ({len(items)} slices"
                      f"{', ' + items[0].description if items[0].description else ''})"
                      for uid, items in sorted(by_series.items()))
  if series_uid is None:
    raise BadVolumeError(source, f"{len(by_series)} image series found, pass series_uid= "
                                 f"to choose one: {listing}")
  raise BadVolumeError(source, f"no image series {series_uid}; found: {listing}")


def _sorted_regular(slices: list, source: str) -> tuple[list, np.ndarray]:
  """Slices sorted along the normal and their positions along it, after checking that
  they form a regular grid."""
  first = slices[0]
  for item in slices[1:]:
    if np.abs(item.orientation - first.orientation).max() > AXIS_TOLERANCE:
      raise BadVolumeError(source, f"mixed orientations: slice {item.name} has "
                                   f"ImageOrientationPatient {item.orientation.tolist()}, "
                                   f"slice {first.name} {first.orientation.tolist()}")
    if item.size != first.size or not np.allclose(item.pixel_spacing, first.pixel_spacing,
                                                  rtol=SPACING_TOLERANCE / 10):
      raise BadVolumeError(source, f"mixed pixel grids: slice {item.name} is {item.size} "
                                   f"pixels of {item.pixel_spacing} mm, slice {first.name} "
                                   f"{first.size} of {first.pixel_spacing} mm")
  normal = np.cross(first.orientation[:3], first.orientation[3:])
  if not 0.5 < np.linalg.norm(normal) < 1.5:
    raise BadVolumeError(source, f"invalid ImageOrientationPatient {first.orientation.tolist()} "
                                 f"in slice {first.name}: row and column directions should "
                                 "be perpendicular unit vectors")
  normal /= np.linalg.norm(normal)
  positions = np.stack([item.position for item in slices])
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  slices, positions, along = [slices[i] for i in order], positions[order], along[order]
  gaps = np.diff(along)
  duplicates = np.flatnonzero(gaps < DUPLICATE_MM)
  if duplicates.size:
    i = duplicates[0]
    raise BadVolumeError(source, f"duplicate slice position: slices {slices[i].name} and "
                                 f"{slices[i + 1].name} both lie at {along[i]:.3f} mm along "
                                 "the slice normal (repeated acquisitions in one series?)")
  # Gantry tilt: the slices' corners drift across the normal as they move along it.
  offsets = positions - positions[0]
  across = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
  allowed = POSITION_SLACK_MM + AXIS_TOLERANCE * np.abs(along - along[0])
  tilted = np.flatnonzero(across > allowed)
  if tilted.size:
    i = tilted[0]
    angle = np.degrees(np.arctan2(across[i], abs(along[i] - along[0])))
    raise BadVolumeError(source, f"slice positions are not along the slice normal (gantry "
                                 f"tilt?): slice {slices[i].name} is {across[i]:.2f} mm off "
                                 f"the normal through slice {slices[0].name}, a tilt of "
                                 f"{angle:.1f} deg; resample the series onto a rectangular "
                                 "grid first (e.g. dcm2niix corrects gantry tilt)")
  if len(gaps):
    step = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * step)
    if uneven.size:
      i = uneven[0]
      problem = (f"missing slice(s)? ({gaps[i] / step:.1f} spacings)" if gaps[i] > step
                 else "uneven slice spacing")
      raise BadVolumeError(source, f"{problem}: slices {slices[i].name} and "
                                   f"{slices[i + 1].name} are {gaps[i]:.3f} mm apart along "
                                   f"the normal where the series' median spacing is "
                                   f"{step:.3f} mm (tolerance {SPACING_TOLERANCE:.0%})")
  return slices, along


def _read_pixels(item: _Slice) -> tuple[np.ndarray, float, float]:
  """(stored pixel values [Rows, Columns], Rescale Slope, Rescale Intercept) of a slice."""
  import pydicom  # pylint: disable=g-import-not-at-top
  # Decoders raise many exception types (codec errors, short data, missing plugins).
  try:
    ds = pydicom.dcmread(item.path, force=item.path.lower().endswith(DICOM_SUFFIXES))
    stored = ds.pixel_array
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
  except Exception as e:  # pylint: disable=broad-except
    raise BadVolumeError(item.path, f"unreadable DICOM pixel data ({type(e).__name__}: "
                                    f"{e})") from None
  photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
  if not photometric.startswith("MONOCHROME"):
    raise BadVolumeError(item.path, f"{photometric or 'no'} photometric interpretation: a "
                                    "CT slice is MONOCHROME1/2 greyscale")
  if stored.shape != item.size:
    raise BadVolumeError(item.path, f"pixel data of shape {stored.shape}, expected "
                                    f"Rows x Columns = {item.size}")
  return stored, slope, intercept


def _number(ds, keyword: str, default: float) -> float:
  """A numeric element's value; `default` when it is absent or empty."""
  value = ds.get(keyword)
  return default if value is None or value == "" else float(value)
