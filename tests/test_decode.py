"""Decoding image files: PNG/JPEG depths, the DICOM display pipeline, intensity
normalisation, geometry, and one error type for every unusable file."""

import os

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from anatjax.data import decode
from anatjax.data.decode import BadImageError, DecodeOptions


def bundled(name):
  """A real test DICOM that ships inside pydicom (never downloaded)."""
  path = get_testdata_file(name, download=False)
  assert path, f"{name} is not bundled with this pydicom"
  return path


def write_dicom(path, stored, photometric="MONOCHROME2", transfer_syntax=None, **elements):
  """A DX DICOM file of `stored` pixel values (12 bits stored), optionally compressed."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.set_pixel_data(stored, photometric, bits_stored=12)
  for name, value in elements.items():
    setattr(ds, name, value)
  if transfer_syntax:
    ds.compress(transfer_syntax)
  ds.save_as(path, enforce_file_format=True)
  return str(path)


def ramp(height=48, width=64):
  """12-bit values with every pixel distinct enough to catch any mix-up."""
  rng = np.random.default_rng(0)
  return rng.integers(0, 4096, (height, width)).astype(np.uint16)


# ------------------------------------------------------------------ PNG / JPEG
def test_png_8_and_16_bit_read_exactly(tmp_path):
  for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
    image = np.random.default_rng(1).integers(0, top + 1, (30, 40)).astype(dtype)
    path = str(tmp_path / f"{dtype.__name__}.png")
    cv2.imwrite(path, image)
    values = decode.read_intensities(path)
    assert values.dtype == dtype
    np.testing.assert_array_equal(values, image)


def test_colour_becomes_grey_and_jpeg_decodes(tmp_path):
  rgb = np.zeros((20, 30, 3), np.uint8)
  rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50  # R, G, B
  path = str(tmp_path / "colour.png")
  cv2.imwrite(path, rgb[..., ::-1])  # OpenCV writes BGR
  grey = 0.299 * 200 + 0.587 * 100 + 0.114 * 50  # ITU-R BT.601 luma
  assert np.abs(decode.read_intensities(path).astype(float) - grey).max() <= 1
  jpeg = str(tmp_path / "x.jpg")
  smooth = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)
  cv2.imwrite(jpeg, smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])
  assert np.abs(decode.read_intensities(jpeg).astype(int) - smooth).max() <= 3


# ------------------------------------------------------------------ intensity
def test_minmax_and_percentile_normalisation_match_hand_computation(tmp_path):
  image = np.random.default_rng(2).integers(100, 60000, (50, 50)).astype(np.uint16)
  path = str(tmp_path / "x.png")
  cv2.imwrite(path, image)
  v = image.astype(np.float64)
  out, _ = DecodeOptions(size=50).load(path)
  np.testing.assert_array_equal(out, np.rint((v - v.min()) / (v.max() - v.min()) * 255))
  out, _ = DecodeOptions(size=50, intensity="percentile", percentiles=(5, 90)).load(path)
  low, high = np.percentile(v, 5), np.percentile(v, 90)
  want = np.rint((np.clip(v, low, high) - low) / (high - low) * 255)
  assert np.abs(out.astype(float) - want).max() <= 1  # float32 vs float64 rounding


def test_bad_options_are_refused():
  for kwargs in (dict(intensity="zscore"), dict(geometry="stretch"),
                 dict(percentiles=(99, 1))):
    with pytest.raises(ValueError, match="config data"):
      DecodeOptions(size=8, **kwargs)


# ------------------------------------------------------------------ geometry
def test_geometries_place_the_image_and_its_boxes():
  image = np.zeros((100, 200), np.uint8)
  image[20:60, 130:170] = 255  # a bright square, box (130, 20, 40, 40)
  box = np.array([[130, 20, 40, 40]], np.float32)
  want = {"resize": [[32.5, 10, 10, 20]],          # x / 4, y / 2: the whole image, stretched
          "pad": [[32.5, 17, 10, 10]],             # x / 4, y / 4 + 12 (image rows 12..37)
          "crop": [[80, 20, 20, 40]]}              # the centre 100 x 100: x - 50, clipped
  for geometry, expected in want.items():
    out, placement = decode.fit(image, 50 if geometry != "crop" else 100, geometry)
    moved = placement.boxes(box, out.shape[0])
    np.testing.assert_allclose(moved, expected, atol=1e-4)
    x, y, w, h = np.round(moved[0]).astype(int)
    assert out[y + 1:y + h - 1, x + 1:x + w - 1].min() > 200  # the square: where the box is
    assert out.sum() < 255 * (w + 2) * (h + 2)                # and nowhere else
  padded, _ = decode.fit(image, 50, "pad")
  assert padded[:12].max() == 0 and padded[37:].max() == 0 and padded[12:37].max() == 255


# ------------------------------------------------------------------ DICOM
def test_bundled_ct_applies_rescale_slope_and_intercept():
  path = bundled("CT_small.dcm")
  ds = pydicom.dcmread(path)
  slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
  want = ds.pixel_array.astype(np.float64) * slope + intercept
  np.testing.assert_allclose(decode.read_intensities(path), want)


def windowed(x, center, width, y_min, y_max):
  """DICOM PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), written out."""
  x = x.astype(np.float64)
  c, w = center - 0.5, width - 1
  out = ((x - c) / w + 0.5) * (y_max - y_min) + y_min
  out[x <= c - w / 2] = y_min
  out[x > c + w / 2] = y_max
  return out


def test_bundled_mr_applies_its_window_and_compressed_copies_decode_the_same():
  ds = pydicom.dcmread(bundled("MR_small.dcm"))
  assert ds.PixelRepresentation == 1 and ds.BitsStored == 16  # signed: y in [-2^15, 2^15)
  want = windowed(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth),
                  -2 ** 15, 2 ** 15 - 1)
  np.testing.assert_allclose(decode.read_intensities(bundled("MR_small.dcm")), want, rtol=1e-6)
  for compressed in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                     "MR_small_jpeg_ls_lossless.dcm"):
    np.testing.assert_array_equal(decode.read_intensities(bundled(compressed)),
                                  decode.read_intensities(bundled("MR_small.dcm")))
  for lossy in ("JPEG2000.dcm", "JPGExtended.dcm"):  # 16-bit J2K, 12-bit JPEG extended
    assert decode.read_intensities(bundled(lossy)).shape == (1024, 256)


def test_monochrome1_rescale_and_compression_by_hand(tmp_path):
  stored = ramp()
  slope, intercept = 2.0, -100.0
  rescaled = stored.astype(np.float64) * slope + intercept
  m1 = write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1",
                   RescaleSlope=slope, RescaleIntercept=intercept)
  np.testing.assert_allclose(decode.read_intensities(m1), rescaled.max() - rescaled)
  m2 = write_dicom(tmp_path / "m2.dcm", stored, RescaleSlope=slope, RescaleIntercept=intercept)
  as_m1, _ = DecodeOptions(size=32).load(m1)
  as_m2, _ = DecodeOptions(size=32).load(m2)
  assert np.abs(as_m1.astype(int) + as_m2 - 255).max() <= 1  # the same image, inverted
  for syntax in (RLELossless, JPEG2000Lossless):
    path = write_dicom(tmp_path / f"{syntax.keyword}.dcm", stored, "MONOCHROME1",
                       transfer_syntax=syntax, RescaleSlope=slope, RescaleIntercept=intercept)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decode.read_intensities(path), decode.read_intensities(m1))


def test_window_center_width_on_a_written_file(tmp_path):
  stored = ramp()
  path = write_dicom(tmp_path / "w.dcm", stored, WindowCenter=2000, WindowWidth=1000)
  np.testing.assert_allclose(decode.read_intensities(path),
                             windowed(stored, 2000, 1000, 0, 2 ** 12 - 1), rtol=1e-6)


# ------------------------------------------------------------------ unusable files
def truncated_copy(source, target, keep=0.6):
  with open(source, "rb") as f:
    data = f.read()
  with open(target, "wb") as f:
    f.write(data[:int(len(data) * keep)])
  return str(target)


def test_every_unusable_file_raises_bad_image_error_naming_it(tmp_path):
  good_png = str(tmp_path / "good.png")
  cv2.imwrite(good_png, ramp().astype(np.uint8))
  good_jpg = str(tmp_path / "good.jpg")
  cv2.imwrite(good_jpg, ramp().astype(np.uint8))
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "text.png").write_bytes(b"not an image at all" * 20)
  cv2.imwrite(str(tmp_path / "flat.png"), np.full((20, 20), 7, np.uint8))
  cases = {
      str(tmp_path / "absent.png"): "missing",
      str(tmp_path / "empty.png"): "empty",
      str(tmp_path / "text.png"): "not a PNG, JPEG or DICOM",
      truncated_copy(good_png, tmp_path / "cut.png"): "corrupt or truncated",
      truncated_copy(good_jpg, tmp_path / "cut.jpg"): "corrupt or truncated",
      truncated_copy(write_dicom(tmp_path / "d.dcm", ramp()), tmp_path / "cut.dcm"):
          "unreadable DICOM",
      bundled("MR_truncated.dcm"): "unreadable DICOM",
      bundled("rtplan.dcm"): "without pixel data",
      bundled("rtdose.dcm"): "multi-frame",
      str(tmp_path / "flat.png"): "constant image",
  }
  for path, reason in cases.items():
    with pytest.raises(BadImageError, match=reason) as raised:
      DecodeOptions(size=16).load(path)
    assert raised.value.path == path and path in str(raised.value)
  assert os.path.exists(good_png)
