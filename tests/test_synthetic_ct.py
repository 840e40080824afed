"""Tests for the procedural chest CT phantom ``anatjax.data.synthetic_ct``."""

from __future__ import annotations

import functools
import hashlib
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from anatjax.data import synthetic_ct as sct
from anatjax.data.synthetic_ct import LABEL_NAMES, REGION_NAMES, CTSubject, SyntheticCT
from anatjax.data.volume import Volume

L = {name: i for i, name in enumerate(LABEL_NAMES)}
R = {name: i for i, name in enumerate(REGION_NAMES)}
LUNGS = (L["lung_right"], L["lung_left"])
SHAPE = 48           # small renders keep the suite fast; geometry is in mm anyway
ARRAYS = ("emphysema", "nodule_mask", "nodules", "region_severity")


@functools.lru_cache(maxsize=None)
def _subject(index: int, shape: int = SHAPE, disease: bool = True) -> CTSubject:
  return sct.subject(0, index, shape, disease=disease)


def _lungs(ct: CTSubject) -> np.ndarray:
  return np.isin(ct.labels.array, LUNGS)


def _litres(ct: CTSubject, mask: np.ndarray) -> float:
  return np.count_nonzero(mask) * float(np.prod(ct.image.spacing)) / 1e6


def _same(a: CTSubject, b: CTSubject) -> bool:
  return (all(np.array_equal(getattr(a, k).array, getattr(b, k).array)
              for k in ("image", "labels", "regions"))
          and all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ARRAYS)
          and a.severity == b.severity and a.image.spacing == b.image.spacing)


def _digest(ct: CTSubject) -> str:
  h = hashlib.sha256()
  for a in (ct.image.array, ct.labels.array, ct.regions.array, *(getattr(ct, k) for k in ARRAYS)):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _diseased(count: int, key, shape: int = SHAPE) -> list[CTSubject]:
  """The first `count` subjects (in index order) for which key(subject) holds."""
  found = []
  for index in range(40):
    ct = _subject(index, shape)
    if key(ct):
      found.append(ct)
      if len(found) == count:
        return found
  raise AssertionError(f"fewer than {count} matching subjects")


# ------------------------------------------------------------------- API and geometry
def test_public_names():
  assert LABEL_NAMES[0] == "background" and REGION_NAMES[0] == "outside"
  assert len(set(LABEL_NAMES)) == len(LABEL_NAMES) <= 255
  assert {"body", "fat", "lung_right", "lung_left", "airway", "heart", "aorta", "liver",
          "spleen", "kidney_right", "kidney_left", "spine", "ribs"} <= set(LABEL_NAMES)
  assert REGION_NAMES[1:] == ("right_upper", "right_middle", "right_lower", "left_upper",
                              "left_lower")


def test_volumes_share_the_grid():
  ct = _subject(0)
  fov = np.asarray(sct.DEFAULT_FOV_MM)
  for vol, dtype in ((ct.image, np.int16), (ct.labels, np.uint8), (ct.regions, np.uint8)):
    assert isinstance(vol, Volume) and vol.array.dtype == dtype
    assert vol.shape == (SHAPE,) * 3
    np.testing.assert_allclose(vol.spacing, fov / SHAPE)
    np.testing.assert_allclose(vol.index_to_point((np.array(vol.shape) - 1) / 2), 0, atol=1e-9)
  assert ct.emphysema.dtype == bool and ct.nodule_mask.dtype == bool
  assert ct.emphysema.shape == ct.nodule_mask.shape == (SHAPE,) * 3
  assert ct.region_severity.dtype == np.float32
  assert ct.region_severity.shape == (len(REGION_NAMES) - 1,)
  assert ct.nodules.ndim == 2 and ct.nodules.shape[1] == 4
  odd = sct.subject(0, 0, (24, 32, 40), fov_mm=(300, 320, 340))
  assert odd.image.shape == (24, 32, 40)
  np.testing.assert_allclose(odd.image.spacing, (12.5, 10, 8.5))


