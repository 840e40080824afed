"""Evaluation splits of a real radiograph collection (data.source one of the labelled
readers of anatjax/data/radiographs.py), for the finding protocols.

Where each of train / val / test comes from, first match wins:
  1. data.split_files.<split>: a `relative_path l0 ... lN` file (relative to data.root
     unless absolute), read with its own labels in the collection's class order, so
     the label-efficient literature's split files are used as published;
  2. the collection's own split (OFFICIAL), e.g. NIH's test_list.txt or MIMIC's
     validate/test, or CheXpert's radiologist-labelled valid.csv as the test set;
  3. carved from the train listing by patient (radiographs.patient_id): data.val_fraction
     (and data.test_fraction where the collection has no test split) of the patients,
     drawn with data.split_seed, so no patient is on two sides.
data.num_<split> > 0 keeps a seeded random subset of that many images (quick CPU runs),
0 keeps them all. data.classes picks the finding columns: '' = all of the collection's,
a CLASS_NAMES key (e.g. 'chexpert_competition'), or comma-separated names.

Images are decoded with the data block's options (decode.py) at the evaluation size, on
data.num_workers threads. Files missing at start-up or failing to decode are left out,
listed in WORKDIR/bad_files.tsv and in the results' notes; more than
data.max_bad_fraction of a split stops the evaluation before any result is written.
Boxes (NIH BBox_List_2017.csv, RSNA) become one enclosing box per image and finding,
scored by the localisation protocol as box masks; the anatomy protocols need anatomy
label maps, which only the synthetic data has.

data.cache_dir: each decoded split is kept there as an .npz named by a hash of
everything that decides its contents (file paths, sizes and times, labels, boxes,
decoding options, size), so the next protocol or encoder loads it in seconds.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import ml_collections
import numpy as np

from anatjax.data import bad_files, decode, radiographs

# Eval split -> the collection's own split it is read from; absent: carved from train.
OFFICIAL = {
    "nih_cxr14": {"train": "train", "test": "test"},
    "chexpert": {"train": "train", "test": "valid"},
    "mimic_cxr_jpg": {"train": "train", "val": "validate", "test": "test"},
    "rsna_pneumonia": {"train": "all"},
    "split_list": {},
}
CACHE_VERSION = 1


def load(data_config, image_size: int, names, workdir: str | None, log=print) -> dict:
  """{split name: Split} of the collection `data_config.source` at `image_size` px."""
  from anatjax.evaluate.data import Split  # pylint: disable=g-import-not-at-top (cycle)
  config = _with_size(data_config, image_size)
  bad_log = bad_files.BadFileLog(workdir) if workdir else None
  listings, notes = _listings(config, names, bad_log)
  classes = class_columns(config, next(iter(listings.values()))[0].class_names)
  splits = {}
  for name in names:
    source, positions, origin = listings[name]
    positions = _subsample(positions, config[f"num_{name}"], config.split_seed, name)
    arrays, dropped = _cached(config, source, positions, classes, log, name)
    split_notes = list(notes) if name == names[0] else []
    split_notes += check_failures(dropped, len(positions), f"the {name} split ({origin}): "
                                  "decoding", config.max_bad_fraction, bad_log)
    if not len(arrays["images"]):
      raise ValueError(f"the {name} split ({origin}) has no usable image")
    log(f"  {name}: {len(arrays['images'])} images from {origin}")
    splits[name] = Split(
        name=name, names=[str(n) for n in arrays["names"]], class_names=tuple(classes[1]),
        images=arrays["images"], findings=arrays["findings"], boxes=arrays["boxes"],
        located=arrays["located"], origin=origin, notes=split_notes)
  return splits


def class_columns(data_config, available) -> tuple[list[int], list[str]]:
  """(column positions, names) of data.classes among the collection's `available`."""
  wanted = data_config.classes
  if not wanted:
    names = list(available)
  elif wanted in radiographs.CLASS_NAMES:
    names = list(radiographs.CLASS_NAMES[wanted])
  else:
    names = [n.strip() for n in wanted.split(",") if n.strip()]
  missing = [n for n in names if n not in available]
  if missing:
    raise ValueError(f"config data.classes={wanted!r}: {missing} are not findings of "
                     f"data.source={data_config.source}; it has {list(available)}")
  return [list(available).index(n) for n in names], names


