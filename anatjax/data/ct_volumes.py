r"""CT volumes -> Alice's volume store (alice.md 2.1, 2.3), and the source of volume pairs.

  python -m anatjax.data.ct_volumes --volumes=/data/flare22 --out=/data/flare_store \
      --workers=16            # NIfTI files and DICOM series found below the folder

Steps, each subject independent (`--workers` processes), each cached in out/work so an
interrupted preparation continues:
1. read the CT (anatjax/data/ct_readers.py, or the synthetic_ct phantom), resample to
   `spacing_mm` (z, y, x; linear, the spec's 1.5 x 1.5 x 2 mm by default), int16 HU
   clipped to [-1024, 3071]; its body mask (HU > -500, largest component, holes filled);
2. the atlas: `--atlas=ID`, or the subject with the median body volume;
3. provider (b)'s offline work: each CT registered affinely to the atlas
   (anatjax/data/correspondence.AffineProvider), the map atlas point -> subject point kept.
The store:
  volumes/NNNNN_image.npy   int16 HU (z, y, x), memory-mapped in training
  volumes/NNNNN_body.npy    bool body mask on the same grid
  subjects.json             per subject: id, spacing, origin, affine map (matrix, offset)
  store.json                the options; written last, so its presence means complete.
Training prepares a missing store itself (`data.source=ct_volumes`; data.root or a cache
folder keyed by these options) with one process.

Provider (a) (alice.provider=embedding) needs each volume's embedding fields, computed
once per (store, anatomy_embedding run) by that run's network, here in the main process
and never in Grain workers (`ensure_fields`, or beforehand with
`python -m anatjax.data.ct_volumes --out=STORE --embedding_run=RUN`):
  fields/<hash of the run's path and step>/NNNNN_{fine,coarse}.npy  float16 unit vectors
  .../NNNNN_norm.npy        float32 |coarse field upsampled to the fine cells|
  .../fields.json           the run, its step, the grid; written last (complete).

`VolumePairs` is the training source (spec 2.5): an epoch is a pass over the shuffled
subject list cut into blocks of B (one global batch); volume i of a block is paired with
volume (i + 1) mod B of the same block, another patient, so every loaded volume serves once
as A and once as B. Items are the two volumes' provider (b) caches and their rows; the host
transform `FieldCaches` swaps them for provider (a)'s, and
`anatjax.data.alice_pairs.MinePairs` turns them into crops.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time

import grain
import numpy as np

from anatjax.data import atlas as atlas_lib, correspondence, ct_prepare, registration
from anatjax.data.volume import Volume, resample

STORE_FILE = "store.json"
SUBJECTS_FILE = "subjects.json"
FIELDS_FILE = "fields.json"
# The stream is a lazily indexed range this many epochs long: longer than any run.
MAX_EPOCHS = 10 ** 6
# The data-config keys that decide a store's content (a different value = another store).
OPTION_KEYS = ("volumes", "num_examples", "source_seed", "synthetic_size", "spacing_mm",
               "atlas", "registration_iterations")


@dataclasses.dataclass(frozen=True)
class Options(ct_prepare.StoreOptions):
  volumes: str = "synthetic_ct"   # 'synthetic_ct' or a folder of NIfTI files / DICOM series
  num_examples: int = 64          # synthetic subjects
  source_seed: int = 0
  synthetic_size: int = 128       # the phantom's grid (voxels per axis) before resampling
  spacing_mm: tuple = (2.0, 1.5, 1.5)   # (z, y, x)
  atlas: str = ""                 # subject id; '' = the median body volume
  registration_iterations: int = 300

  @classmethod
  def from_config(cls, data_config) -> "Options":
    values = {k: data_config[k] for k in OPTION_KEYS}
    values["spacing_mm"] = tuple(float(s) for s in np.broadcast_to(values["spacing_mm"], 3))
    return cls(**values)


def volume_path(root: str, row: int, kind: str) -> str:
  return os.path.join(root, "volumes", f"{row:05d}_{kind}.npy")


def is_complete(root: str) -> bool:
  return os.path.isfile(os.path.join(root, STORE_FILE))


def read_options(root: str) -> dict:
  with open(os.path.join(root, STORE_FILE)) as f:
    return json.load(f)


# ---------------------------------------------------------------------------- preparing

def _geometry_path(out: str, subject_id: str) -> str:
  return ct_prepare.cache_path(os.path.join(out, "work"), "geometry", subject_id)


def subject_volume(options: Options, out: str, row: int, subject_id: str) -> float:
  """Step 1 for one subject (skipped when done): the resampled CT and its body mask in
  the store; returns the body volume in mL."""
  geometry_path = _geometry_path(out, subject_id)
  if not os.path.exists(geometry_path):
    image = resample(ct_prepare.read_subject(options, subject_id), options.spacing_mm,
                     order=1)
    image = image.with_array(np.clip(image.array, *ct_prepare.HU_RANGE).astype(np.int16))
    body = correspondence.body_mask(image).array
    np.save(volume_path(out, row, "image"), image.array)
    np.save(volume_path(out, row, "body"), body)
    tmp = geometry_path + ".tmp.npz"
    np.savez(tmp, spacing=image.spacing, origin=image.origin,
             body_ml=body.sum() * np.prod(image.spacing) / 1000.0)
    os.replace(tmp, geometry_path)
  with np.load(geometry_path) as f:
    return float(f["body_ml"])


def load_volume(out: str, row: int, geometry: dict, mmap: bool = True) -> tuple:
  """(image Volume, body mask) of a stored subject; memory-mapped unless mmap=False."""
  mode = "r" if mmap else None
  image = np.load(volume_path(out, row, "image"), mmap_mode=mode)
  body = np.load(volume_path(out, row, "body"), mmap_mode=mode)
  return Volume(image, geometry["spacing"], geometry["origin"]), body


def _geometry(out: str, subject_id: str) -> dict:
  with np.load(_geometry_path(out, subject_id)) as f:
    return {"spacing": f["spacing"].tolist(), "origin": f["origin"].tolist()}


def subject_registration(provider: correspondence.AffineProvider, out: str, atlas_row: int,
                         row: int, subject_id: str) -> dict:
  """Step 3 for one subject (cached): its map atlas point -> subject point. `provider`
  holds the atlas, prepared once for all subjects."""
  path = ct_prepare.cache_path(os.path.join(out, "work"), f"transforms_{atlas_row:05d}",
                               subject_id)
  if not os.path.exists(path):
    if row == atlas_row:
      point_map = registration.PointMap(np.eye(3), np.zeros(3))
    else:
      image, _ = load_volume(out, row, _geometry(out, subject_id), mmap=False)
      point_map = provider.register(image)
    tmp = path + ".tmp.npz"
    np.savez(tmp, matrix=point_map.matrix, offset=point_map.offset)
    os.replace(tmp, path)
  with np.load(path) as f:
    return {"matrix": f["matrix"].tolist(), "offset": f["offset"].tolist()}


def prepare(options: Options, out: str, workers: int = 0, say=print) -> str:
  """Writes the volume store for `options` into `out` (module doc); returns out."""
  start = time.time()
  for folder in ("volumes", "work"):   # work/ marks an unfinished store (resumable)
    os.makedirs(os.path.join(out, folder), exist_ok=True)
  ids = ct_prepare.subject_ids(options)
  run = ct_prepare.runner(workers)
  say(f"Preparing a volume store in {out}: {len(ids)} subjects from {options.volumes} at "
      f"{options.spacing_mm} mm (z, y, x)")
  body_ml = list(run(subject_volume, [(options, out, r, i) for r, i in enumerate(ids)]))
  if options.atlas:
    if options.atlas not in ids:
      raise ValueError(f"config data.atlas={options.atlas!r} is not one of the subjects "
                       f"(e.g. {ids[:3]})")
    atlas_row = ids.index(options.atlas)
  else:
    atlas_row = atlas_lib.choose_atlas(body_ml)
  say(f"Atlas {ids[atlas_row]} (body {body_ml[atlas_row]:.0f} mL; cohort median "
      f"{np.median(body_ml):.0f} mL); registering every subject to it")
  atlas, _ = load_volume(out, atlas_row, _geometry(out, ids[atlas_row]), mmap=False)
  provider = correspondence.AffineProvider(atlas, iterations=options.registration_iterations)
  maps = run(subject_registration, [(provider, out, atlas_row, r, i)
                                    for r, i in enumerate(ids)])
  subjects = [{"id": i, **_geometry(out, i), **m} for i, m in zip(ids, maps)]
  with open(os.path.join(out, SUBJECTS_FILE), "w") as f:
    json.dump(subjects, f)
  with open(os.path.join(out, STORE_FILE), "w") as f:
    json.dump({"options": options.to_dict(), "atlas": ids[atlas_row],
               "num_subjects": len(ids)}, f, indent=1)
  shutil.rmtree(os.path.join(out, "work"), ignore_errors=True)
  say(f"Wrote {len(ids)} volumes to {out} in {time.time() - start:.0f} s")
  return out


def store_root(data_config) -> str:
  """The volume store's folder: data.root, or a cache folder named by the options."""
  if data_config.root:
    return data_config.root
  options = Options.from_config(data_config)
  return ct_prepare.cache_root("ct_volumes", options.volumes, options.to_dict())


