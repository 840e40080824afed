r"""CT volumes -> DrasCLR's atlas patch store (drasclr.md 2.1-2.3), offline or lazily.

  python -m anatjax.data.ct_prepare --volumes=synthetic_ct --num_subjects=64 \
      --spacing_mm=4 --patch_size=16 --out=/data/ct_store_runlocal
  python -m anatjax.data.ct_prepare --volumes=/data/copdgene --out=/data/copdgene_store \
      --workers=16            # NIfTI files and DICOM series found below the folder

Steps, each subject independent (`--workers` processes):
1. read the volume (anatjax/data/ct_readers.py, or the synthetic_ct phantom), resample to
   `spacing_mm` isotropic (cubic B-spline), lung mask (a --lung_masks label map resampled
   nearest, or the classical one of anatjax/data/atlas.py); cached in WORK/subjects;
2. the atlas: `--atlas=ID`, or the subject with the median total lung volume; its patch
   grid, normalised locations and neighbours;
3. each subject's lungs registered to the atlas's (anatjax/data/registration.py), cached
   in WORK/transforms; subjects whose warped lungs have Dice < `min_dice` with the atlas's
   are left out and listed in excluded.tsv;
4. patches: each atlas cube's centre (or corner) mapped into the subject, the subject's
   own voxels cropped there (not warped), int16 HU clipped to [-1024, 3071], one array per
   location; QC figures (the atlas grid drawn on subjects) in qc/.
store.json is written last: a store without it is incomplete and is prepared again.
Training prepares a missing store itself (`data.source=ct_patches`; data.root or a cache
folder keyed by these options) with one process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time

import numpy as np

from anatjax.data import atlas as atlas_lib, ct_patches, registration, slice_figures
from anatjax.data.volume import Volume, resample

HU_RANGE = (-1024, 3071)
# The data-config keys that decide a store's content (a different value = another store).
OPTION_KEYS = ("volumes", "num_examples", "source_seed", "synthetic_size", "lung_masks",
               "spacing_mm", "image_size", "patch_stride", "max_patches", "atlas",
               "loc_norm", "map_point", "min_dice")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
# The atlas subject's CT and lung labels, kept in the store to map new subjects later.
ATLAS_VOLUMES = "atlas_volumes.npz"


class StoreOptions:
  """What a 3-D store's options dataclass shares (this store's and Alice's volume store,
  anatjax/data/ct_volumes.py): the JSON form recorded in its store.json and hashed into
  its cache folder's name."""

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Options(StoreOptions):
  volumes: str = "synthetic_ct"   # 'synthetic_ct' or a folder of NIfTI files / DICOM series
  num_examples: int = 64          # synthetic subjects
  source_seed: int = 0
  synthetic_size: int = 128       # the phantom's grid (voxels per axis) before resampling
  lung_masks: str = ""            # folder of label maps (1 right, 2 left), same names
  spacing_mm: float = 1.0
  image_size: int = 32            # patch edge, voxels
  patch_stride: int = 26
  max_patches: int = 1000
  atlas: str = ""                 # subject id; '' = the median total lung volume
  loc_norm: str = "max"
  map_point: str = "centre"
  min_dice: float = 0.8

  @classmethod
  def from_config(cls, data_config) -> "Options":
    return cls(**{k: data_config[k] for k in OPTION_KEYS})


# ---------------------------------------------------------------------------- subjects

def subject_ids(options: Options) -> list:
  """Subject ids: synthetic indices, or paths (relative to the folder) of NIfTI files and
  of folders holding DICOM files (one series each), sorted."""
  if options.volumes == "synthetic_ct":
    return [f"synthetic_{i:05d}" for i in range(options.num_examples)]
  root = options.volumes
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config data.volumes={root!r} is neither 'synthetic_ct' nor a "
                            "folder of CT volumes")
  ids = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    rel = os.path.relpath(folder, root)
    ids += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files)
            if f.endswith(VOLUME_SUFFIXES)]
    if any(f.lower().endswith(".dcm") for f in files):
      ids.append(os.path.normpath(rel))
  if not ids:
    raise FileNotFoundError(f"no NIfTI files (.nii, .nii.gz) or DICOM series (.dcm) below "
                            f"data.volumes={root}")
  return sorted(ids)


def read_subject(options: Options, subject_id: str) -> Volume:
  """A subject's CT in HU on the canonical grid, before resampling."""
  if options.volumes == "synthetic_ct":
    from anatjax.data import synthetic_ct  # pylint: disable=g-import-not-at-top
    index = int(subject_id.rsplit("_", 1)[1])
    size = options.synthetic_size
    return synthetic_ct.subject(options.source_seed, index, shape=(size,) * 3).image
  from anatjax.data import ct_readers  # pylint: disable=g-import-not-at-top
  return ct_readers.read_volume(os.path.join(options.volumes, subject_id))