# ------------------------------------------------------------------ where splits come from
def _listings(config, names, bad_log) -> tuple[dict, list[str]]:
  """({split: (ImageSource, positions into it, where from)} before subsampling, notes on
  listed files that are missing)."""
  if config.source not in OFFICIAL:
    raise ValueError(f"config data.source={config.source!r}: evaluation reads labelled "
                     f"collections: synthetic_cxr or one of {sorted(OFFICIAL)}")
  if config.uncertain == "ignore":
    raise ValueError("config data.uncertain='ignore': the evaluation's losses and AUROCs "
                     "need every label; use 'zeros' or 'ones'")
  official = OFFICIAL[config.source]
  listings = {}
  for name in ("train", "val", "test"):
    if config.split_files[name]:
      listings[name] = _from_split_file(config, config.split_files[name])
    elif name in official:
      source = radiographs.READERS[config.source](config, official[name])
      listings[name] = (source, np.arange(len(source)), source.description)
  if "train" not in listings:
    raise ValueError(f"config data.source={config.source}: name the training images "
                     "with data.split_files.train")
  carved = [n for n in ("val", "test") if n not in listings]
  if carved:
    train_source, _, origin = listings["train"]
    parts = carve_by_patient(train_source.index.paths,
                             {n: config[f"{n}_fraction"] for n in carved},
                             config.split_seed)
    for name, positions in parts.items():
      how = (f"{origin}" if name == "train" else
             f"{config[f'{name}_fraction']:g} of the patients of {origin}")
      listings[name] = (train_source, positions, how if name == "train" else
                        f"{how} (carved by patient, data.split_seed={config.split_seed})")
  for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
    shared = ({listings[a][0].index.paths[p] for p in listings[a][1]} &
              {listings[b][0].index.paths[p] for p in listings[b][1]})
    if shared:
      raise ValueError(f"{len(shared)} images are in both the {a} and the {b} split, e.g. "
                       f"{sorted(shared)[0]}: check data.split_files")
  notes, checked = [], set()
  for source, _, origin in listings.values():
    if id(source) not in checked:
      checked.add(id(source))
      notes += check_failures(source.scan_failures, source.num_listed, f"{origin}: listed",
                              config.max_bad_fraction, bad_log)
  return {n: listings[n] for n in names}, notes


def _from_split_file(config, split_file: str):
  file_config = ml_collections.ConfigDict(config.to_dict())
  file_config.split_file = split_file
  file_config.split_labels = (config.source if config.source in radiographs.CLASS_NAMES
                              else config.split_labels)
  source = radiographs.split_list(file_config, "file")
  return source, np.arange(len(source)), source.description


def carve_by_patient(paths, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
  """{'train': ..., **{name: ...}}: sorted positions of `paths`, each named part holding
  round(fraction x patients) whole patients, drawn in a seeded order; train the rest."""
  patients = [radiographs.patient_id(p) for p in paths]
  unique = sorted(set(patients))
  order = np.random.default_rng([seed, 0xCA12E]).permutation(len(unique))
  owner, start = {}, 0
  for name, fraction in fractions.items():
    if not 0.0 < fraction < 1.0:
      raise ValueError(f"config data.{name}_fraction={fraction}: carving the {name} split "
                       "from the train listing needs a fraction in (0, 1)")
    count = max(1, int(round(fraction * len(unique))))
    for k in order[start:start + count]:
      owner[unique[k]] = name
    start += count
  if start >= len(unique):
    raise ValueError(f"carving {sorted(fractions)} from {len(unique)} patients leaves no "
                     "patient for training: lower the fractions or give split files")
  parts = {name: [] for name in ("train", *fractions)}
  for position, patient in enumerate(patients):
    parts[owner.get(patient, "train")].append(position)
  return {name: np.asarray(p, np.int64) for name, p in parts.items()}


def _subsample(positions: np.ndarray, count: int, seed: int, name: str) -> np.ndarray:
  if count <= 0 or count >= len(positions):
    return positions
  rng = np.random.default_rng([seed, 0x5AB5, len(name)])
  return np.sort(rng.choice(positions, size=count, replace=False))


# ------------------------------------------------------------------ decoding and caching
def _cached(config, source, positions, classes, log, name):
  """(arrays, dropped [(path, reason)]) of the items at `positions`, decoded or cached."""
  path = None
  if config.cache_dir:
    path = os.path.join(config.cache_dir, f"{config.source}_{name}_{config.image_size}px_"
                        f"{_content_key(config, source, positions, classes)}.npz")
    if os.path.exists(path):
      with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files if k != "dropped"}
        dropped = [tuple(d) for d in json.loads(str(stored["dropped"]))]
      log(f"  {name}: decoded images read from the cache {path}")
      return arrays, dropped
  arrays, dropped = decode_split(source, positions, classes, config, log, name)
  if path:
    os.makedirs(config.cache_dir, exist_ok=True)
    temporary = path + ".partial.npz"
    np.savez(temporary, **arrays, dropped=np.array(json.dumps(dropped)))
    os.replace(temporary, path)   # a cache file is complete or absent
  return arrays, dropped


