"""CT readers: real NIfTI files and DICOM series bundled with nibabel and pydicom, and
series written here, all landing in the canonical LPS (z, y, x) frame with the same
voxels at the same physical points; and every malformed input refused with a message
that says where and what."""

import os
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from anatjax.data import ct_readers
from anatjax.data.ct_readers import BadVolumeError
from anatjax.data.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Patient directions in LPS (x, y, z).
LEFT, RIGHT, POSTERIOR, ANTERIOR = (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0)
SUPERIOR, INFERIOR = (0, 0, 1), (0, 0, -1)


def pydicom_file(name):
  """A real DICOM file that ships inside pydicom (never downloaded)."""
  path = get_testdata_file(name, download=False)
  assert path, f"{name} is not bundled with this pydicom"
  return path


def pydicom_series(folder):
  """A real series folder of pydicom's bundled DICOMDIR test set."""
  path = os.path.join(os.path.dirname(pydicom_file("CT_small.dcm")), "dicomdirtests", folder)
  assert os.path.isdir(path), f"{folder} is not bundled with this pydicom"
  return path


def known_volume(shape=(5, 6, 7), spacing=(2.5, 0.8, 0.7), origin=(-40.0, 12.5, -101.25)):
  """Distinct-enough HU values on an anisotropic grid, so any axis mix-up shows."""
  hu = np.random.default_rng(0).integers(-1024, 2000, shape).astype(np.int16)
  return Volume(hu, spacing, origin)


def assert_same_volume(got, want):
  assert got.array.dtype == want.array.dtype
  np.testing.assert_array_equal(got.array, want.array)
  np.testing.assert_allclose(got.spacing, want.spacing, atol=1e-4)
  np.testing.assert_allclose(got.origin, want.origin, atol=1e-4)


# --------------------------------------------------------------------- DICOM writing
def scanner_slices(volume, row, col):
  """What a scanner imaging `volume` with image rows along `row` and columns along `col`
  (LPS unit vectors) stores: (ImagePositionPatient, HU [rows, cols]) per slice, in
  ascending order along row x col, and PixelSpacing. Every pixel's value is looked up at
  its physical point, independently of the reader's reorientation."""
  row, col = np.asarray(row, float), np.asarray(col, float)
  normal = np.cross(row, col)
  shape = np.asarray(volume.shape[::-1])            # (x, y, z)
  spacing = np.asarray(volume.spacing[::-1])
  low = np.asarray(volume.origin[::-1])
  high = low + (shape - 1) * spacing
  axis = {name: int(np.argmax(np.abs(v))) for name, v in
          (("row", row), ("col", col), ("normal", normal))}
  # Pixel [0, 0] of the first slice: the corner from which all three directions point in.
  corner = np.where(row + col + normal > 0, low, high)
  r, c = np.meshgrid(np.arange(shape[axis["col"]]), np.arange(shape[axis["row"]]),
                     indexing="ij")
  slices = []
  for k in range(shape[axis["normal"]]):
    position = corner + k * spacing[axis["normal"]] * normal
    points = (position + r[..., None] * spacing[axis["col"]] * col
              + c[..., None] * spacing[axis["row"]] * row)
    index = np.rint(volume.point_to_index(points[..., ::-1])).astype(int)
    slices.append((position, volume.array[index[..., 0], index[..., 1], index[..., 2]]))
  return slices, (spacing[axis["col"]], spacing[axis["row"]])


def write_ct_slice(path, hu, position, orientation, pixel_spacing, series_uid, instance,
                   slope=1.0, intercept=-1024.0, thickness=2.5, extra_stored=0):
  """An uncompressed CT Image Storage file of `hu` stored as uint16 via slope/intercept."""
  stored = np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.uint16) + extra_stored
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.SOPClassUID = CT_IMAGE_STORAGE
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = "CT"
  ds.SeriesDescription = "test series"
  ds.SeriesInstanceUID = series_uid
  ds.InstanceNumber = instance
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
  ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
  ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
  ds.SliceThickness = f"{thickness:g}"
  ds.RescaleSlope = f"{slope:g}"
  ds.RescaleIntercept = f"{intercept:g}"
  ds.set_pixel_data(stored, "MONOCHROME2", bits_stored=16)
  ds.save_as(path, enforce_file_format=True)