def resampled_subject(options: Options, subject_id: str) -> tuple[Volume, Volume]:
  """(image int16 HU, lung labels) at the store's spacing."""
  image = resample(read_subject(options, subject_id), options.spacing_mm, order=3)
  image = image.with_array(np.clip(image.array, *HU_RANGE).astype(np.int16))
  if options.lung_masks:
    from anatjax.data import ct_readers  # pylint: disable=g-import-not-at-top
    given = ct_readers.read_volume(os.path.join(options.lung_masks, subject_id))
    given = resample(given, options.spacing_mm, order=0, cval=0)
    labels = np.select([given.array == 1, given.array == 2],
                       [atlas_lib.RIGHT_LUNG, atlas_lib.LEFT_LUNG], 0).astype(np.uint8)
    if labels.shape != image.shape:
      raise ValueError(f"the lung mask of {subject_id} ({labels.shape} at "
                       f"{options.spacing_mm} mm) does not match its CT ({image.shape})")
    return image, image.with_array(labels)
  return image, atlas_lib.lung_mask(image)


def cache_path(work: str, kind: str, subject_id: str) -> str:
  """WORK/kind/<hash of the id>.npz (its folder made on the way)."""
  os.makedirs(os.path.join(work, kind), exist_ok=True)
  name = hashlib.sha1(subject_id.encode()).hexdigest()[:16]
  return os.path.join(work, kind, f"{name}.npz")


def save_volume(path: str, **volumes: Volume) -> None:
  """Volumes with their geometry in one .npz (compressed: CT and masks shrink a lot)."""
  tmp = path + ".tmp.npz"
  arrays = {}
  for key, v in volumes.items():
    arrays.update({key: v.array, f"{key}_spacing": v.spacing, f"{key}_origin": v.origin})
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def load_volumes(path: str, *keys) -> list:
  with np.load(path) as f:
    return [Volume(f[k], tuple(f[f"{k}_spacing"]), tuple(f[f"{k}_origin"])) for k in keys]


def subject_masks(options: Options, work: str, subject_id: str) -> float:
  """Step 1 for one subject (cached): its resampled CT and lung labels; returns the lung
  volume in mL."""
  path = cache_path(work, "subjects", subject_id)
  if not os.path.exists(path):
    image, labels = resampled_subject(options, subject_id)
    save_volume(path, image=image, labels=labels)
  (labels,) = load_volumes(path, "labels")
  return atlas_lib.lung_volume_ml(labels)


def subject_registration(options: Options, work: str, atlas_id: str, subject_id: str):
  """Step 3 for one subject (cached): (PointMap atlas -> subject, Dice)."""
  path = cache_path(work, f"transforms_{hashlib.sha1(atlas_id.encode()).hexdigest()[:8]}",
                    subject_id)
  if not os.path.exists(path):
    (atlas_labels,) = load_volumes(cache_path(work, "subjects", atlas_id), "labels")
    (labels,) = load_volumes(cache_path(work, "subjects", subject_id), "labels")
    if subject_id == atlas_id:
      point_map = registration.PointMap(np.eye(3), np.zeros(3))
    else:
      point_map = registration.register(atlas_labels, labels)
    score = registration.dice(registration.warp_to_atlas(labels, atlas_labels, point_map),
                              atlas_labels.array)
    tmp = path + ".tmp.npz"
    np.savez(tmp, matrix=point_map.matrix, offset=point_map.offset, dice=score)
    os.replace(tmp, path)
  with np.load(path) as f:
    return registration.PointMap(f["matrix"], f["offset"]), float(f["dice"])


def subject_patches(options: Options, work: str, atlas_id: str, atlas_grid: Volume,
                    subject_id: str, corners) -> tuple[np.ndarray, np.ndarray]:
  """Step 4 for one subject: (int16 [L, S, S, S] patches at the mapped atlas cubes, the
  patches' start voxels [L, 3]). `atlas_grid` carries the atlas's spacing and origin (its
  array is not read: the atlas CT need not be decompressed again per subject)."""
  (image,) = load_volumes(cache_path(work, "subjects", subject_id), "image")
  point_map, _ = subject_registration(options, work, atlas_id, subject_id)
  starts = registration.patch_starts(atlas_grid, image, corners, options.image_size,
                                     point_map, options.map_point)
  return np.stack([registration.crop_patch(image, s, options.image_size, HU_RANGE[0])
                   for s in starts]), starts


# ---------------------------------------------------------------------------- the store

