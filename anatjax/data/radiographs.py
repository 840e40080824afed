"""Chest-radiograph collections read from their native download layouts.

`data.source` names the collection, `data.root` the folder it was downloaded to. Each
reader parses the collection's own index files into an `ImageIndex` and returns an
`ImageSource` (items: see anatjax/data/image_source.py). A root that does not exist or
has no recognisable index fails at once, naming what was expected.

  source           reads under data.root
  nih_cxr14        Data_Entry_2017*.csv, images*/**.png, train_val_list.txt, test_list.txt,
                   BBox_List_2017*.csv (boxes)
  chexpert         train.csv / valid.csv (`Path` relative to root or to its parent)
  mimic_cxr_jpg    mimic-cxr-2.0.0-{metadata,chexpert|negbio,split}.csv[.gz],
                   files/pXX/p<subject>/s<study>/<dicom_id>.jpg
  rsna_pneumonia   stage_*_train_labels.csv (boxes), stage_*_train_images/<patientId>.dcm
  image_folder     every PNG/JPEG/DICOM below root, unlabelled
  split_list       data.split_file: `relative_path l0 ... lN` lines (1/10/100% splits)

Which rows: `split` ('pretrain'/'train' = the collection's training part, excluding the
official test list; 'valid'/'test'/'all' where the collection has them) and
`data.selection`: 'all', or 'normal_frontal' (No Finding and a PA/AP view: the normal
radiographs AFiRe pretrains on). Findings come in the fixed orders of `CLASS_NAMES`;
CheXpert-style uncertain labels (-1) follow `data.uncertain`: 'zeros', 'ones' or 'ignore'
(findings_known False). A blank CheXpert label (not mentioned) counts as negative.
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
import re

import numpy as np

from anatjax.data import decode
from anatjax.data.image_source import ImageIndex, ImageSource

# The 14 NIH findings in the order of the label-efficient split files (and most papers).
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                "Fibrosis", "Pleural_Thickening", "Hernia")
# CheXpert's 14 label columns in its CSV order; MIMIC-CXR-JPG's labellers emit the same
# names (alphabetically), read into this order so that both collections agree.
CHEXPERT_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
                     "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                     "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                     "Fracture", "Support Devices")
CLASS_NAMES = {
    "nih_cxr14": NIH_FINDINGS,
    "chexpert": CHEXPERT_FINDINGS,
    # The five CheXpert competition tasks, in the order of the CheXpert paper's tables.
    "chexpert_competition": ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                             "Pleural Effusion"),
    "rsna_pneumonia": ("Pneumonia",),
}
SELECTIONS = ("all", "normal_frontal")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
FRONTAL_VIEWS = ("PA", "AP")


# ------------------------------------------------------------------ the collections
def nih_cxr14(data_config, split: str) -> ImageSource:
  root = _root(data_config, "the NIH ChestX-ray14 download (Data_Entry_2017*.csv and "
               "images*/ folders of PNGs)")
  entry_csv = _newest(root, "Data_Entry_2017*.csv", "the image index Data_Entry_2017.csv")
  rows = _read_csv(entry_csv, ("Image Index", "Finding Labels", "View Position"))
  names = [r["Image Index"] for r in rows]
  labels = [r["Finding Labels"].split("|") for r in rows]
  findings = np.zeros((len(rows), len(NIH_FINDINGS)), np.uint8)
  for row, row_labels in enumerate(labels):
    for label in row_labels:
      if label != "No Finding":
        findings[row, _class_position(NIH_FINDINGS, label, f"{entry_csv} row {row + 2}")] = 1
  files = _files_by_name(os.path.join(root, "images*"))
  index = ImageIndex(
      paths=[files.get(n, os.path.join(root, "images", n)) for n in names],
      class_names=NIH_FINDINGS, findings=findings, known=np.ones_like(findings, bool),
      boxes=_nih_boxes(root, names))

  list_name = {"pretrain": "train_val_list.txt", "train": "train_val_list.txt",
               "test": "test_list.txt", "all": None}
  _check_split(split, list_name, "nih_cxr14")
  list_path = list_name[split] and os.path.join(root, list_name[split])
  if split == "test" and not os.path.exists(list_path):
    raise FileNotFoundError(f"nih_cxr14 split 'test' needs the official test_list.txt "
                            f"in data.root={root!r}")
  keep = np.ones(len(rows), bool)
  listed_by = "every image: no train_val_list.txt" if list_path else "every image"
  if list_path and os.path.exists(list_path):  # the official list keeps test images out
    listed = set(_read_lines(list_path))
    keep = np.array([n in listed for n in names])
    listed_by = list_name[split]
  if _selection(data_config, "nih_cxr14") == "normal_frontal":
    keep &= np.array([ls == ["No Finding"] and r["View Position"] in FRONTAL_VIEWS
                      for ls, r in zip(labels, rows)])
  return _source(index.take(keep), data_config,
                 f"nih_cxr14 {split} from {root} ({listed_by})")


def chexpert(data_config, split: str) -> ImageSource:
  root = _root(data_config, "the CheXpert download (train.csv, valid.csv and the "
               "train/ and valid/ image folders)")
  csv_name = {"pretrain": "train.csv", "train": "train.csv", "valid": "valid.csv"}
  _check_split(split, csv_name, "chexpert")
  index_csv = os.path.join(root, csv_name[split])
  if not os.path.exists(index_csv):
    raise FileNotFoundError(f"config data.source=chexpert: no {csv_name[split]} in "
                            f"data.root={root!r} (expected the CheXpert download).")
  rows = _read_csv(index_csv, ("Path", "Frontal/Lateral", *CHEXPERT_FINDINGS))
  findings, known = _uncertain_labels(rows, CHEXPERT_FINDINGS, data_config)
  index = ImageIndex(paths=[_chexpert_path(root, r["Path"]) for r in rows],
                     class_names=CHEXPERT_FINDINGS, findings=findings, known=known)
  keep = np.ones(len(rows), bool)
  if _selection(data_config, "chexpert") == "normal_frontal":
    keep = np.array([_is_positive(r["No Finding"]) and r["Frontal/Lateral"] == "Frontal"
                     for r in rows])
  return _source(index.take(keep), data_config, f"chexpert {split} from {root}")


def mimic_cxr_jpg(data_config, split: str) -> ImageSource:
  root = _root(data_config, "the MIMIC-CXR-JPG download (mimic-cxr-2.0.0-metadata.csv"
               "[.gz], a label CSV and files/)")
  labeler = data_config.mimic_labels
  if labeler not in ("chexpert", "negbio"):
    raise ValueError(f"config data.mimic_labels={labeler!r}: use 'chexpert' or 'negbio'")
  meta = _read_csv(_mimic_csv(root, "metadata", required=True),
                   ("dicom_id", "subject_id", "study_id", "ViewPosition"))
  label_rows = _read_csv(_mimic_csv(root, labeler, required=True),
                         ("subject_id", "study_id", *CHEXPERT_FINDINGS))
  study_findings, study_known = _uncertain_labels(label_rows, CHEXPERT_FINDINGS, data_config)
  study_row = {(r["subject_id"], r["study_id"]): i for i, r in enumerate(label_rows)}
  # Images of studies the labeller skipped get no known label.
  rows = [study_row.get((m["subject_id"], m["study_id"])) for m in meta]
  findings = np.stack([study_findings[r] if r is not None else
                       np.zeros(len(CHEXPERT_FINDINGS), np.uint8) for r in rows])
  known = np.stack([study_known[r] if r is not None else
                    np.zeros(len(CHEXPERT_FINDINGS), bool) for r in rows])
  paths = [os.path.join(root, "files", f"p{m['subject_id'][:2]}", f"p{m['subject_id']}",
                        f"s{m['study_id']}", f"{m['dicom_id']}.jpg") for m in meta]
  index = ImageIndex(paths=paths, class_names=CHEXPERT_FINDINGS, findings=findings,
                     known=known)

  split_name = {"pretrain": "train", "train": "train", "validate": "validate",
                "test": "test", "all": None}
  _check_split(split, split_name, "mimic_cxr_jpg")
  keep = np.ones(len(meta), bool)
  split_csv = _mimic_csv(root, "split", required=split in ("validate", "test"))
  if split_name[split] and split_csv:
    official = {r["dicom_id"]: r["split"] for r in _read_csv(split_csv, ("dicom_id", "split"))}
    keep = np.array([official.get(m["dicom_id"]) == split_name[split] for m in meta])
  if _selection(data_config, "mimic_cxr_jpg") == "normal_frontal":
    no_finding = CHEXPERT_FINDINGS.index("No Finding")
    keep &= (findings[:, no_finding] == 1) & known[:, no_finding]
    keep &= np.array([m["ViewPosition"] in FRONTAL_VIEWS for m in meta])
  return _source(index.take(keep), data_config, f"mimic_cxr_jpg {split} from {root} "
                 f"({labeler} labels)")


def rsna_pneumonia(data_config, split: str) -> ImageSource:
  del split  # one labelled listing: the label-efficient split files subdivide it
  root = _root(data_config, "the RSNA Pneumonia Detection download "
               "(stage_2_train_labels.csv and stage_2_train_images/)")
  labels_csv = _newest(root, "stage_*_train_labels.csv", "stage_2_train_labels.csv")
  _selection(data_config, "rsna_pneumonia", supports_normal_frontal=False)
  image_dir = labels_csv[:-len("_labels.csv")] + "_images"
  rows = _read_csv(labels_csv, ("patientId", "x", "y", "width", "height", "Target"))
  patients = list(dict.fromkeys(r["patientId"] for r in rows))  # first-seen order
  position = {p: i for i, p in enumerate(patients)}
  findings = np.zeros((len(patients), 1), np.uint8)
  boxes = [[] for _ in patients]
  for r in rows:  # one row per box; a negative image has one row with empty coordinates
    if r["Target"] == "1":
      findings[position[r["patientId"]], 0] = 1
      boxes[position[r["patientId"]]].append(
          [0, *(float(r[k]) for k in ("x", "y", "width", "height"))])
  index = ImageIndex(
      paths=[os.path.join(image_dir, f"{p}.dcm") for p in patients],
      class_names=CLASS_NAMES["rsna_pneumonia"], findings=findings,
      known=np.ones_like(findings, bool),
      boxes=[np.array(b, np.float32).reshape(-1, 5) for b in boxes])
  return _source(index, data_config, f"rsna_pneumonia from {root}")


def image_folder(data_config, split: str) -> ImageSource:
  del split  # a folder is one listing
  root = _root(data_config, "a folder of PNG, JPEG or DICOM images")
  _selection(data_config, "image_folder", supports_normal_frontal=False)
  paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root)
                 for name in names if decode.is_image_file(name))
  if not paths:
    raise FileNotFoundError(f"config data.source=image_folder: no image files "
                            f"({', '.join(decode.IMAGE_SUFFIXES)}) below data.root={root!r}")
  return _source(ImageIndex(paths=paths), data_config, f"image_folder {root}")


def split_list(data_config, split: str) -> ImageSource:
  """`data.split_file` (relative to data.root unless absolute) lists `relative_path l0
  ... lN`; paths are looked up under data.root, and bare file names (the NIH split
  files) anywhere below it. `data.split_labels` names the label order (CLASS_NAMES)."""
  del split  # the file is the split
  root = _root(data_config, "the image folder the split file's paths are relative to")
  _selection(data_config, "split_list", supports_normal_frontal=False)
  if not data_config.split_file:
    raise ValueError("config data.source=split_list needs data.split_file=<file of "
                     "'relative_path l0 ... lN' lines>")
  list_path = os.path.join(root, data_config.split_file)
  if not os.path.exists(list_path):
    raise FileNotFoundError(f"config data.split_file={data_config.split_file!r}: no such "
                            f"file (looked for {list_path})")
  names, labels = read_split_file(list_path)
  class_names = _split_class_names(data_config.split_labels, labels.shape[1], list_path)
  by_name = None  # walked only when some entry is not a path relative to root

  def resolve(name):
    nonlocal by_name
    path = os.path.join(root, name)
    if os.path.exists(path):
      return path
    by_name = by_name if by_name is not None else _files_by_name(root)
    return by_name.get(os.path.basename(name), path)

  findings = labels.astype(np.uint8)
  index = ImageIndex(paths=[resolve(n) for n in names], class_names=class_names,
                     findings=findings, known=np.ones_like(findings, bool))
  return _source(index, data_config, f"split_list {list_path}")


def read_split_file(path: str, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
  """(names, int labels [N, C]) of a `relative_path l0 ... lN` split file (the format of
  the label-efficient literature's 1 / 10 / 100 % lists); `num_classes` checks C."""
  names, rows = [], []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      try:
        values = [int(float(v)) for v in parts[1:]]
      except ValueError as e:
        raise ValueError(f"{path}:{line_no}: labels must be numbers: {line.strip()!r}") from e
      if num_classes is not None and len(values) != num_classes:
        raise ValueError(f"{path}:{line_no}: {len(values)} labels, expected {num_classes}")
      names.append(parts[0])
      rows.append(values)
  if rows and len({len(r) for r in rows}) != 1:
    raise ValueError(f"{path}: lines have different numbers of labels")
  return names, np.asarray(rows, np.int64).reshape(len(rows), -1)


def patient_id(path: str) -> str:
  """Who an image belongs to, from its path in the collection's own layout: NIH names
  `<patient>_<follow-up>.png`, CheXpert folders `patient<N>`, MIMIC folders `p<subject>`;
  anything else (RSNA: one image per patient) is its own patient (the file name). Used to
  carve evaluation splits without putting one patient on both sides."""
  name = os.path.basename(path)
  nih = re.fullmatch(r"(\d{8})_\d{3}\.png", name)
  if nih:
    return "nih:" + nih.group(1)
  for part in reversed(os.path.normpath(path).split(os.sep)[:-1]):
    if re.fullmatch(r"patient\d+|p\d{8}", part):
      return part
  return os.path.splitext(name)[0]


READERS = {"nih_cxr14": nih_cxr14, "chexpert": chexpert, "mimic_cxr_jpg": mimic_cxr_jpg,
           "rsna_pneumonia": rsna_pneumonia, "image_folder": image_folder,
           "split_list": split_list}


# ------------------------------------------------------------------ shared helpers
def _source(index: ImageIndex, data_config, description: str) -> ImageSource:
  if not len(index):
    raise ValueError(f"{description}: no images are selected (data.selection="
                     f"{data_config.selection!r}); check the split and the selection.")
  return ImageSource(index, decode.DecodeOptions.from_config(data_config), description)


def _root(data_config, expected: str) -> str:
  root = data_config.root
  if not root:
    raise ValueError(f"config data.source={data_config.source} reads files: set "
                     f"data.root to {expected}.")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config data.root={root!r} is not a folder; expected {expected}.")
  return root


def _newest(root: str, pattern: str, expected: str) -> str:
  """The last (by name: the newest release) file matching `pattern` in root."""
  matches = sorted(glob.glob(os.path.join(root, pattern)))
  if not matches:
    raise FileNotFoundError(f"No {pattern} in data.root={root!r}: expected {expected}.")
  return matches[-1]


def _mimic_csv(root: str, kind: str, required: bool) -> str | None:
  for name in (f"mimic-cxr-2.0.0-{kind}.csv", f"mimic-cxr-2.0.0-{kind}.csv.gz"):
    if os.path.exists(os.path.join(root, name)):
      return os.path.join(root, name)
  if required:
    raise FileNotFoundError(f"No mimic-cxr-2.0.0-{kind}.csv[.gz] in data.root={root!r} "
                            "(expected the MIMIC-CXR-JPG download).")
  return None


def _read_csv(path: str, columns) -> list[dict[str, str]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
    return list(reader)


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _files_by_name(pattern: str) -> dict[str, str]:
  """file name -> path for every file below the folders matching `pattern`."""
  found = {}
  for top in sorted(glob.glob(pattern)):
    for folder, _, names in os.walk(top):
      for name in names:
        found.setdefault(name, os.path.join(folder, name))
  return found


def _nih_boxes(root: str, names: list[str]) -> list[np.ndarray] | None:
  """Per image [k, 5] (class, x, y, w, h) from BBox_List_2017*.csv, if downloaded."""
  matches = sorted(glob.glob(os.path.join(root, "BBox_List_2017*.csv")))
  if not matches:
    return None
  per_name = {}
  with open(matches[-1], newline="") as f:
    # The header is `Image Index,Finding Label,Bbox [x,y,w,h],,,`: its commas split the
    # box column's title and leave empty titles, so read columns by position.
    for line_no, row in enumerate(csv.reader(f), 1):
      if line_no == 1 or not row:
        continue
      label = "Infiltration" if row[1] == "Infiltrate" else row[1]  # the box list's spelling
      cls = _class_position(NIH_FINDINGS, label, f"{matches[-1]} line {line_no}")
      per_name.setdefault(row[0], []).append([cls, *map(float, row[2:6])])
  return [np.array(per_name.get(n, []), np.float32).reshape(-1, 5) for n in names]


def _chexpert_path(root: str, path: str) -> str:
  # Paths start with the release folder (CheXpert-v1.0[-small]/train/...): relative to the
  # parent of root when root is that folder, relative to root when root contains it.
  head, _, rest = path.partition("/")
  inside = os.path.isdir(os.path.join(root, head))
  return os.path.join(root, path if inside or not rest else rest)


def _uncertain_labels(rows, columns, data_config) -> tuple[np.ndarray, np.ndarray]:
  """CheXpert-style 1 / 0 / -1 / blank label columns -> (findings uint8, known bool)."""
  policy = data_config.uncertain
  if policy not in UNCERTAIN_POLICIES:
    raise ValueError(f"config data.uncertain={policy!r}: use one of {UNCERTAIN_POLICIES}")
  raw = np.array([[float(r[c]) if r[c].strip() else 0.0 for c in columns] for r in rows],
                 np.float32).reshape(len(rows), len(columns))
  uncertain = raw == -1
  findings = np.where(uncertain, 1 if policy == "ones" else 0, raw == 1).astype(np.uint8)
  known = ~uncertain if policy == "ignore" else np.ones_like(uncertain)
  return findings, known


def _is_positive(value: str) -> bool:
  return value.strip() != "" and float(value) == 1


def _class_position(class_names, label: str, where: str) -> int:
  if label not in class_names:
    raise ValueError(f"{where}: unknown finding {label!r}; known: {class_names}")
  return class_names.index(label)


def _split_class_names(name: str, count: int, path: str) -> tuple[str, ...]:
  if not name:
    return tuple(f"l{i}" for i in range(count))
  if name not in CLASS_NAMES:
    raise ValueError(f"config data.split_labels={name!r}: use '' (unnamed) or one of "
                     f"{sorted(CLASS_NAMES)}")
  if len(CLASS_NAMES[name]) != count:
    raise ValueError(f"{path}: {count} labels per line, but data.split_labels={name!r} "
                     f"has {len(CLASS_NAMES[name])}")
  return CLASS_NAMES[name]


def _selection(data_config, source: str, supports_normal_frontal: bool = True) -> str:
  selection = data_config.selection
  if selection not in SELECTIONS:
    raise ValueError(f"config data.selection={selection!r}: use one of {SELECTIONS}")
  if selection == "normal_frontal" and not supports_normal_frontal:
    raise ValueError(f"config data.source={source} has no findings and views to select "
                     "normal frontal images by: set data.selection=all.")
  return selection


def _check_split(split: str, known, source: str) -> None:
  if split not in known:
    raise ValueError(f"{source} has no split {split!r}; it has {sorted(known)}")