def write_series(directory, volume, row=LEFT, col=POSTERIOR, *, series_uid=None, seed=0,
                 tilt_deg=0.0, reverse_instances=False, rescale=None, skip=()):
  """`volume` as a CT series in `directory`, written in shuffled order under random file
  names. rescale(k) -> (slope, intercept, extra_stored) per slice; slices in `skip` are
  left out; tilt_deg shears the slice positions along the column direction."""
  os.makedirs(directory, exist_ok=True)
  series_uid = series_uid or generate_uid()
  slices, pixel_spacing = scanner_slices(volume, row, col)
  orientation = (*row, *col)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(slices))
  paths = []
  for k in order:
    if k in skip:
      continue
    position, hu = slices[k]
    position = position + k * volume.spacing[0] * np.tan(np.radians(tilt_deg)) * np.asarray(col)
    slope, intercept, extra = rescale(k) if rescale else (1.0, -1024.0, 0)
    instance = len(slices) - k if reverse_instances else k + 1
    path = os.path.join(directory, rng.bytes(8).hex())
    write_ct_slice(path, hu, position, orientation, pixel_spacing, series_uid, instance,
                   slope, intercept, volume.spacing[0], extra)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------- NIfTI writing
def write_nifti(path, volume, axes, flips, data=None, slope_inter=None, rotate_deg=0.0):
  """`volume` (or `data` on its grid) as NIfTI whose array axis a runs along canonical
  axis axes[a], reversed where flips[a]; the RAS affine says so, turned by rotate_deg
  about the patient's vertical axis when asked. slope_inter: the header's scaling of the
  stored `data`."""
  flipped = [a for a in range(3) if flips[a]]
  data = np.flip(np.transpose(volume.array if data is None else data, axes), flipped)
  affine = np.eye(4)
  first = np.zeros(3)  # canonical (z, y, x) index of the file's voxel 0
  for a, c in enumerate(axes):
    step_zyx = np.zeros(3)
    step_zyx[c] = volume.spacing[c] * (-1 if flips[a] else 1)
    first[c] = volume.shape[c] - 1 if flips[a] else 0
    affine[:3, a] = step_zyx[::-1] * [-1, -1, 1]  # LPS (x, y, z) -> RAS
  affine[:3, 3] = volume.index_to_point(first)[::-1] * [-1, -1, 1]
  affine[:3, :3] = rotation_z(rotate_deg) @ affine[:3, :3]
  image = nib.Nifti1Image(data, affine)
  if slope_inter:
    image.header.set_slope_inter(*slope_inter)
  nib.save(image, path)
  return str(path)


def rotation_z(degrees):
  t = np.radians(degrees)
  return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


# ------------------------------------------------------------------- real NIfTI files
@pytest.mark.parametrize("name,dtype", [("anatomical.nii", np.int16),  # big-endian int16
                                        ("standard.nii.gz", np.int16),  # uint8
                                        ("reoriented_anat_moved.nii", np.float32),
                                        ("resampled_anat_moved.nii", np.float32)])  # NaNs
def test_bundled_nifti_voxels_keep_their_physical_points(name, dtype):
  path = os.path.join(NIBABEL_DATA, name)
  image = nib.load(path)
  volume = ct_readers.read_volume(path)
  data = np.asanyarray(image.dataobj)
  # Every voxel of the file: its RAS point from nibabel's affine, in LPS (z, y, x), must
  # be a grid point of the canonical volume holding the same value.
  ijk = np.stack(np.meshgrid(*map(np.arange, image.shape), indexing="ij"), -1).reshape(-1, 3)
  lps = nib.affines.apply_affine(image.affine, ijk) * [-1, -1, 1]
  index = volume.point_to_index(lps[:, ::-1])
  np.testing.assert_allclose(index, np.rint(index), atol=1e-4)
  index = np.rint(index).astype(int)
  assert (index >= 0).all() and (index < volume.shape).all()
  np.testing.assert_array_equal(volume.array[tuple(index.T)], data[tuple(ijk.T)])
  assert sorted(volume.shape) == sorted(image.shape)
  assert volume.array.flags.c_contiguous and volume.array.dtype == dtype