def prepare(options: Options, out: str, workers: int = 0, say=print,
            keep_work: bool = False) -> str:
  """Writes the store for `options` into `out`; returns out. The per-subject caches
  (out/work) let an interrupted preparation continue; the resampled volumes are deleted
  at the end unless `keep_work`."""
  start = time.time()
  work = os.path.join(out, "work")
  os.makedirs(os.path.join(out, "qc"), exist_ok=True)
  ids = subject_ids(options)
  run = runner(workers)
  say(f"Preparing a patch store in {out}: {len(ids)} subjects from {options.volumes}, "
      f"{options.spacing_mm} mm, {options.image_size}^3 patches")
  volumes = list(run(subject_masks, [(options, work, i) for i in ids]))
  if options.atlas:
    if options.atlas not in ids:
      raise ValueError(f"config data.atlas={options.atlas!r} is not one of the subjects "
                       f"(e.g. {ids[:3]})")
    atlas_id = options.atlas
  else:
    atlas_id = ids[atlas_lib.choose_atlas(volumes)]
  atlas_image, atlas_labels = load_volumes(cache_path(work, "subjects", atlas_id),
                                           "image", "labels")
  save_volume(os.path.join(out, ATLAS_VOLUMES), image=atlas_image, labels=atlas_labels)
  corners, threshold = atlas_lib.patch_grid(atlas_labels.array, options.image_size,
                                            options.patch_stride, options.max_patches)
  atlas = ct_patches.Atlas(corners, atlas_lib.normalised_locations(corners, options.loc_norm),
                           atlas_lib.nearest_neighbours(corners), options.image_size,
                           options.spacing_mm, atlas_id)
  say(f"Atlas {atlas_id} (lungs {volumes[ids.index(atlas_id)]:.0f} mL; cohort median "
      f"{np.median(volumes):.0f} mL): {atlas.num_locations} locations with over "
      f"{threshold:.0%} lung")
  scores = [d for _, d in run(subject_registration, [(options, work, atlas_id, i)
                                                     for i in ids])]
  kept = [i for i, d in zip(ids, scores) if d >= options.min_dice]
  with open(os.path.join(out, "excluded.tsv"), "w") as f:
    f.write("subject\tdice\n")
    for i, d in zip(ids, scores):
      if d < options.min_dice:
        f.write(f"{i}\t{d:.4f}\n")
  say(f"Registered: lung Dice with the atlas median {np.median(scores):.3f}, min "
      f"{min(scores):.3f}; {len(ids) - len(kept)} subject(s) under {options.min_dice} left "
      "out (excluded.tsv)")
  arrays = [np.lib.format.open_memmap(ct_patches.location_file(out, i), "w+", np.int16,
                                      (len(kept),) + (options.image_size,) * 3)
            for i in range(atlas.num_locations)]
  atlas_grid = Volume(np.zeros((1, 1, 1), np.int16), atlas_image.spacing, atlas_image.origin)
  results = run(subject_patches, [(options, work, atlas_id, atlas_grid, i, corners)
                                  for i in kept])
  for row, (patches, starts) in enumerate(results):
    for location, patch in enumerate(patches):
      arrays[location][row] = patch
    if row < 2:
      (image,) = load_volumes(cache_path(work, "subjects", kept[row]), "image")
      grid_figure(image, starts, options.image_size,
                  os.path.join(out, "qc", f"grid_subject{row}.png"))
  for a in arrays:
    a.flush()
  grid_figure(atlas_image, corners, options.image_size, os.path.join(out, "qc", "atlas.png"))
  atlas.save(out)
  with open(os.path.join(out, ct_patches.SUBJECTS_FILE), "w") as f:
    json.dump(kept, f)
  with open(os.path.join(out, ct_patches.STORE_FILE), "w") as f:
    json.dump({"options": options.to_dict(), "threshold": threshold,
               "num_subjects": len(kept), "num_locations": atlas.num_locations}, f, indent=1)
  if not keep_work:
    shutil.rmtree(os.path.join(work, "subjects"), ignore_errors=True)
  say(f"Wrote {atlas.num_locations} locations x {len(kept)} subjects to {out} in "
      f"{time.time() - start:.0f} s")
  return out


def runner(workers: int):
  """(fn, [args]) -> fn(*args) for each, in order, as they come: in `workers` processes
  (spawned, which is safe after JAX started) or in this one."""
  def run(fn, arg_list):
    if workers <= 0:
      yield from (fn(*args) for args in arg_list)
      return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      yield from pool.map(fn, *zip(*arg_list))
  return run