def _content_key(config, source, positions, classes) -> str:
  index = source.index
  digest = hashlib.sha256()
  digest.update(json.dumps([CACHE_VERSION, config.image_size, config.intensity,
                            list(config.percentiles), config.geometry, classes[1]]).encode())
  for p in positions:
    stat = os.stat(index.paths[p])
    digest.update(f"{index.paths[p]}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
  digest.update(np.ascontiguousarray(index.findings[positions]).tobytes())
  for p in positions if index.boxes is not None else ():
    digest.update(np.ascontiguousarray(index.boxes[p]).tobytes())
  return digest.hexdigest()[:16]


def decode_split(source, positions, classes, config, log, name: str):
  """Decodes the items at `positions` on data.num_workers threads (OpenCV and NumPy
  release the GIL); names are paths relative to data.root."""
  columns, class_names = classes
  column_of = {c: j for j, c in enumerate(columns)}
  paths = source.index.paths

  def read(position):
    try:
      return source[int(position)], None
    except decode.BadImageError as e:
      return None, (e.path, e.reason)

  items, dropped, kept = [], [], []
  every = max(1, len(positions) // 10)
  threads = max(1, config.num_workers or os.cpu_count())
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for k, (position, (item, failure)) in enumerate(zip(positions,
                                                        pool.map(read, positions)), 1):
      if failure:
        dropped.append(failure)
      else:
        items.append(item)
        kept.append(position)
      if len(positions) >= 1000 and k % every == 0:
        log(f"  {name}: decoded {k}/{len(positions)}")
  size = source.options.size
  n, c = len(items), len(columns)
  boxes = np.zeros((n, c, 4), np.float32)
  located = np.zeros((n, c), bool)
  for i, item in enumerate(items):
    for box, cls in zip(item.get("boxes", ()), item.get("box_classes", ())):
      if int(cls) in column_of:
        j = column_of[int(cls)]
        boxes[i, j] = enclose(boxes[i, j], box) if located[i, j] else box
        located[i, j] = True
  return {
      "images": (np.stack([it["image"] for it in items]) if items
                 else np.zeros((0, size, size), np.uint8)),
      "findings": (np.stack([it["findings"][columns] for it in items]) if items
                   else np.zeros((0, c), np.uint8)),
      "boxes": boxes, "located": located,
      "names": np.array([os.path.relpath(paths[p], config.root) for p in kept]),
  }, dropped


def enclose(a, b) -> np.ndarray:
  """The (x, y, w, h) box around boxes a and b."""
  x0, y0 = min(a[0], b[0]), min(a[1], b[1])
  x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
  return np.array([x0, y0, x1 - x0, y1 - y0], np.float32)


def check_failures(failures, total: int, what: str, max_fraction: float,
                   bad_log) -> list[str]:
  """A note on unusable files [(path, reason)] (also recorded in WORKDIR/bad_files.tsv);
  raises over data.max_bad_fraction of `total`."""
  if not failures:
    return []
  for path, reason in failures if bad_log is not None else ():
    bad_log.record(path, reason, "eval")
  fraction = len(failures) / max(1, total)
  examples = "; ".join(f"{p}: {r}" for p, r in failures[:3])
  text = (f"{what}: {len(failures)} of {total} files unusable ({fraction:.2%}) and left "
          f"out, e.g. {examples}" + (f"; all in {bad_log.path}" if bad_log else ""))
  if fraction > max_fraction:
    raise ValueError(f"{text}. That is more than data.max_bad_fraction={max_fraction:g}: "
                     "check data.root and the download, or raise the limit.")
  return [text]


def _with_size(data_config, image_size: int):
  config = ml_collections.ConfigDict(data_config.to_dict())
  config.image_size = int(image_size)
  return config