def test_bundled_4d_nifti_is_refused():
  with pytest.raises(BadVolumeError, match=r"example4d.nii.gz: 4D image of shape "
                                           r"\(128, 96, 24, 2\).*four_to_three"):
    ct_readers.read_nifti(os.path.join(NIBABEL_DATA, "example4d.nii.gz"))


# --------------------------------------------------------------------- written NIfTI
@pytest.mark.parametrize("axes,flips", [((0, 1, 2), (False, False, False)),
                                        ((2, 1, 0), (False, False, False)),   # RAS-like
                                        ((2, 0, 1), (True, False, True)),
                                        ((1, 2, 0), (True, True, True))])
def test_nifti_and_dicom_of_one_volume_read_identically(tmp_path, axes, flips):
  volume = known_volume()
  from_nifti = ct_readers.read_volume(write_nifti(tmp_path / "ct.nii.gz", volume, axes, flips))
  write_series(tmp_path / "dicom", volume)
  from_dicom = ct_readers.read_volume(tmp_path / "dicom")
  assert_same_volume(from_nifti, volume)
  assert_same_volume(from_dicom, volume)


def test_nifti_scaling_and_dtype(tmp_path):
  volume = known_volume()
  stored = volume.array // 2 + 600
  path = write_nifti(tmp_path / "scaled.nii", volume, (2, 1, 0), (True, True, False), stored,
                     slope_inter=(2.0, -1200.0))
  got = ct_readers.read_nifti(path)
  assert got.array.dtype == np.int16
  np.testing.assert_array_equal(got.array, stored.astype(np.int32) * 2 - 1200)

  path = write_nifti(tmp_path / "half.nii", volume, (2, 1, 0), (True, True, False), stored,
                     slope_inter=(0.5, 0.25))  # non-integral HU -> float32
  got = ct_readers.read_nifti(path)
  assert got.array.dtype == np.float32
  np.testing.assert_array_equal(got.array, stored * 0.5 + 0.25)

  path = write_nifti(tmp_path / "float.nii", volume, (0, 1, 2), (False,) * 3,
                     volume.array.astype(np.float32))  # integral floats -> int16
  assert_same_volume(ct_readers.read_nifti(path), volume)


def test_nifti_with_a_single_fourth_dimension_reads_as_3d(tmp_path):
  volume = known_volume()
  image = nib.load(write_nifti(tmp_path / "ct.nii", volume, (2, 1, 0), (False,) * 3))
  path = tmp_path / "ct4d.nii"
  nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[..., None], image.affine), path)
  assert nib.load(path).shape == (7, 6, 5, 1)
  assert_same_volume(ct_readers.read_nifti(path), volume)


def test_oblique_nifti_is_refused_and_near_axis_one_accepted(tmp_path):
  volume = known_volume()
  path = write_nifti(tmp_path / "oblique.nii", volume, (2, 1, 0), (False,) * 3, rotate_deg=5)
  with pytest.raises(BadVolumeError, match=r"oblique.nii: oblique image: array axis 0 is "
                                           r"5.00 deg off.*resample"):
    ct_readers.read_nifti(path)
  path = write_nifti(tmp_path / "near.nii", volume, (2, 1, 0), (False,) * 3,
                     rotate_deg=0.01)  # well inside the tolerance
  got = ct_readers.read_nifti(path)
  np.testing.assert_array_equal(got.array, volume.array)
  np.testing.assert_allclose(got.origin, volume.origin, atol=1e-6)


# --------------------------------------------------------------------- real DICOM
def test_bundled_single_ct_slice_uses_its_slice_thickness():
  # Decision: one slice is a volume of depth 1, its spacing from Spacing Between Slices or
  # Slice Thickness (refused without either; see the next test).
  path = pydicom_file("CT_small.dcm")
  ds = pydicom.dcmread(path)
  volume = ct_readers.read_dicom_series([path])
  assert volume.shape == (1, 128, 128) and volume.array.dtype == np.int16
  np.testing.assert_array_equal(volume.array[0], ds.pixel_array.astype(np.int32) - 1024)
  np.testing.assert_allclose(volume.spacing, (5.0, 0.661468, 0.661468))
  np.testing.assert_allclose(volume.origin, (-75.699997, -179.035797, -158.135803))


