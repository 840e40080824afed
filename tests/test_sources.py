"""Real collections from their download layouts (NIH fixtures with stand-in images, CheXpert,
MIMIC-CXR-JPG and RSNA trees written here in the published column layouts), split files,
image folders, start-up failures, and a pipeline that skips and reports bad files."""

import csv
import gzip
import os
import shutil

import cv2
import numpy as np
import pytest

from anatjax.data import bad_files, pipeline, radiographs, sources, transforms
from anatjax.data.lesions import LesionConfig
from configs import afire_vitb
from test_decode import write_dicom

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                        "nih_cxr14")
SIZE = 32


def data_config(**overrides):
  config = afire_vitb.get_config("runlocal").data
  config.unlock()
  config.update({"image_size": SIZE, "selection": "all", **overrides})
  return config


def make(name, root, split="pretrain", **overrides):
  return sources.make_source(data_config(source=name, root=str(root), **overrides), split)


def stand_in(path, seed=0, shape=(24, 24)):
  """A small random image under a real file name (PNG, JPEG or DICOM by suffix)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
  if str(path).lower().endswith(".dcm"):
    write_dicom(path, image.astype(np.uint16))
  else:
    cv2.imwrite(str(path), image)
  return image


def write_csv(path, header, rows):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def read_fixture_entries():
  with open(os.path.join(FIXTURES, "Data_Entry_2017_v2020.head300.csv"), newline="") as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------------------ NIH ChestX-ray14
@pytest.fixture
def nih_root(tmp_path):
  """The fixture metadata with stand-ins for all but the last 3 images, spread over two
  images_NNN/images/ folders as in the release."""
  root = tmp_path / "nih"
  root.mkdir()
  for name in ("Data_Entry_2017_v2020.head300.csv", "BBox_List_2017.head100.csv"):
    shutil.copy(os.path.join(FIXTURES, name), root)
  names = [r["Image Index"] for r in read_fixture_entries()]
  for i, name in enumerate(names[:-3]):
    stand_in(root / f"images_00{1 + i % 2}" / "images" / name, seed=i, shape=(8, 8))
  return root, names


def test_nih_findings_follow_the_metadata_and_missing_files_are_counted(nih_root):
  root, names = nih_root
  source = make("nih_cxr14", root)
  assert source.class_names == radiographs.NIH_FINDINGS and len(source) == 297
  assert source.num_listed == 300
  assert sorted(p for p, _ in source.scan_failures) == sorted(
      str(root / "images" / n) for n in names[-3:])
  labels = {r["Image Index"]: set(r["Finding Labels"].split("|")) - {"No Finding"}
            for r in read_fixture_entries()}
  for path, row in zip(source.index.paths, source.index.findings):
    assert {radiographs.NIH_FINDINGS[j] for j in np.flatnonzero(row)} == \
        labels[os.path.basename(path)]
  item = source[5]
  assert item["image"].shape == (SIZE, SIZE) and item["image"].dtype == np.uint8
  assert item["findings"].dtype == np.uint8 and item["findings_known"].all()


def test_nih_official_lists_and_normal_frontal_selection(nih_root):
  root, names = nih_root
  (root / "train_val_list.txt").write_text("\n".join(names[:200]) + "\n")
  (root / "test_list.txt").write_text("\n".join(names[200:]) + "\n")
  train, test = make("nih_cxr14", root), make("nih_cxr14", root, split="test")
  assert len(train) == 200 and len(test) == 97  # 3 test images are missing
  assert not {os.path.basename(p) for p in train.index.paths} & \
      {os.path.basename(p) for p in test.index.paths}
  normal = make("nih_cxr14", root, split="all", selection="normal_frontal")
  want = {r["Image Index"] for r in read_fixture_entries()[:-3]
          if r["Finding Labels"] == "No Finding" and r["View Position"] in ("PA", "AP")}
  assert {os.path.basename(p) for p in normal.index.paths} == want
  assert not normal.index.findings.any()


def test_nih_boxes_are_read_and_moved_with_the_image(tmp_path):
  with open(os.path.join(FIXTURES, "BBox_List_2017.head100.csv"), newline="") as f:
    boxes = list(csv.reader(f))[1:4]
  root = tmp_path / "nih"
  root.mkdir()
  shutil.copy(os.path.join(FIXTURES, "BBox_List_2017.head100.csv"), root)
  header = next(csv.reader(open(os.path.join(FIXTURES, "Data_Entry_2017_v2020.head300.csv"))))
  write_csv(root / "Data_Entry_2017.csv", header,
            [[b[0], b[1], 0, 1, 50, "M", "PA", 1024, 1024, 0.14, 0.14] for b in boxes])
  for i, b in enumerate(boxes):  # the release's images are 1024 x 1024
    stand_in(root / "images" / b[0], seed=i, shape=(1024, 1024))
  source = make("nih_cxr14", root)
  for b, position in zip(boxes, range(3)):
    item = source[position]
    assert os.path.basename(source.index.paths[position]) == b[0]
    np.testing.assert_allclose(item["boxes"][0], np.array(b[2:6], float) * SIZE / 1024,
                               rtol=1e-5)
    assert item["box_classes"][0] == radiographs.NIH_FINDINGS.index("Atelectasis")


def test_split_file_positives_agree_with_the_metadata(tmp_path):
  """The 1% split and the metadata CSV name findings the same way: for the images both
  list, and for a Data_Entry CSV written from the split's own rows (the fixtures share
  no image, so this round trip is what ties the two label orders together)."""
  split_path = os.path.join(FIXTURES, "train_1percent_split.txt")
  names, labels = radiographs.read_split_file(split_path)
  assert labels.shape == (785, 14)
  entries = {r["Image Index"]: r["Finding Labels"] for r in read_fixture_entries()}
  split_nih = radiographs.CLASS_NAMES["nih_cxr14"]
  for name, row in zip(names, labels):
    if name in entries:
      assert {split_nih[j] for j in np.flatnonzero(row)} == \
          set(entries[name].split("|")) - {"No Finding"}

  root = tmp_path / "nih"
  root.mkdir()
  shutil.copy(split_path, root)
  rows = [[n, "|".join(split_nih[j] for j in np.flatnonzero(r)) or "No Finding", 0, 0, 0,
           "M", "PA", 8, 8, 1, 1] for n, r in zip(names, labels)]
  write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #",
                                           "Patient ID", "Patient Age", "Patient Gender",
                                           "View Position", "w", "h", "x", "y"], rows)
  for i, name in enumerate(names):
    (root / "images").mkdir(exist_ok=True)
    shutil.copy(_tiny_png(tmp_path), root / "images" / name)
  from_csv = make("nih_cxr14", root)
  from_split = make("split_list", root, split_file="train_1percent_split.txt",
                    split_labels="nih_cxr14")
  assert from_split.class_names == from_csv.class_names
  assert from_split.index.paths == from_csv.index.paths  # bare names found below root
  np.testing.assert_array_equal(from_split.index.findings, from_csv.index.findings)
  np.testing.assert_array_equal(from_split.index.findings, labels)


def _tiny_png(tmp_path):
  path = tmp_path / "tiny.png"
  if not path.exists():
    stand_in(path, shape=(4, 4))
  return path


# ------------------------------------------------------------------ CheXpert
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
                   *radiographs.CHEXPERT_FINDINGS]


def chexpert_tree(parent):
  """CheXpert-v1.0-small/{train,valid}.csv + JPEGs. Rows: a normal PA, a lateral, an AP
  with an uncertain and a blank label."""
  release = parent / "CheXpert-v1.0-small"
  labels = [
      ["1.0"] + [""] * 12 + ["1.0"],                      # No Finding, Support Devices
      [""] * 10 + ["1.0"] + [""] * 3,                     # Pleural Effusion
      ["", "", "-1.0", "1.0", "0.0"] + [""] * 9,          # Cardiomegaly uncertain
  ]
  views = [("Frontal", "PA"), ("Lateral", ""), ("Frontal", "AP")]
  rows = []
  for i, (row, (fl, appa)) in enumerate(zip(labels, views)):
    path = f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1_{fl.lower()}.jpg"
    stand_in(parent / path, seed=i)
    rows.append([path, "Female", 60, fl, appa, *row])
  write_csv(release / "train.csv", CHEXPERT_HEADER, rows)
  write_csv(release / "valid.csv", CHEXPERT_HEADER, rows[:1])
  return release


def test_chexpert_paths_uncertain_policies_and_selection(tmp_path):
  release = chexpert_tree(tmp_path)
  cardio = radiographs.CHEXPERT_FINDINGS.index("Cardiomegaly")
  for policy, value, known in (("zeros", 0, True), ("ones", 1, True), ("ignore", 0, False)):
    source = make("chexpert", release, uncertain=policy)
    assert len(source) == 3 and not source.scan_failures  # Path relative to root's parent
    assert source.index.findings[2, cardio] == value
    assert source.index.known[2, cardio] == known
    assert source.index.known.sum() == 3 * 14 - (not known)
  findings = make("chexpert", release).index.findings
  assert findings[2].tolist() == [0, 0, 0, 1, 0] + [0] * 9  # blank and 0.0: negative
  normal = make("chexpert", release, selection="normal_frontal")
  assert [os.path.basename(p) for p in normal.index.paths] == ["view1_frontal.jpg"]
  assert len(make("chexpert", release, split="valid")) == 1


# ------------------------------------------------------------------ MIMIC-CXR-JPG
MIMIC_LABELS = sorted(radiographs.CHEXPERT_FINDINGS)  # the labellers' CSVs: alphabetical


def test_mimic_normal_frontal_split_and_labellers(tmp_path):
  root = tmp_path / "mimic-cxr-jpg"
  images = [  # dicom_id, subject, study, view, official split
      ("a1", "10000032", "50414267", "PA", "train"),
      ("a2", "10000032", "50414267", "LATERAL", "train"),
      ("b1", "11000011", "51000001", "AP", "train"),
      ("c1", "12000022", "52000002", "PA", "test"),
      ("d1", "13000033", "53000003", "PA", "train"),  # a study the labeller skipped
  ]
  for i, (dicom_id, subject, study, _, _) in enumerate(images):
    stand_in(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" /
             f"{dicom_id}.jpg", seed=i)
  write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
             "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
             "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"],
            [[d, s, st, "CHEST (PA AND LAT)", v, 24, 24, 21800506, 213014.531, "", "", ""]
             for d, s, st, v, _ in images])
  write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id",
                                                    "split"],
            [[d, st, s, sp] for d, s, st, _, sp in images])

  def label_row(subject, study, **values):
    return [subject, study, *(values.get(n.replace(" ", "_"), "") for n in MIMIC_LABELS)]
  label_header = ["subject_id", "study_id", *MIMIC_LABELS]
  write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", label_header,
            [label_row("10000032", "50414267", No_Finding="1.0"),
             label_row("11000011", "51000001", No_Finding="1.0", Edema="-1.0"),
             label_row("12000022", "52000002", No_Finding="1.0")])
  write_csv(root / "mimic-cxr-2.0.0-negbio.csv.gz", label_header,
            [label_row("10000032", "50414267", Edema="1.0"),
             label_row("11000011", "51000001", No_Finding="1.0"),
             label_row("12000022", "52000002", No_Finding="1.0")])

  def ids(source):
    return [os.path.basename(p)[:-4] for p in source.index.paths]
  assert ids(make("mimic_cxr_jpg", root)) == ["a1", "a2", "b1", "d1"]  # official train
  assert ids(make("mimic_cxr_jpg", root, split="test")) == ["c1"]
  assert ids(make("mimic_cxr_jpg", root, selection="normal_frontal")) == ["a1", "b1"]
  assert ids(make("mimic_cxr_jpg", root, selection="normal_frontal",
                  mimic_labels="negbio")) == ["b1"]
  source = make("mimic_cxr_jpg", root, uncertain="ignore")
  edema = radiographs.CHEXPERT_FINDINGS.index("Edema")
  assert not source.index.known[2, edema] and source.index.known[2].sum() == 13
  assert not source.index.known[3].any()  # no label row for d1's study
  assert source[0]["findings"][radiographs.CHEXPERT_FINDINGS.index("No Finding")] == 1


# ------------------------------------------------------------------ RSNA, folders, splits
def test_rsna_dicoms_with_several_boxes(tmp_path):
  root = tmp_path / "rsna"
  rows = [["p-pos", 8, 16, 16, 8, 1], ["p-neg", "", "", "", "", 0],
          ["p-pos", 40, 40, 8, 8, 1]]  # one row per box
  root.mkdir()
  write_csv(root / "stage_2_train_labels.csv",
            ["patientId", "x", "y", "width", "height", "Target"], rows)
  for i, patient in enumerate(("p-pos", "p-neg")):
    stand_in(root / "stage_2_train_images" / f"{patient}.dcm", seed=i, shape=(64, 64))
  source = make("rsna_pneumonia", root)
  positive, negative = source[0], source[1]
  assert positive["findings"].tolist() == [1] and negative["findings"].tolist() == [0]
  np.testing.assert_allclose(positive["boxes"], [[4, 8, 8, 4], [20, 20, 4, 4]])  # 64 -> 32
  assert positive["box_classes"].tolist() == [0, 0]
  assert negative["box_classes"].tolist() == [-1, -1]


def test_image_folder_is_recursive_and_split_list_resolves_paths(tmp_path):
  root = tmp_path / "export"
  for i, name in enumerate(("a/1.png", "a/b/2.jpg", "c/3.dcm", "c/4.DCM")):
    stand_in(root / name, seed=i)
  (root / "notes.txt").write_text("not an image")
  folder = make("image_folder", root)
  assert [os.path.relpath(p, root) for p in folder.index.paths] == \
      ["a/1.png", "a/b/2.jpg", "c/3.dcm", "c/4.DCM"]
  assert all(folder[i]["image"].shape == (SIZE, SIZE) for i in range(4))
  assert set(folder[0]) == {"image", "index"}
  (root / "split.txt").write_text("a/1.png 1 0\n2.jpg 0 1\n")
  split = make("split_list", root, split_file="split.txt")
  assert split.class_names == ("l0", "l1")
  assert [os.path.relpath(p, root) for p in split.index.paths] == ["a/1.png", "a/b/2.jpg"]
  assert split.index.findings.tolist() == [[1, 0], [0, 1]]
  with pytest.raises(ValueError, match="2 labels per line"):
    make("split_list", root, split_file="split.txt", split_labels="nih_cxr14")


def test_missing_roots_and_indexes_fail_at_start_up_naming_what_was_expected(tmp_path):
  expectations = {
      ("nih_cxr14", tmp_path / "nowhere"): "is not a folder",
      ("nih_cxr14", tmp_path): "Data_Entry_2017",
      ("chexpert", tmp_path): "train.csv",
      ("mimic_cxr_jpg", tmp_path): "mimic-cxr-2.0.0-metadata.csv",
      ("rsna_pneumonia", tmp_path): "stage_2_train_labels.csv",
      ("image_folder", tmp_path): "no image files",
      ("split_list", tmp_path): "split_file",
      ("nih_cxr14", ""): "set data.root",
  }
  for (name, root), message in expectations.items():
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      make(name, root)
  stand_in(tmp_path / "x.png")
  with pytest.raises(ValueError, match="set data.selection=all"):
    make("image_folder", tmp_path, selection="normal_frontal")


# ------------------------------------------------------------------ bad files
def corrupt_folder(root, good=14):
  """`good` readable PNGs and one file of each way to be unusable."""
  for i in range(good):
    stand_in(root / f"good{i:02d}.png", seed=i)
  (root / "bad_text.png").write_bytes(b"no image here" * 10)
  data = (root / "good00.png").read_bytes()
  (root / "bad_truncated.png").write_bytes(data[:len(data) // 2])
  cv2.imwrite(str(root / "bad_constant.png"), np.full((9, 9), 3, np.uint8))
  (root / "bad_dicom.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 50)
  return {str(root / n) for n in ("bad_text.png", "bad_truncated.png", "bad_constant.png",
                                  "bad_dicom.dcm")}


def test_training_pipeline_skips_counts_and_reports_corrupt_files(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  bad = corrupt_folder(tmp_path / "data")
  source = make("image_folder", tmp_path / "data")
  said = []
  guarded, report = bad_files.guard(source, str(workdir), 0.01, 0, said.append)
  assert not said  # every listed file exists: the start-up scan is clean
  host = (transforms.Greyscale(SIZE),
          transforms.SyntheticLesions(LesionConfig.for_image_size(SIZE), patch_size=8))
  # One Grain worker process: what it finds must reach the log the trainer reads.
  iterator = iter(pipeline.make_dataset(guarded, host, batch_size=6, seed=0, num_workers=1))
  batches = [next(iterator) for _ in range(6)]  # two passes over 18 files
  iterator.close()
  assert all(b["x_clean"].shape == (6, SIZE, SIZE) for b in batches)

  assert set(bad_files.BadFileLog(str(workdir)).entries("decode")) == bad
  lines = (workdir / "bad_files.tsv").read_text().splitlines()
  assert len(lines) == 4  # each bad file once, whatever the passes
  reasons = dict(line.split("\t")[:2] for line in lines)
  assert "constant image" in reasons[str(tmp_path / "data" / "bad_constant.png")]
  assert "corrupt or truncated" in reasons[str(tmp_path / "data" / "bad_truncated.png")]
  assert report.poll(said.append) == 4
  assert sum("Skipped an unusable file" in s for s in said) == 4
  assert any("Warning: 4 files failed to decode" in s for s in said)
  # A bad position gives the next readable one (the four bad files sort first).
  positions = {os.path.basename(p): i for i, p in enumerate(source.index.paths)}
  assert positions["bad_constant.png"] == 0 and positions["good00.png"] == 4
  assert guarded[0]["index"] == guarded[3]["index"] == 4


def test_start_up_scan_stops_a_run_with_too_many_missing_files(tmp_path):
  root = tmp_path / "data"
  for i in range(3):
    stand_in(root / f"{i}.png", seed=i)
  (root / "split.txt").write_text("".join(f"{i}.png 0\n" for i in range(5)))
  source = make("split_list", root, split_file="split.txt")
  assert len(source) == 3 and len(source.scan_failures) == 2
  with pytest.raises(bad_files.BadDataError, match=r"2 of the 5 files .*\(40\.00%\).*3\.png"):
    bad_files.guard(source, str(tmp_path), 0.01, 0, print)
  said = []
  bad_files.guard(source, str(tmp_path), 0.5, 0, said.append)
  assert "Skipping them: 2 of the 5" in said[0]
  assert set(bad_files.BadFileLog(str(tmp_path)).entries("scan")) == \
      {str(root / "3.png"), str(root / "4.png")}


def test_a_run_of_unreadable_files_is_a_systematic_error(tmp_path):
  root = tmp_path / "data"
  root.mkdir()
  for i in range(bad_files.MAX_CONSECUTIVE_BAD + 5):
    (root / f"{i:03d}.png").write_bytes(b"junk")
  guarded, _ = bad_files.guard(make("image_folder", root), str(tmp_path), 0.01, 0, print)
  with pytest.raises(bad_files.BadDataError, match="50 files in a row"):
    guarded[0]
