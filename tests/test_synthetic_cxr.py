"""Tests for the procedural chest-radiograph source ``anatjax.data.synthetic_cxr``."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest

from anatjax.data import synthetic_cxr as sc
from anatjax.data.synthetic_cxr import ANATOMY_NAMES, FINDING_NAMES, SyntheticCXR

A = {name: i for i, name in enumerate(ANATOMY_NAMES)}
F = {name: i for i, name in enumerate(FINDING_NAMES)}
LUNGS = (A["right_lung"], A["left_lung"])


@functools.lru_cache(maxsize=None)
def _items(split: str, size: int, n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], ...]:
  src = SyntheticCXR(split=split, image_size=size, seed=seed)
  return tuple(src[i] for i in range(n))


def _mask_bbox(mask: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1],
          np.float32)


# ------------------------------------------------------------------- API / format
def test_public_names():
  assert ANATOMY_NAMES[0] == "background"
  assert len(ANATOMY_NAMES) >= 8 and len(set(ANATOMY_NAMES)) == len(ANATOMY_NAMES)
  assert FINDING_NAMES == ("nodule", "consolidation", "pleural_effusion", "cardiomegaly",
               "pneumothorax")
  assert len(SyntheticCXR()) == 100_000
  assert len(SyntheticCXR("labelled")) == 10_000
  assert len(SyntheticCXR(num_examples=7)) == 7


@pytest.mark.parametrize("split", ["pretrain", "labelled"])
@pytest.mark.parametrize("size", [64, 224])
def test_shapes_and_dtypes(split, size):
  src = SyntheticCXR(split=split, image_size=size)
  item = src[5]
  expected = {"image", "anatomy", "index"}
  if split == "labelled":
    expected |= {"findings", "finding_masks", "boxes"}
  assert set(item) == expected
  assert item["image"].shape == (size, size) and item["image"].dtype == np.uint8
  assert item["anatomy"].shape == (size, size) and item["anatomy"].dtype == np.uint8
  assert item["anatomy"].max() < len(ANATOMY_NAMES)
  assert item["index"].dtype == np.int64 and item["index"].shape == () and int(item["index"]) == 5
  if split == "labelled":
    assert item["findings"].shape == (5,) and item["findings"].dtype == np.uint8
    assert item["finding_masks"].shape == (size, size)
    assert item["finding_masks"].dtype == np.uint8
    assert item["boxes"].shape == (5, 4) and item["boxes"].dtype == np.float32
  # a real image: uses the dynamic range, dark air and bright bone/tissue
  img = item["image"]
  assert img.min() < 30 and img.max() > 180 and img.std() > 30


def test_argument_validation():
  with pytest.raises(ValueError, match="pretrain.*labelled|labelled.*pretrain"):
    SyntheticCXR(split="train")
  with pytest.raises(ValueError, match="image_size"):
    SyntheticCXR(image_size=31)
  with pytest.raises(ValueError):
    SyntheticCXR(num_examples=0)
  with pytest.raises(ValueError):
    SyntheticCXR(seed=-1)
  src = SyntheticCXR(num_examples=10, image_size=32)
  with pytest.raises(IndexError, match=r"10.*10|index 10"):
    src[10]
  with pytest.raises(IndexError, match="-11"):
    src[-11]
  with pytest.raises(TypeError):
    src[1.5]
  # negative indices behave like a sequence
  last = src[-1]
  assert int(last["index"]) == 9
  np.testing.assert_array_equal(last["image"], src[9]["image"])


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("split", ["pretrain", "labelled"])
def test_determinism_and_order_independence(split):
  a = SyntheticCXR(split=split, image_size=96, seed=3)
  b = SyntheticCXR(split=split, image_size=96, seed=3)
  first = {i: a[i] for i in (4, 1, 7)}
  b[0], b[9]  # different access history
  for i in (7, 4, 1):
    other = b[i]
    for key, value in first[i].items():
      assert np.array_equal(value, other[key]), (i, key)
      assert value.tobytes() == other[key].tobytes()
  # different index / seed / split -> different image
  assert not np.array_equal(a[4]["image"], a[1]["image"])
  assert not np.array_equal(a[4]["image"], SyntheticCXR(split=split, image_size=96, seed=4)[4]["image"])
  other_split = "labelled" if split == "pretrain" else "pretrain"
  assert not np.array_equal(a[4]["image"],
               SyntheticCXR(split=other_split, image_size=96, seed=3)[4]["image"])


def test_identical_in_another_process():
  import hashlib
  import subprocess
  import sys

  def digest(item):
    h = hashlib.sha256()
    for key in sorted(item):
      h.update(key.encode())
      h.update(np.ascontiguousarray(item[key]).tobytes())
    return h.hexdigest()

  code = (
    "import hashlib, numpy as np\n"
    "from anatjax.data.synthetic_cxr import SyntheticCXR\n"
    "src = SyntheticCXR(split='labelled', image_size=80, seed=5)\n"
    "for i in (17, 3):\n"
    "    item = src[i]\n"
    "    h = hashlib.sha256()\n"
    "    for key in sorted(item):\n"
    "        h.update(key.encode()); h.update(np.ascontiguousarray(item[key]).tobytes())\n"
    "    print(h.hexdigest())\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
             cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
  src = SyntheticCXR(split="labelled", image_size=80, seed=5)
  assert out.stdout.split() == [digest(src[17]), digest(src[3])]


def test_pickle_round_trip():
  src = SyntheticCXR(split="labelled", image_size=64, num_examples=50, seed=2)
  before = src[11]                      # builds the lazy cache
  blob = pickle.dumps(src)
  assert len(blob) < 4096               # caches are not pickled
  clone = pickle.loads(blob)
  assert len(clone) == 50 and clone.split == "labelled" and clone.image_size == 64
  after = clone[11]
  for key in before:
    assert np.array_equal(before[key], after[key]), key


def test_grain_map_dataset():
  grain = pytest.importorskip("grain")
  src = SyntheticCXR(image_size=64, num_examples=12)
  ds = grain.MapDataset.source(src)
  assert len(ds) == 12
  np.testing.assert_array_equal(ds[3]["image"], src[3]["image"])


# --------------------------------------------------------------------- anatomy
def test_all_structures_present():
  items = _items("pretrain", 224, 8)
  for k, name in enumerate(ANATOMY_NAMES):
    n_present = sum(int(np.count_nonzero(it["anatomy"] == k) > 0) for it in items)
    assert n_present >= 7, (name, n_present)
  # the structures have plausible sizes (fraction of the image)
  frac = np.mean([np.bincount(it["anatomy"].ravel(), minlength=len(ANATOMY_NAMES)) / 224 ** 2
          for it in items], axis=0)
  for name, lo, hi in [("right_lung", 0.03, 0.2), ("left_lung", 0.03, 0.2), ("heart", 0.03, 0.15),
             ("abdomen", 0.1, 0.4), ("background", 0.03, 0.35), ("ribs", 0.05, 0.3)]:
    assert lo < frac[A[name]] < hi, (name, frac[A[name]])


def test_structures_present_small_images():
  items = _items("pretrain", 64, 6)
  for k, name in enumerate(ANATOMY_NAMES):
    n_present = sum(int(np.count_nonzero(it["anatomy"] == k) > 0) for it in items)
    assert n_present >= 5, (name, n_present)


def test_intensity_order():
  """Air (lungs) darker than soft tissue, soft tissue darker than heart / spine / abdomen."""
  for it in _items("pretrain", 224, 8):
    img, ana = it["image"].astype(np.float64), it["anatomy"]
    mean = {name: img[ana == A[name]].mean() for name in ANATOMY_NAMES}
    lung = img[np.isin(ana, LUNGS)].mean()
    assert mean["background"] < lung < mean["soft_tissue"] - 15
    assert mean["soft_tissue"] < mean["heart"] - 30
    assert mean["soft_tissue"] < mean["mediastinum"]
    assert mean["soft_tissue"] < mean["abdomen"] - 30
    assert lung < mean["spine"] - 60
    assert lung < mean["ribs"] and lung < mean["clavicles"]
    assert mean["trachea"] < mean["mediastinum"]


def test_laterality():
  S = 224
  xs = np.arange(S)[None, :]
  for it in _items("pretrain", S, 8):
    ana = it["anatomy"]
    cx = {name: (xs * (ana == A[name])).sum() / max(1, (ana == A[name]).sum())
       for name in ("right_lung", "left_lung", "heart", "spine", "trachea")}
    # patient right = image left
    assert cx["right_lung"] < 0.4 * S and cx["left_lung"] > 0.6 * S
    assert abs(cx["spine"] - S / 2) < 0.06 * S and abs(cx["trachea"] - S / 2) < 0.06 * S
    heart = ana == A["heart"]
    assert heart[:, S // 2:].sum() > 0.6 * heart.sum()
    # lungs above the abdomen, heart above the abdomen's centre
    rows = np.arange(S)[:, None]
    abd_y = (rows * (ana == A["abdomen"])).sum() / (ana == A["abdomen"]).sum()
    lung_y = (rows * np.isin(ana, LUNGS)).sum() / np.isin(ana, LUNGS).sum()
    assert lung_y < abd_y
    assert 0.3 < sc.cardiothoracic_ratio(ana) < 0.52


def test_patients_vary():
  items = _items("pretrain", 224, 8)
  ctr = [sc.cardiothoracic_ratio(it["anatomy"]) for it in items]
  assert np.ptp(ctr) > 0.03
  lung_top = [np.nonzero(np.isin(it["anatomy"], LUNGS).any(1))[0][0] for it in items]
  lung_bottom = [np.nonzero(np.isin(it["anatomy"], LUNGS).any(1))[0][-1] for it in items]
  assert np.ptp(np.subtract(lung_bottom, lung_top)) > 5
  means = [it["image"].mean() for it in items]
  assert np.ptp(means) > 5


# ---------------------------------------------------------------------- splits
def test_pretrain_has_no_findings():
  for it in _items("pretrain", 64, 10):
    assert "findings" not in it and "finding_masks" not in it and "boxes" not in it


def test_labelled_masks_boxes_consistent():
  items = _items("labelled", 128, 40)
  counts = np.zeros(5, int)
  normal = 0
  for it in items:
    fm, fnd, boxes = it["finding_masks"], it["findings"], it["boxes"]
    assert set(np.unique(fnd)) <= {0, 1}
    assert fm.max() < 32
    normal += int(fnd.sum() == 0)
    for f in range(5):
      mask = (fm >> f) & 1
      assert bool(fnd[f]) == bool(mask.any()), (int(it["index"]), f)
      if fnd[f]:
        np.testing.assert_array_equal(boxes[f], _mask_bbox(mask))
      else:
        assert not boxes[f].any()
    counts += fnd
  # each finding occurs with probability ~0.3; some images are normal
  assert all(4 <= c <= 22 for c in counts), counts
  assert normal >= 1


def test_finding_locations_and_appearance():
  """Findings sit in the lungs (cardiomegaly: the heart) and have the expected contrast."""
  items = _items("labelled", 128, 40)
  seen = set()
  lungish = np.isin(np.arange(256), [*LUNGS, A["ribs"], A["clavicles"]])
  for it in items:
    img = it["image"].astype(np.float64)
    ana, fm = it["anatomy"], it["finding_masks"]
    lung = np.isin(ana, LUNGS)
    for f in np.flatnonzero(it["findings"]):
      mask = ((fm >> f) & 1).astype(bool)
      name = FINDING_NAMES[f]
      seen.add(name)
      if name == "cardiomegaly":
        assert (ana[mask] == A["heart"]).mean() > 0.85
        continue
      assert lungish[ana[mask]].mean() > 0.8, name
      if name in ("nodule", "consolidation", "pleural_effusion") and fm.max() == 1 << f:
        rest = lung & ~mask                # only this finding present
        assert img[mask].mean() > img[rest].mean() + 15, name
      if name == "pneumothorax":
        side = A["right_lung"] if np.nonzero(mask)[1].mean() < mask.shape[1] / 2 else A["left_lung"]
        same_side = (ana == side) & ~mask
        assert img[mask & lung].mean() < img[same_side].mean() - 5
        # apicolateral: the rim is in the upper part of the lung
        rows = np.nonzero(mask.any(1))[0]
        lung_rows = np.nonzero(lung.any(1))[0]
        assert rows.mean() < lung_rows.mean()
  assert seen == set(FINDING_NAMES)


def test_cardiomegaly_ratio():
  items = _items("labelled", 128, 40)
  ctr_c = [sc.cardiothoracic_ratio(it["anatomy"]) for it in items if it["findings"][F["cardiomegaly"]]]
  ctr_n = [sc.cardiothoracic_ratio(it["anatomy"]) for it in items
       if not it["findings"][F["cardiomegaly"]]]
  assert len(ctr_c) >= 4 and len(ctr_n) >= 10
  assert min(ctr_c) > 0.5
  assert max(ctr_n) < 0.52
  assert np.mean(ctr_c) > np.mean(ctr_n) + 0.1


# --------------------------------------------------------------------- preview
@pytest.mark.parametrize("split", ["pretrain", "labelled"])
def test_render_grid(split):
  from anatjax.data import preview

  S = 64
  src = SyntheticCXR(split=split, image_size=S)
  grid = preview.render_grid(src, range(3), pairs_per_row=2)
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
  assert grid.shape[1] == 2 * (2 * S + 2)
  assert grid.shape[0] > 2 * (S + 2)                      # two rows + legend
  # the first tile is the radiograph itself, the second its overlay
  item = src[0]
  np.testing.assert_array_equal(grid[20:S, 0:S, 1], item["image"][20:])
  overlay = grid[:S, S:2 * S].astype(int)
  body = item["anatomy"] > 0
  assert np.abs(overlay[..., 0] - overlay[..., 2])[body].mean() > 5   # coloured where labelled


def test_preview_main_writes_png(tmp_path):
  import os
  import subprocess
  import sys
  import cv2

  out = tmp_path / "grid.png"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-m", "anatjax.data.preview", f"--out={out}", "--n=2",
                  "--image_size=48", "--split=labelled"], cwd=repo, check=True,
                 timeout=120)
  img = cv2.imread(str(out))
  assert img is not None and img.shape[1] == 2 * (2 * 48 + 2)
