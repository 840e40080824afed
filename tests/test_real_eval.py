"""Evaluation on a real collection's layout (issue 4): NIH ChestX-ray14 from the fixture
metadata with stand-in images, official lists, patient-level carving, boxes as masks,
split files, unusable files, the decoded-split cache, and the protocols end to end."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from anatjax import evaluate
from anatjax.data import radiographs
from anatjax.evaluate import data, real_data
from configs.eval import anatomy as anatomy_config
from configs.eval import cxr_probe as cxr_probe_config
from configs.eval import localisation as localisation_config
from test_sources import FIXTURES, read_fixture_entries, stand_in, write_csv

STAND_IN = 64     # stand-in images are 64 x 64; the tiny evaluation runs at 32 px
quiet = lambda *_: None


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
  """An NIH download: the fixture's 300 index rows, official lists by patient (every
  fifth patient tests), a box list in the release's format for the test images' first
  finding, one corrupt and one missing image."""
  root = tmp_path_factory.mktemp("nih")
  shutil.copy(os.path.join(FIXTURES, "Data_Entry_2017_v2020.head300.csv"), root)
  rows = read_fixture_entries()
  names = [r["Image Index"] for r in rows]
  test = [n for n in names if int(n[:8]) % 5 == 0]
  (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test))
  (root / "test_list.txt").write_text("\n".join(test))
  boxes = []
  for k, r in enumerate(rows):
    labels = [f for f in r["Finding Labels"].split("|") if f != "No Finding"]
    if r["Image Index"] in test and labels:
      boxes.append([r["Image Index"], labels[0].replace("Infiltration", "Infiltrate"),
                    4 + k % 20, 8 + k % 16, 24, 16])
  with open(os.path.join(FIXTURES, "BBox_List_2017.head100.csv"), newline="") as f:
    header = next(csv.reader(f))
  write_csv(root / "BBox_List_2017.csv", header, boxes)
  corrupt, missing = names[10], names[11]
  for i, name in enumerate(names):
    if name != missing:
      stand_in(root / f"images_00{1 + i % 2}" / "images" / name, seed=i,
               shape=(STAND_IN, STAND_IN))
  (root / "images_001" / "images" / corrupt).write_bytes(b"\x89PNG not really")
  return {"root": str(root), "rows": rows, "test": set(test), "boxes": boxes,
          "corrupt": corrupt, "missing": missing}


def config(module, nih, arg="tiny", **data):
  c = module.get_config(f"{arg},source=nih_cxr14")
  c.data.root = nih["root"]
  c.data.max_bad_fraction = 0.05
  c.data.num_train = c.data.num_val = c.data.num_test = 0   # every image
  for key, value in data.items():
    if isinstance(value, dict):
      c.data[key].update(value)
    else:
      c.data[key] = value
  return c


def labels_of(nih) -> dict[str, set]:
  return {r["Image Index"]: set(r["Finding Labels"].split("|")) - {"No Finding"}
          for r in nih["rows"]}


def test_official_lists_patient_carving_labels_and_boxes(nih, tmp_path):
  splits = data.load_splits(config(cxr_probe_config, nih).data, 32, workdir=str(tmp_path),
                            log=quiet)
  train, test = splits["train"], splits["test"]
  assert train.class_names == radiographs.NIH_FINDINGS
  base = {s: {os.path.basename(n) for n in splits[s].names} for s in splits}
  assert base["test"] == nih["test"] - {nih["corrupt"], nih["missing"]}
  assert not (base["train"] | base["val"]) & nih["test"]
  assert len(base["train"]) + len(base["val"]) + len(base["test"]) == 298
  patients = {s: {n[:8] for n in base[s]} for s in base}
  assert not patients["train"] & patients["val"] and not patients["test"] & patients["train"]
  val_patients = len(patients["val"]) / (len(patients["val"]) + len(patients["train"]))
  assert abs(val_patients - 0.1) < 0.02
  truth = labels_of(nih)
  for split in splits.values():
    for name, row in zip(split.names, split.findings):
      assert {split.class_names[j] for j in np.flatnonzero(row)} == \
          truth[os.path.basename(name)]
    assert split.images.shape[1:] == (32, 32)
  # Boxes: half size at 32 px, one per image's first finding; the mask is the filled box.
  boxes = {b[0]: b for b in nih["boxes"]}
  unusable = (nih["corrupt"], nih["missing"])
  assert test.located.sum() == len([b for b in nih["boxes"] if b[0] not in unusable])
  for i, name in enumerate(test.names):
    b = boxes.get(os.path.basename(name))
    if b is None:
      assert not test.located[i].any()
      continue
    label = "Infiltration" if b[1] == "Infiltrate" else b[1]
    c = radiographs.NIH_FINDINGS.index(label)
    np.testing.assert_allclose(test.boxes[i, c], np.array(b[2:], float) / 2)
    # Pixel j at 32 px has its centre where stand-in pixel 2j + 1 starts: inside the box
    # when that stand-in pixel is.
    x, y, w, h = b[2:]
    want = np.zeros((64, 64), bool)
    want[y:y + h, x:x + w] = True
    np.testing.assert_array_equal(test.finding_mask(i, c), want[1::2, 1::2])
  notes = [n for s in splits.values() for n in s.notes]
  assert any(nih["missing"] in n and "listed" in n for n in notes), notes
  assert any(nih["corrupt"] in n and "decoding" in n for n in notes), notes
  logged = open(tmp_path / "bad_files.tsv").read()
  assert nih["corrupt"] in logged and nih["missing"] in logged


def test_carving_is_by_patient_seeded_and_refuses_too_much():
  paths = [f"images/{p:08d}_{k:03d}.png" for p in range(40) for k in range(p % 3 + 1)]
  a = real_data.carve_by_patient(paths, {"val": 0.25, "test": 0.25}, seed=3)
  b = real_data.carve_by_patient(paths, {"val": 0.25, "test": 0.25}, seed=3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  owners = {k: {paths[i][7:15] for i in a[k]} for k in a}
  assert len(owners["val"]) == len(owners["test"]) == 10 and len(owners["train"]) == 20
  assert not owners["val"] & owners["train"] and not owners["val"] & owners["test"]
  assert sorted(np.concatenate(list(a.values()))) == list(range(len(paths)))
  assert not np.array_equal(real_data.carve_by_patient(paths, {"val": 0.25}, 4)["val"],
                            real_data.carve_by_patient(paths, {"val": 0.25}, 3)["val"])
  with pytest.raises(ValueError, match="leaves no patient for training"):
    real_data.carve_by_patient(paths, {"val": 0.5, "test": 0.5}, 0)
  assert radiographs.patient_id("x/CheXpert-v1.0/train/patient00042/study1/view1.jpg") \
      == "patient00042"
  assert radiographs.patient_id("files/p10/p10000032/s5041/02aa.jpg") == "p10000032"


def test_split_files_bring_their_labels_and_subsets_are_read_by_name(nih, tmp_path):
  """A published train list (bare names, its own labels) and a published 1 % subset
  file with no seed in its name, as the label-efficient literature ships them."""
  truth = labels_of(nih)
  chosen = sorted(n for n in truth if n not in nih["test"] and n not in
                  (nih["corrupt"], nih["missing"]))[:60]
  flipped = chosen[0]
  lines = []
  for name in chosen:
    row = [int(f in truth[name]) for f in radiographs.NIH_FINDINGS]
    if name == flipped:
      row[0] = 1 - row[0]
    lines.append(name + " " + " ".join(map(str, row)))
  (tmp_path / "train_list.txt").write_text("\n".join(lines[:50]) + "\n")
  (tmp_path / "val_list.txt").write_text("\n".join(lines[50:]) + "\n")
  subsets = tmp_path / "subsets"
  subsets.mkdir()
  (subsets / "train_10percent_split.txt").write_text("\n".join(lines[5:11]) + "\n")
  files = {s: str(tmp_path / f"{s}_list.txt") for s in ("train", "val")}
  c = config(cxr_probe_config, nih, split_files=files, subsets_dir=str(subsets),
             subset_pattern="train_{percent}percent_split.txt")
  train = data.load_splits(c.data, 32, names=("train",), log=quiet)["train"]
  assert sorted(os.path.basename(n) for n in train.names) == chosen[:50]
  i = [os.path.basename(n) for n in train.names].index(flipped)
  assert train.findings[i, 0] == 1 - int("Atelectasis" in truth[flipped])  # the file's
  for seed in (0, 1):   # no {seed} in the pattern: the same published subset
    positions = data.subset_positions(train, 0.1, seed, c.data, str(tmp_path / "out"))
    assert [os.path.basename(train.names[p]) for p in positions] == chosen[5:11]
  written = data.read_split_file(str(tmp_path / "out" / "train_10pct_seed1.txt"), 14)
  assert [os.path.basename(n) for n in written[0]] == chosen[5:11]
  (subsets / "train_10percent_split.txt").write_text(lines[5].replace(" 0", " 1", 1) + "\n")
  with pytest.raises(ValueError, match="labels of 1 entries differ"):
    data.subset_positions(train, 0.1, 0, c.data, None)
  c.data.split_files.val = files["train"]
  with pytest.raises(ValueError, match="50 images are in both the train and the val split"):
    data.load_splits(c.data, 32, names=("train",), log=quiet)


def test_classes_cache_and_clear_refusals(nih, tmp_path):
  logs = []
  c = config(cxr_probe_config, nih, classes="Effusion,Cardiomegaly",
             cache_dir=str(tmp_path / "cache"), num_test=20)
  first = data.load_splits(c.data, 32, names=("test",), log=logs.append)["test"]
  assert first.class_names == ("Effusion", "Cardiomegaly") and len(first) == 20
  truth = labels_of(nih)
  for name, row in zip(first.names, first.findings):
    t = truth[os.path.basename(name)]
    assert row.tolist() == [int("Effusion" in t), int("Cardiomegaly" in t)]
  assert len(os.listdir(tmp_path / "cache")) == 1 and not any("cache" in s for s in logs)
  again = data.load_splits(c.data, 32, names=("test",), log=logs.append)["test"]
  assert any("from the cache" in s for s in logs)
  for field in ("names", "images", "findings", "boxes", "located"):
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
  with pytest.raises(ValueError, match="not findings of data.source=nih_cxr14"):
    data.load_splits(config(cxr_probe_config, nih, classes="Fracture").data, 32, log=quiet)
  with pytest.raises(evaluate.SetupError, match="only the synthetic data has"):
    evaluate.evaluate(config(anatomy_config, nih), "random", str(tmp_path / "a"), log=quiet)
  no_boxes = tmp_path / "nih_without_boxes"
  shutil.copytree(nih["root"], no_boxes)
  os.remove(no_boxes / "BBox_List_2017.csv")
  c = config(localisation_config, nih, root=str(no_boxes))
  with pytest.raises(evaluate.SetupError, match="BBox_List_2017.csv"):
    evaluate.evaluate(c, "random", str(tmp_path / "l"), log=quiet)


@pytest.mark.parametrize("module", [cxr_probe_config, localisation_config])
def test_protocols_end_to_end_on_the_collection(module, nih, tmp_path):
  arg = "tiny,linear_only" if module is cxr_probe_config else "tiny"
  c = config(module, nih, arg)
  results = evaluate.evaluate(c, "random", str(tmp_path), log=quiet)
  with open(tmp_path / "results.json") as f:
    stored = json.load(f)
  assert stored["classes"] == list(radiographs.NIH_FINDINGS)
  assert {r["class"] for r in stored["records"]} <= {*radiographs.NIH_FINDINGS, "mean"}
  assert results["data"]["splits"]["test"]["count"] == len(
      nih["test"] - {nih["corrupt"], nih["missing"]})
  assert "test_list.txt" in results["data"]["splits"]["test"]["from"]
  assert "nih_cxr14 images" in open(tmp_path / "results.md").read()
  means = {(r["method"], r["metric"]): r["value"] for r in results["records"]
           if r["class"] == "mean"}
  if module is cxr_probe_config:
    assert {m for m, _ in means} == {"linear"}
  else:
    assert {m for m, _ in means} == {"prior", "linear/classifier", "linear/gradcam",
                                     "linear/evidence"}
    assert 0 <= means[("linear/evidence", "pointing_game")] <= 1
    assert any("half their patients" in n for n in results["notes"])