def ensure_store(data_config, say=print) -> str:
  """The volume store of `data_config`, prepared now if it is not complete."""
  options = Options.from_config(data_config)
  root = store_root(data_config)
  return ct_prepare.ensure_complete(root, options.to_dict(), is_complete, read_options,
                                    lambda: prepare(options, root, say=say), "volume", say)


# ---------------------------------------------------------------------------- fields

def fields_path(folder: str, row: int, kind: str) -> str:
  return os.path.join(folder, f"{row:05d}_{kind}.npy")


def ensure_fields(root: str, run_dir: str, say=print) -> str:
  """The folder of provider (a)'s fields of every volume of the complete store `root`,
  made by the newest checkpoint of the anatomy_embedding run `run_dir`; computed now (in
  this process: the network runs in JAX) unless a complete folder for that run and step
  exists. A folder without its fields.json (interrupted) or recording another run, step
  or store (its store.json: a store prepared again in place) is deleted and computed
  again, never mixed with new fields."""
  from anatjax.methods import anatomy_embedding  # pylint: disable=g-import-not-at-top
  if not is_complete(root):
    raise FileNotFoundError(f"{root} is not a complete volume store (no {STORE_FILE}): "
                            "prepare it first (python -m anatjax.data.ct_volumes --out=...)")
  run_dir = os.path.abspath(run_dir)
  step = anatomy_embedding.newest_step(run_dir)
  with open(os.path.join(root, SUBJECTS_FILE)) as f:
    subjects = json.load(f)
  count = len(subjects)
  made_by = {"run": run_dir, "step": step, "store": read_options(root)}
  digest = hashlib.sha256(json.dumps([run_dir, step]).encode()).hexdigest()[:12]
  folder = os.path.join(root, "fields", digest)
  marker = os.path.join(folder, FIELDS_FILE)
  if os.path.isfile(marker):
    with open(marker) as f:
      saved = json.load(f)
    if {k: saved.get(k) for k in made_by} == made_by:
      return folder
  if os.path.isdir(folder):
    say(f"{folder} holds partial or stale fields: computing them again")
    shutil.rmtree(folder)
  start = time.time()
  say(f"Computing the embedding fields of {count} volumes with {run_dir} (step {step}) "
      f"into {folder} (once)")
  provider, _ = anatomy_embedding.load_provider(run_dir, step)
  os.makedirs(folder)
  for row, subject in enumerate(subjects):
    image, _ = load_volume(root, row, subject, mmap=False)
    cache = provider.prepare(image)
    for kind, array in (("fine", cache.fine), ("coarse", cache.coarse),
                        ("norm", cache.coarse_norm)):
      np.save(fields_path(folder, row, kind), array)
  with open(marker + ".tmp", "w") as f:
    json.dump({**made_by, "spacing": list(provider.spacing),
               "fine_stride": provider.fine_stride,
               "coarse_stride": provider.coarse_stride}, f, indent=1)
  os.replace(marker + ".tmp", marker)
  say(f"Wrote the fields of {count} volumes in {time.time() - start:.0f} s")
  return folder