def test_arguments_are_checked():
  with pytest.raises(ValueError):
    sct.subject(-1, 0)
  with pytest.raises(ValueError):
    sct.subject(0, 0, shape=8)
  with pytest.raises(ValueError):
    sct.subject(0, 0, fov_mm=(100, 100))
  with pytest.raises(ValueError):
    SyntheticCT(num_subjects=0)


# ------------------------------------------------------------------- determinism
def test_deterministic_and_index_dependent():
  a = sct.subject(0, 3, 40)
  assert _same(a, sct.subject(0, 3, 40))
  source = pickle.loads(pickle.dumps(SyntheticCT(num_subjects=5, seed=0, shape=40)))
  assert _same(a, source[3]) and _same(a, source[-2])
  assert not np.array_equal(a.image.array, sct.subject(0, 4, 40).image.array)
  assert not np.array_equal(a.image.array, sct.subject(1, 3, 40).image.array)


def test_identical_in_a_fresh_process():
  code = ("import hashlib, numpy as np; from anatjax.data import synthetic_ct as s; "
          "ct = s.subject(0, 3, 40); h = hashlib.sha256(); "
          f"[h.update(np.ascontiguousarray(a).tobytes()) for a in (ct.image.array, "
          f"ct.labels.array, ct.regions.array, *(getattr(ct, k) for k in {ARRAYS!r}))]; "
          "print(h.hexdigest())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == _digest(sct.subject(0, 3, 40))


def test_source_indexing():
  source = SyntheticCT(num_subjects=3, seed=0, shape=32)
  assert len(source) == 3 and "num_subjects=3" in repr(source)
  with pytest.raises(IndexError):
    source[3]
  with pytest.raises(TypeError):
    source[1.0]


# ------------------------------------------------------------------- anatomy
def test_hounsfield_units_by_label():
  ct = _subject(2, shape=96, disease=False)
  img, lab = ct.image.array, ct.labels.array
  median = {name: np.median(img[lab == L[name]]) for name in LABEL_NAMES}
  assert -1010 <= median["background"] <= -990
  assert -900 <= median["lung_right"] <= -780 and -900 <= median["lung_left"] <= -780
  assert -130 <= median["fat"] <= -60
  for name in ("liver", "heart", "spleen", "aorta", "kidney_right", "kidney_left"):
    assert 10 <= median[name] <= 90, (name, median[name])
  assert median["liver"] > median["spleen"]
  for name in ("spine", "ribs", "sternum"):
    assert median[name] > 200, (name, median[name])
  assert median["airway"] < -300           # mostly lumen
  # The air outside stays air, noise aside.
  assert np.abs(img[lab == L["background"]] + 1000).mean() < 40


def test_lungs_regions_and_sides():
  ct = _subject(1)
  lab, reg = ct.labels.array, ct.regions.array
  lungs = _lungs(ct)
  np.testing.assert_array_equal(reg > 0, lungs)
  # Patient right = low x in the LPS frame.
  right_x = np.nonzero(lab == L["lung_right"])[2].mean()
  left_x = np.nonzero(lab == L["lung_left"])[2].mean()
  assert right_x < ct.image.shape[2] / 2 < left_x
  for name in ("right_upper", "right_middle", "right_lower"):
    assert (lab[reg == R[name]] == L["lung_right"]).all()
  for name in ("left_upper", "left_lower"):
    assert (lab[reg == R[name]] == L["lung_left"]).all()
  z = {name: np.nonzero(reg == R[name])[0].mean() for name in REGION_NAMES[1:]}
  assert z["right_upper"] > z["right_middle"] and z["right_upper"] > z["right_lower"]
  assert z["left_upper"] > z["left_lower"]
  # Lungs lie above the liver, the heart between them.
  assert np.nonzero(lab == L["liver"])[0].mean() < np.nonzero(lungs)[0].mean()
  heart_x = np.nonzero(lab == L["heart"])[2].mean()
  assert right_x < heart_x < left_x


def test_lung_volumes_vary_plausibly():
  volumes = [_litres(ct, _lungs(ct)) for ct in map(_subject, range(8))]
  assert all(3.0 <= v <= 7.5 for v in volumes), volumes
  assert np.std(volumes) > 0.2
  # Geometry is in mm: the same subject at another resolution has the same lungs.
  coarse, fine = sct.subject(0, 1, 32, disease=False), _subject(1, 64, False)
  assert _litres(coarse, _lungs(coarse)) == pytest.approx(_litres(fine, _lungs(fine)), rel=0.08)


# ------------------------------------------------------------------- disease
def test_healthy_option_and_prevalence():
  healthy = _subject(4, disease=False)
  assert healthy.severity == 0 and not healthy.emphysema.any() and not healthy.nodule_mask.any()
  assert len(healthy.nodules) == 0 and not healthy.region_severity.any()
  diseased = _subject(4)
  np.testing.assert_array_equal(healthy.labels.array, diseased.labels.array)
  np.testing.assert_array_equal(healthy.regions.array, diseased.regions.array)
  severities = np.array([_subject(i).severity for i in range(20)])
  assert 0.2 <= (severities == 0).mean() <= 0.7
  assert severities.max() > 0.05


def test_severity_is_measured_on_the_arrays():
  for ct in _diseased(3, lambda ct: ct.severity > 0.01):
    emph, reg, lungs = ct.emphysema, ct.regions.array, _lungs(ct)
    assert not (emph & ~lungs).any()
    assert (ct.image.array[emph] < sct.LAA_THRESHOLD_HU).all()
    for r in range(1, len(REGION_NAMES)):
      assert ct.region_severity[r - 1] == pytest.approx(emph[reg == r].mean(), abs=1e-6)
    assert ct.severity == pytest.approx(emph[lungs].mean(), abs=1e-9)
    # The disease darkens the lungs of the same subject.
    healthy = _subject(ct.index, disease=False)
    keep = lungs & ~ct.nodule_mask
    assert ct.image.array[keep].mean() < healthy.image.array[keep].mean() - 5


def test_emphysema_is_upper_lobe_predominant_on_average():
  cts = _diseased(6, lambda ct: ct.severity > 0.01)
  upper = np.mean([ct.region_severity[[R["right_upper"] - 1, R["left_upper"] - 1]].mean()
                   for ct in cts])
  lower = np.mean([ct.region_severity[[R["right_lower"] - 1, R["left_lower"] - 1]].mean()
                   for ct in cts])
  assert upper > lower


def test_nodules_lie_inside_the_lungs():
  for ct in _diseased(3, lambda ct: len(ct.nodules) > 0, shape=64):
    lungs = _lungs(ct)
    # Voxels at least half covered: only nodules about a voxel wide can miss the mask.
    assert ct.nodule_mask.any() or ct.nodules[:, 3].max() < max(ct.image.spacing)
    assert not (ct.nodule_mask & ~lungs).any()
    assert ((ct.nodules[:, 3] >= 2) & (ct.nodules[:, 3] <= 11)).all()
    for centre in ct.nodules[:, :3]:
      z, y, x = np.round(ct.image.point_to_index(centre)).astype(int)
      assert lungs[z, y, x]
    if ct.nodule_mask.any():      # soft tissue, brighter than the parenchyma around it
      img = ct.image.array
      assert img[ct.nodule_mask].mean() > img[lungs & ~ct.nodule_mask].mean() + 100


# ------------------------------------------------------------------- preview
def test_render_command_writes_a_png(tmp_path):
  out = tmp_path / "ct.png"
  sct.main([f"--out={out}", "--index=4", "--shape=40"])
  png = cv2.imread(str(out))
  assert png is not None and png.ndim == 3 and min(png.shape[:2]) > 300
