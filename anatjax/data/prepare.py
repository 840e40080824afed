r"""Prepare a dataset for throughput: decode it once, read it fast.

  python -m anatjax.data.prepare --source=nih_cxr14 --root=/data/nih --out=/data/nih-224 \
      [--image_size=224] [--split=pretrain] [--workers=N] [--config=configs/afire_vitb.py]

reads every item of a source of anatjax/data/sources.py (the real collections and
synthetic_cxr) through the source's own decoding, intensity normalisation and geometry and
writes them to ArrayRecord shards with a small prepared.json (anatjax/data/prepared.py
describes the folder and the record format). Files that cannot be used (missing,
corrupt, truncated, not 2-D, constant) are skipped and listed in OUT/bad_files.tsv and
prepared.json: they never stop the preparation. Worker processes decode consecutive
ranges of items, one shard each, so the output does not depend on their number.

The other data options (selection, labels, intensity, geometry, ...) come from the data
block of `--config` (overridable as `--config.data.selection=normal_frontal`), or without
it from the defaults every recipe starts from (configs/common.py). Train on the result
with `--config.data.source=prepared --config.data.root=OUT`; the run's data options must
match the prepared ones (a mismatch is an error naming them).

Afterwards it measures, in this one process, how many items per second one data worker
gets from the original source (read + decode + normalise + resize) and from the prepared
folder, on the same items in interleaved rounds, prints both and their ratio and stores
them in prepared.json (`reading_speed`).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import platform
import statistics
import time

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import config_flags

from anatjax.data import bad_files, prepared, sources
from anatjax.data.decode import BadImageError

METADATA_SHOWN_SKIPS = 20  # prepared.json lists the first few; bad_files.tsv has them all


def define_flags():
  """The command's flags (defined only when run as a command, so that importing this
  module next to other commands does not clash over names)."""
  config_flags.DEFINE_config_file(
      "config", None, "A recipe whose data block gives the data options (default: "
      "configs/common.py's defaults).")
  flags.DEFINE_string("source", None, "The source to prepare (default: the config's).")
  flags.DEFINE_string("root", None, "Its data.root (default: the config's).")
  flags.DEFINE_integer("image_size", None, "Side of the prepared images (default: the "
                       "config's, 224).")
  flags.DEFINE_string("split", "pretrain", "Which split of the source.")
  flags.DEFINE_string("out", None, "The folder to write (created; a previous preparation "
                      "in it is replaced).", required=True)
  flags.DEFINE_integer("workers", os.cpu_count(), "Decoding processes (0: this one).")
  flags.DEFINE_integer("shard_size", 1024, "Items per shard (before skipping bad files).")
  flags.DEFINE_integer("measure_items", 100, "Items read per speed measurement round "
                       "(0: do not measure).")


# ------------------------------------------------------------------ preparing
def prepare(data_config, split: str, out_dir: str, *, workers: int = 0,
            shard_size: int = 1024, say=print) -> dict:
  """Writes the items of `data_config`'s source and split to `out_dir`; returns the
  metadata (also written to OUT/prepared.json, last). See the module docstring."""
  if data_config.source == "prepared":
    raise ValueError("config data.source=prepared: that folder is already prepared.")
  source = sources.make_source(data_config, split)
  _clear(out_dir)
  log = bad_files.BadFileLog(out_dir)
  for path, reason in getattr(source, "scan_failures", ()):
    log.record(path, reason, "scan")
  ranges = [(start, min(start + shard_size, len(source)))
            for start in range(0, len(source), shard_size)]
  say(f"Preparing {source!r}: {len(source)} items in {len(ranges)} shards of "
      f"{shard_size}, {workers or 'no'} worker processes, into {out_dir}")
  shards, count, start = [], 0, time.perf_counter()
  for shard, (name, written, failures) in enumerate(_write_shards(source, ranges, out_dir,
                                                                  workers)):
    for path, reason in failures:
      log.record(path, reason, "decode")
    if written:
      shards.append(name)
      count += written
    say(f"  shard {shard + 1}/{len(ranges)}: {written} items, {len(failures)} skipped")
  skipped = log.entries()
  if not count:
    raise bad_files.BadDataError(f"No item of {source!r} could be read; see {log.path}.")
  metadata = _metadata(data_config, split, source, count, shards, skipped, log.path)
  if skipped:
    say(f"Skipped {len(skipped)} unusable files (listed in {log.path}), e.g. "
        + "; ".join(f"{p}: {r}" for p, r in list(skipped.items())[:bad_files.SHOW_FIRST]))
  write_metadata(out_dir, metadata)
  say(f"Wrote {count} items to {out_dir} in {time.perf_counter() - start:.1f} s")
  return metadata


def _metadata(data_config, split, source, count, shards, skipped, log_path) -> dict:
  """The contents of prepared.json (see anatjax/data/prepared.py)."""
  return {
      "format": prepared.FORMAT, "source": data_config.source,
      "root": os.path.abspath(data_config.root) if data_config.root else "",
      "split": split, "options": prepared.content_options(data_config.source, data_config),
      "class_names": list(_class_names(source)), "count": count, "shards": shards,
      "skipped": {"count": len(skipped),
                  "list": os.path.basename(log_path) if skipped else None,
                  "first": [{"path": p, "reason": r} for p, r in
                            list(skipped.items())[:METADATA_SHOWN_SKIPS]]},
  }


def write_metadata(out_dir: str, metadata: dict) -> None:
  # Written to a temporary name and renamed: prepared.json appears complete or not at all.
  path = os.path.join(out_dir, prepared.METADATA_NAME)
  with open(path + ".tmp", "w") as f:
    json.dump(metadata, f, indent=1)
  os.replace(path + ".tmp", path)


def _clear(out_dir: str) -> None:
  """Makes `out_dir` an empty folder; refuses one holding anything but a (possibly
  unfinished) preparation, and removes prepared.json first, so that an interrupted
  rewrite never looks finished."""
  os.makedirs(out_dir, exist_ok=True)
  names = set(os.listdir(out_dir))
  ours = {prepared.METADATA_NAME, prepared.METADATA_NAME + ".tmp", "bad_files.tsv"}
  foreign = sorted(n for n in names - ours if not _is_shard_name(n))
  if foreign:
    raise FileExistsError(f"--out={out_dir!r} holds files that are not a preparation "
                          f"(e.g. {foreign[0]!r}): choose an empty or new folder.")
  for name in sorted(names, key=lambda n: n != prepared.METADATA_NAME):
    os.remove(os.path.join(out_dir, name))


def _is_shard_name(name: str) -> bool:
  return name.startswith("shard-") and name.endswith(".array_record")


def _write_shards(source, ranges, out_dir: str, workers: int):
  """(shard name, items written, [(path, reason) skipped]) per range, in range order."""
  tasks = [(start, stop, os.path.join(out_dir, prepared.SHARD_PATTERN.format(shard)))
           for shard, (start, stop) in enumerate(ranges)]
  if workers <= 0:
    yield from map(functools.partial(_write_shard, source), tasks)
    return
  # spawn: a fresh interpreter per worker (forking a process that holds threads, e.g.
  # Grain's or a decoder's, can deadlock); the source is sent once per worker.
  context = multiprocessing.get_context("spawn")
  with context.Pool(min(workers, len(tasks)), _set_worker_source, (source,)) as pool:
    yield from pool.imap(_write_shard_in_worker, tasks)


_worker_source = None


def _set_worker_source(source) -> None:
  global _worker_source
  _worker_source = source


def _write_shard_in_worker(task):
  return _write_shard(_worker_source, task)


def _write_shard(source, task):
  """Writes items start..stop-1 of `source` that decode to one shard (removed if none
  do); returns (shard name, items written, skipped (path, reason) pairs)."""
  start, stop, path = task
  writer = ArrayRecordWriter(path, prepared.WRITER_OPTIONS)
  written, failures = 0, []
  for position in range(start, stop):
    try:
      item = source[position]
    except BadImageError as e:
      failures.append((e.path, e.reason))
      continue
    writer.write(prepared.encode_item(item))
    written += 1
  writer.close()
  if not written:
    os.remove(path)
  return os.path.basename(path), written, failures


def _class_names(source) -> tuple[str, ...]:
  # File sources name their findings `class_names`; the synthetic source `finding_names`.
  return getattr(source, "class_names", None) or getattr(source, "finding_names", ())


# ------------------------------------------------------------------ reading speed
def reading_speed(data_config, split: str, out_dir: str, items: int,
                  rounds: int = 3) -> dict:
  """Items/s one process reads from the original source and from the prepared folder:
  the same items (the first `items` of the prepared folder, which skips no file),
  rounds interleaved, the median round counted."""
  original = sources.make_source(data_config, split)
  prepared_source = prepared.PreparedSource(out_dir, prepared.read_metadata(out_dir))
  positions = range(min(items, len(prepared_source)))
  originals = _readable_positions(original, len(positions))
  times = {"original": [], "prepared": []}
  for _ in range(rounds):
    times["original"].append(_time_reads(original, originals))
    times["prepared"].append(_time_reads(prepared_source, positions))
  rates = {name: len(positions) / statistics.median(t) for name, t in times.items()}
  return {"items": len(positions), "rounds": rounds,
          "original_items_per_s": rates["original"],
          "prepared_items_per_s": rates["prepared"],
          "speedup": rates["prepared"] / rates["original"],
          "image_size": data_config.image_size, "machine": _machine()}


def _readable_positions(source, count: int) -> list[int]:
  """The first `count` positions of `source` whose items can be read (the items the
  prepared folder starts with)."""
  found, position = [], 0
  while len(found) < count:
    try:
      source[position]
      found.append(position)
    except BadImageError:
      pass
    position += 1
  return found


def _time_reads(source, positions) -> float:
  start = time.perf_counter()
  for position in positions:
    source[position]
  return time.perf_counter() - start


def _machine() -> str:
  return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {platform.platform(terse=True)}")


# ------------------------------------------------------------------ command
def data_config_from_flags(args):
  """The data config: --config's data block (or the shared defaults) with --source,
  --root and --image_size applied."""
  if args.config is not None:
    data_config = args.config.data
  else:
    from configs.common import pretraining_config  # pylint: disable=g-import-not-at-top
    data_config = pretraining_config("prepare", "B/16").data
  data_config.unlock()
  for name in ("source", "root", "image_size"):
    if getattr(args, name) is not None:
      data_config[name] = getattr(args, name)
  return data_config


def main(argv):
  del argv
  args = flags.FLAGS
  data_config = data_config_from_flags(args)
  metadata = prepare(data_config, args.split, args.out, workers=args.workers,
                     shard_size=args.shard_size)
  if args.measure_items > 0:
    speed = reading_speed(data_config, args.split, args.out, args.measure_items)
    print(f"Per data worker (one process, {speed['items']} items, median of "
          f"{speed['rounds']} interleaved rounds; {speed['machine']}):")
    original = (f"original {data_config.source} (read, decode, normalise, resize to "
                f"{data_config.image_size} px)")
    for label, rate, note in ((original, speed["original_items_per_s"], ""),
                              ("prepared ArrayRecord", speed["prepared_items_per_s"],
                               f"  ({speed['speedup']:.1f}x)")):
      print(f"  {label:<66} {rate:9.1f} items/s{note}")
    write_metadata(args.out, {**metadata, "reading_speed": speed})


if __name__ == "__main__":
  define_flags()
  app.run(main)