def grid_figure(image: Volume, starts, size: int, path: str) -> None:
  """Coronal and axial slices (lung window) through the middle of the patch grid, each
  patch crossing the slice drawn as its square (the registration's quality figure)."""
  import cv2  # pylint: disable=g-import-not-at-top
  starts = np.asarray(starts)
  centre = np.clip(np.median(starts, 0).astype(int) + size // 2, 0,
                   np.asarray(image.shape) - 1)
  panels = []
  for axis in (1, 0):   # coronal (fixed y), axial (fixed z)
    window = np.clip((np.take(image.array, centre[axis], axis).astype(np.float32) + 1000)
                     / 1200.0, 0, 1)
    panel = cv2.cvtColor((window * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    rows = [a for a in range(3) if a != axis]
    for s in starts:
      if s[axis] <= centre[axis] < s[axis] + size:
        cv2.rectangle(panel, (int(s[rows[1]]), int(s[rows[0]])),
                      (int(s[rows[1]] + size - 1), int(s[rows[0]] + size - 1)),
                      (0, 200, 255), 1)
    panels.append(panel[::-1] if axis == 1 else panel)   # coronal: superior at the top
  slice_figures.save_side_by_side(panels, path)


def map_to_store(root: str, image: Volume, labels: Volume | None = None) -> dict:
  """A CT that is not in the store (an evaluation subject), already at the store's
  spacing, through the store's own steps: lung labels (classical unless given), affine
  registration to the store's atlas, patches at every location. Returns {patches
  [L, S, S, S] int16, starts [L, 3], dice, point_map}."""
  options = Options(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in ct_patches.read_options(root)["options"].items()})
  if not np.allclose(image.spacing, options.spacing_mm):
    raise ValueError(f"the CT has spacing {image.spacing} mm; the store {root} is at "
                     f"{options.spacing_mm} mm: resample it first (anatjax.data.volume)")
  atlas_image, atlas_labels = load_volumes(os.path.join(root, ATLAS_VOLUMES), "image",
                                           "labels")
  image = image.with_array(np.clip(image.array, *HU_RANGE).astype(np.int16))
  labels = atlas_lib.lung_mask(image) if labels is None else labels
  point_map = registration.register(atlas_labels, labels)
  score = registration.dice(registration.warp_to_atlas(labels, atlas_labels, point_map),
                            atlas_labels.array)
  starts = registration.patch_starts(atlas_image, image, ct_patches.read_atlas(root).corners,
                                     options.image_size, point_map, options.map_point)
  patches = np.stack([registration.crop_patch(image, s, options.image_size, HU_RANGE[0])
                      for s in starts])
  return {"patches": patches, "starts": starts, "dice": score, "point_map": point_map}


def cache_root(kind: str, volumes: str, options: dict) -> str:
  """A store's default folder: ANATJAX_CACHE (~/.cache/anatjax)/kind/<volumes' name>_<hash
  of the options>, so other options never reuse it."""
  digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
  cache = os.environ.get("ANATJAX_CACHE", os.path.expanduser("~/.cache/anatjax"))
  name = os.path.basename(os.path.normpath(volumes)) or "volumes"
  return os.path.join(cache, kind, f"{name}_{digest.hexdigest()[:12]}")


def store_root(data_config) -> str:
  """The patch store's folder: data.root, or a cache folder named by the options."""
  if data_config.root:
    return data_config.root
  options = Options.from_config(data_config)
  return cache_root("ct_patches", options.volumes, options.to_dict())


def ensure_complete(root: str, options: dict, is_complete, read_options, prepare_now,
                    what: str, say=print) -> str:
  """`root` if it holds a complete store made with `options`, else prepare_now() (into an
  empty or unfinished folder). A complete store made with other options is refused,
  naming them, rather than silently used."""
  if is_complete(root):
    saved = read_options(root)["options"]
    differ = {k: (saved.get(k), v) for k, v in options.items() if saved.get(k) != v}
    if differ:
      raise ValueError(f"the {what} store {root} was prepared with other options "
                       f"(saved vs now: {differ}): point data.root at another folder or "
                       "prepare again into an empty one")
    return root
  if os.path.isdir(root) and os.listdir(root) and not os.path.isdir(
      os.path.join(root, "work")):
    raise FileExistsError(f"{root} holds files but no {what} store: give data.root an "
                          "empty or new folder")
  say(f"No complete {what} store in {root}: preparing it now (once).")
  return prepare_now()


def ensure_store(data_config, say=print) -> str:
  """The patch store of `data_config`, prepared now if it is not complete."""
  root = store_root(data_config)
  options = Options.from_config(data_config)
  return ensure_complete(root, options.to_dict(), ct_patches.is_complete,
                         ct_patches.read_options, lambda: prepare(options, root, say=say),
                         "patch", say)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--keep_work", action="store_true",
                      help="keep the resampled CTs and lung masks (out/work/subjects)")
  for field in dataclasses.fields(Options):
    flag = "num_subjects" if field.name == "num_examples" else (
        "patch_size" if field.name == "image_size" else field.name)
    parser.add_argument(f"--{flag}", dest=field.name, type=type(field.default),
                        default=field.default)
  args = vars(parser.parse_args(argv))
  out, workers, keep = args.pop("out"), args.pop("workers"), args.pop("keep_work")
  prepare(Options(**args), out, workers, keep_work=keep)


if __name__ == "__main__":
  main()