class FieldCaches(grain.transforms.Map):
  """Host transform: a `VolumePairs` item -> {"a", "b"} provider (a) caches
  (correspondence.EmbeddingCache, the CTs and fields memory-mapped) of the same two
  volumes, from a complete `ensure_fields` folder. Only reads: the fields exist before the
  workers start. `matcher()` matches them."""

  def __init__(self, folder: str):
    marker = os.path.join(folder, FIELDS_FILE)
    if not os.path.isfile(marker):
      raise FileNotFoundError(f"{folder} holds no complete embedding fields (no "
                              f"{FIELDS_FILE}): compute them with `python -m "
                              "anatjax.data.ct_volumes --out=STORE --embedding_run=RUN`")
    with open(marker) as f:
      saved = json.load(f)
    self.folder, self.spacing = folder, tuple(saved["spacing"])
    self.fine_stride, self.coarse_stride = saved["fine_stride"], saved["coarse_stride"]

  def matcher(self) -> correspondence.EmbeddingMatcher:
    return correspondence.EmbeddingMatcher(self.fine_stride, self.coarse_stride)

  def cache(self, row: int, image: Volume) -> correspondence.EmbeddingCache:
    field = lambda kind: np.load(fields_path(self.folder, row, kind), mmap_mode="r")
    return correspondence.EmbeddingCache(image, self.spacing, field("fine"),
                                         field("coarse"), field("norm"))

  def map(self, item):
    rows = item["rows"]
    return {"a": self.cache(int(rows[0]), item["a"].image),
            "b": self.cache(int(rows[1]), item["b"].image)}