def test_single_slice_without_thickness_is_refused(tmp_path):
  volume = known_volume(shape=(1, 6, 7))
  (path,) = write_series(tmp_path, volume)
  ds = pydicom.dcmread(path)
  del ds.SliceThickness
  ds.save_as(path)
  with pytest.raises(BadVolumeError, match="single slice .* Slice Thickness"):
    ct_readers.read_dicom_series(tmp_path)


def test_bundled_ct_series_reads_in_position_order():
  folder = pydicom_series(os.path.join("98892001", "CT5N"))
  volume = ct_readers.read_volume(folder)
  assert volume.shape == (5, 16, 16) and volume.array.dtype == np.int16
  np.testing.assert_allclose(volume.spacing, (2.5, 0.488281, 0.488281))
  np.testing.assert_allclose(volume.origin, (-1.2375, -143.0, -72.199997))
  for name in os.listdir(folder):
    ds = pydicom.dcmread(os.path.join(folder, name))
    z = round((float(ds.ImagePositionPatient[2]) - volume.origin[0]) / volume.spacing[0])
    np.testing.assert_array_equal(volume.array[z], ds.pixel_array.astype(np.int32) - 1024)


def test_bundled_series_with_a_gap_and_localizers_only_are_refused():
  with pytest.raises(BadVolumeError, match=r"CT2: missing slice.*202.500 mm apart.*"
                                           r"median spacing is 1.250 mm"):
    ct_readers.read_volume(pydicom_series(os.path.join("77654033", "CT2")))
  with pytest.raises(BadVolumeError, match=r"no DICOM image slices found \(2 files; "
                                           r"localizer: 2\)"):
    ct_readers.read_volume(pydicom_series(os.path.join("98892001", "CT2N")))


# ------------------------------------------------------------------- written DICOM
@pytest.mark.parametrize("row,col", [(LEFT, POSTERIOR), (LEFT, ANTERIOR), (RIGHT, POSTERIOR),
                                     (POSTERIOR, INFERIOR), (LEFT, INFERIOR),
                                     (ANTERIOR, SUPERIOR)],
                         ids=["axial", "axial-slices-head-to-feet", "axial-rows-to-right",
                              "sagittal", "coronal", "sagittal-upside-down"])
@pytest.mark.parametrize("reverse_instances", [False, True])
def test_series_in_any_orientation_and_file_order_reads_canonically(tmp_path, row, col,
                                                                    reverse_instances):
  volume = known_volume()
  write_series(tmp_path, volume, row, col, reverse_instances=reverse_instances, seed=3)
  assert_same_volume(ct_readers.read_dicom_series(tmp_path), volume)


def test_per_slice_rescale(tmp_path):
  volume = known_volume()
  # Intercepts that differ between slices still give integral HU -> int16.
  write_series(tmp_path / "a", volume, rescale=lambda k: (1.0, -1024.0 - 1000 * (k % 2), 0))
  assert_same_volume(ct_readers.read_dicom_series(tmp_path / "a"), volume)
  # Slice 2 at slope 0.5 with odd stored values: half-HU -> float32.
  write_series(tmp_path / "b", volume, row=LEFT, col=ANTERIOR,
               rescale=lambda k: (0.5, -1024.0, 1) if k == 2 else (1.0, -1024.0, 0))
  got = ct_readers.read_dicom_series(tmp_path / "b")
  want = volume.array.astype(np.float32)
  want[2] += 0.5
  assert got.array.dtype == np.float32
  np.testing.assert_array_equal(got.array, want)


def test_file_list_and_recursive_directory(tmp_path):
  volume = known_volume()
  paths = write_series(tmp_path / "nested" / "deeper", volume)
  (tmp_path / "nested" / "README.txt").write_text("not DICOM")
  assert_same_volume(ct_readers.read_volume(tmp_path), volume)
  assert_same_volume(ct_readers.read_volume(paths[::-1]), volume)
  with pytest.raises(BadVolumeError, match="README.txt: not a DICOM file"):
    ct_readers.read_dicom_series([*paths, str(tmp_path / "nested" / "README.txt")])


def test_gantry_tilt_is_refused(tmp_path):
  write_series(tmp_path, known_volume(), tilt_deg=15.0)
  with pytest.raises(BadVolumeError, match=re.escape(f"{tmp_path}: slice positions are not "
                                                     "along the slice normal") +
                                           r".*tilt of 15.0 deg.*dcm2niix"):
    ct_readers.read_dicom_series(tmp_path)


def test_missing_slice_is_refused(tmp_path):
  write_series(tmp_path, known_volume(), skip=(2,))
  with pytest.raises(BadVolumeError, match=r"missing slice.*2.0 spacings.*5.000 mm apart.*"
                                           r"median spacing is 2.500 mm"):
    ct_readers.read_dicom_series(tmp_path)


def test_duplicate_positions_are_refused(tmp_path):
  volume = known_volume()
  write_series(tmp_path / "one", volume, series_uid="1.2.3.4")
  write_series(tmp_path / "two", volume, series_uid="1.2.3.4", seed=1)  # same series twice
  with pytest.raises(BadVolumeError, match="duplicate slice position.*repeated"):
    ct_readers.read_dicom_series(tmp_path)


def test_mixed_orientations_are_refused(tmp_path):
  volume = known_volume()
  write_series(tmp_path, volume, series_uid="1.2.3.4")
  write_series(tmp_path / "sagittal", volume, row=POSTERIOR, col=INFERIOR, series_uid="1.2.3.4")
  with pytest.raises(BadVolumeError, match="mixed orientations"):
    ct_readers.read_dicom_series(tmp_path)


def test_oblique_series_is_refused(tmp_path):
  volume = known_volume()
  slices, pixel_spacing = scanner_slices(volume, LEFT, POSTERIOR)
  tilt = rotation_z(10.0)
  orientation = (*(tilt @ LEFT), *(tilt @ POSTERIOR))
  for k, (position, hu) in enumerate(slices):
    write_ct_slice(tmp_path / f"{k}.dcm", hu, position, orientation, pixel_spacing,
                   "1.2.3", k + 1)
  with pytest.raises(BadVolumeError, match=r"oblique image: array axis 1 is 10.00 deg off"):
    ct_readers.read_dicom_series(tmp_path)


def test_two_series_need_a_series_uid(tmp_path):
  volume = known_volume()
  other = Volume(volume.array[:, ::-1].copy(), volume.spacing, volume.origin)
  write_series(tmp_path, volume, series_uid="1.2.826.0.1.1")
  write_series(tmp_path, other, row=POSTERIOR, col=INFERIOR, series_uid="1.2.826.0.1.2",
               seed=5)
  with pytest.raises(BadVolumeError, match=r"2 image series found, pass series_uid= .*"
                                           r"1.2.826.0.1.1 \(5 slices, CT test series\); "
                                           r"1.2.826.0.1.2 \(7 slices, CT test series\)"):
    ct_readers.read_dicom_series(tmp_path)
  assert_same_volume(ct_readers.read_dicom_series(tmp_path, "1.2.826.0.1.1"), volume)
  assert_same_volume(ct_readers.read_dicom_series(tmp_path, "1.2.826.0.1.2"), other)
  with pytest.raises(BadVolumeError, match="no image series 9.9; found: 1.2.826.0.1.1"):
    ct_readers.read_dicom_series(tmp_path, "9.9")


# -------------------------------------------------------------------------- dispatch
def test_read_volume_refuses_what_it_cannot_read(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(BadVolumeError, match="notes.txt: not a CT volume"):
    ct_readers.read_volume(tmp_path / "notes.txt")
  with pytest.raises(BadVolumeError, match="gone.nii.gz: missing"):
    ct_readers.read_volume(tmp_path / "gone.nii.gz")
  with pytest.raises(BadVolumeError, match="CT_small.dcm: a single DICOM file"):
    ct_readers.read_volume(pydicom_file("CT_small.dcm"))
  with pytest.raises(BadVolumeError, match=r"no DICOM image slices found \(1 files; not "
                                           r"DICOM: 1\)"):
    ct_readers.read_volume(tmp_path)
  (tmp_path / "notes.txt").unlink()
  with pytest.raises(BadVolumeError, match="no files"):
    ct_readers.read_volume(tmp_path)