# ---------------------------------------------------------------------------- the source

class VolumePairs:
  """Items {"a", "b", "rows"}: the provider (b) caches (anatjax/data/correspondence.
  AffineCache, CTs memory-mapped) of two patients, in the pairing order of the module doc,
  and their rows in the store (which name their provider (a) fields: `FieldCaches`). A
  Grain source with its own order (`ordered_stream`); picklable (volumes open lazily per
  process)."""

  def __init__(self, root: str):
    if not is_complete(root):
      raise FileNotFoundError(
          f"{root} is not a complete volume store (no {STORE_FILE}): prepare it with "
          "`python -m anatjax.data.ct_volumes --out=...` or point data.root at one")
    self.root = root
    with open(os.path.join(root, SUBJECTS_FILE)) as f:
      self.subjects = json.load(f)
    self._order = None

  def __len__(self):
    return len(self.subjects)

  def examples_per_epoch(self, batch_size: int) -> int:
    """An epoch: floor(N / B) batches of B distinct volumes."""
    if batch_size < 2:
      raise ValueError(f"config batch_size={batch_size}: Alice pairs volumes within a batch "
                       "and needs at least 2")
    if len(self) < batch_size:
      raise ValueError(f"config batch_size={batch_size} needs at least that many volumes; "
                       f"the store {self.root} has {len(self)}")
    return len(self) // batch_size * batch_size

  def __getstate__(self):
    return {**self.__dict__, "_order": None}

  def cache(self, row: int) -> correspondence.AffineCache:
    subject = self.subjects[row]
    image, body = load_volume(self.root, row, subject)
    to_volume = registration.PointMap(np.asarray(subject["matrix"]),
                                      np.asarray(subject["offset"]))
    return correspondence.AffineCache(image, body, to_volume)

  def pair(self, p: int, seed: int, batch_size: int) -> tuple[int, int]:
    """Stream position p -> (row of A, row of its partner B)."""
    epoch, within = divmod(p, self.examples_per_epoch(batch_size))
    # One (key, order) tuple, replaced whole: two iterators' threads reading one source
    # never see a key with another epoch's order.
    cached = self._order
    if cached is None or cached[0] != (seed, epoch):
      cached = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(len(self)))
      self._order = cached
    block, slot = divmod(within, batch_size)
    first = block * batch_size
    return (int(cached[1][first + slot]), int(cached[1][first + (slot + 1) % batch_size]))

  def __getitem__(self, index):
    """Random access: volume `index` with the next one as its partner."""
    return self.item(int(index), (int(index) + 1) % len(self))

  def item(self, a: int, b: int) -> dict:
    return {"a": self.cache(a), "b": self.cache(b), "rows": np.array([a, b], np.int64)}

  def ordered_stream(self, seed: int, batch_size: int) -> grain.MapDataset:
    """The training stream (global batch `batch_size`), MAX_EPOCHS epochs long (lazy)."""
    return grain.MapDataset.range(self.examples_per_epoch(batch_size) * MAX_EPOCHS).map(
        _PairItem(self, seed, batch_size))


@dataclasses.dataclass(frozen=True)
class _PairItem:
  """Picklable stream position -> item (Grain workers pickle the map)."""
  source: VolumePairs
  seed: int
  batch_size: int

  def __call__(self, p):
    return self.source.item(*self.source.pair(int(p), self.seed, self.batch_size))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--embedding_run", default="",
                      help="only compute the fields of this anatomy_embedding run for the "
                      "complete store --out (Alice's alice.provider=embedding)")
  for field in dataclasses.fields(Options):
    flag = "num_subjects" if field.name == "num_examples" else field.name
    kind = (lambda s: tuple(float(v) for v in s.split(","))) if isinstance(
        field.default, tuple) else type(field.default)
    parser.add_argument(f"--{flag}", dest=field.name, type=kind, default=field.default,
                        help="z,y,x mm" if field.name == "spacing_mm" else None)
  args = vars(parser.parse_args(argv))
  out, workers, run = args.pop("out"), args.pop("workers"), args.pop("embedding_run")
  if run:
    ensure_fields(out, run)
    return
  args["spacing_mm"] = tuple(np.broadcast_to(args["spacing_mm"], 3).tolist())
  prepare(Options(**args), out, workers)


if __name__ == "__main__":
  main()
