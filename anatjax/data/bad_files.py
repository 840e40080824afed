"""Unusable files never stop a run and are never silent.

Two places find them:

- the start-up scan (`ImageSource` checks that every listed file exists): missing files
  leave the source before the schedule is computed; if more than `data.max_bad_fraction`
  of the listed files are missing the run stops before compiling, with a report;
- decoding (in the Grain workers): a file that is corrupt, truncated, an unreadable DICOM,
  not 2-D or constant is replaced by the next readable position of the source.

Why replace instead of filter: the pipeline shuffles, slices, batches and checkpoints a
Grain MapDataset, and MapDataset cannot batch after a filter. Replacing item i with the
first readable item at i+1, i+2, ... keeps the dataset's length and every position's
meaning fixed, depends only on the files, so a resumed run sees the same stream, and
costs one duplicate example per bad file.

Both write `path<TAB>reason<TAB>scan|decode` lines to WORKDIR/bad_files.tsv (process p > 0:
bad_files.process<p>.tsv), append-only, so the list survives restarts and worker
processes never overwrite each other; readers take each path once. The trainer shows the
first few decode failures with path and reason and logs their count as the `bad_files`
metric.
"""

from __future__ import annotations

import glob
import os

from anatjax.data.decode import BadImageError

# So many unreadable files in a row is no longer a few bad files but a systematic problem
# (a missing DICOM decoder plugin, a folder of non-images): stop and say so.
MAX_CONSECUTIVE_BAD = 50
SHOW_FIRST = 5


class BadDataError(RuntimeError):
  """Too many unusable files to train on."""


class BadFileLog:
  """The append-only list of a run's unusable files in its workdir."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = workdir
    name = "bad_files.tsv" if process_index == 0 else f"bad_files.process{process_index}.tsv"
    self.path = os.path.join(workdir, name)

  def record(self, path: str, reason: str, stage: str) -> None:
    reason = " ".join(reason.split())[:500]  # one line, whatever a decoder said
    # One short write per line in append mode: lines from several worker processes
    # interleave whole.
    with open(self.path, "a") as f:
      f.write(f"{path}\t{reason}\t{stage}\n")

  def entries(self, stage: str | None = None) -> dict[str, str]:
    """path -> reason of every logged file (of every process), first reason kept."""
    found = {}
    for name in sorted(glob.glob(os.path.join(self.workdir, "bad_files*.tsv"))):
      with open(name) as f:
        for line in f:
          path, reason, line_stage = line.rstrip("\n").split("\t")
          if stage in (None, line_stage):
            found.setdefault(path, reason)
    return found


def check_start_up(source, log: BadFileLog, max_fraction: float, write: bool = True) -> str:
  """Records the start-up scan's failures; raises BadDataError over the limit.

  Returns a line for the user ("" when every listed file is there). `write`: whether this
  process writes the list (every process scans the same index; one writes it).
  """
  failures, listed = source.scan_failures, source.num_listed
  if write:
    for path, reason in failures:
      log.record(path, reason, "scan")
  if not failures:
    return ""
  fraction = len(failures) / listed
  examples = "; ".join(f"{path}: {reason}" for path, reason in failures[:SHOW_FIRST])
  report = (f"{len(failures)} of the {listed} files listed by {source.description} are "
            f"unusable ({fraction:.2%}), e.g. {examples}. Full list: {log.path}.")
  if fraction > max_fraction:
    raise BadDataError(f"{report} That is more than data.max_bad_fraction={max_fraction:g}: "
                       "check data.root and the download, or raise the limit.")
  return f"Skipping them: {report}"


class SkipBadFiles:
  """A random-access source whose items never fail to decode: item i is the first item
  of `source` at i, i+1, ... (wrapping) whose file decodes (see the module docstring)."""

  def __init__(self, source, log: BadFileLog):
    self.source, self.log = source, log
    self._known_bad = set()  # positions found bad by this process: not read again

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, position):
    position, size = int(position), len(self.source)
    last = "already known to be unusable"
    for step in range(MAX_CONSECUTIVE_BAD):
      candidate = (position + step) % size
      if candidate in self._known_bad:
        continue
      try:
        return self.source[candidate]
      except BadImageError as e:
        self._known_bad.add(candidate)
        self.log.record(e.path, e.reason, "decode")
        last = e
    raise BadDataError(
        f"{MAX_CONSECUTIVE_BAD} files in a row (positions {position}..{position + step}) "
        f"could not be used, the last: {last}. A systematic problem (a missing DICOM "
        f"decoder plugin? not image files?); all are listed in {self.log.path}.")

  def __repr__(self) -> str:
    return f"SkipBadFiles({self.source!r})"


class DecodeReport:
  """What the trainer tells about decode failures at each log step: the first few with
  path and reason, once a warning when they pass the limit, their count as a metric."""

  def __init__(self, log: BadFileLog, num_files: int, max_fraction: float):
    self.log, self.num_files, self.max_fraction = log, num_files, max_fraction
    self._shown = 0
    self._warned = False

  def poll(self, say) -> int:
    """Prints what is new through `say`; returns the number of files skipped so far."""
    failures = self.log.entries("decode")
    for path, reason in list(failures.items())[self._shown:SHOW_FIRST]:
      say(f"Skipped an unusable file (the next readable one takes its place): "
          f"{path}: {reason}")
    self._shown = max(self._shown, min(len(failures), SHOW_FIRST))
    if not self._warned and len(failures) > self.max_fraction * self.num_files:
      self._warned = True
      say(f"Warning: {len(failures)} files failed to decode, more than "
          f"data.max_bad_fraction={self.max_fraction:g} of the {self.num_files} files; "
          f"the run goes on with the readable ones. List: {self.log.path}")
    return len(failures)


def guard(source, workdir: str, max_fraction: float, process_index: int, say):
  """(source, DecodeReport) for a run: a source of files gets its start-up check and
  skips unusable files; a generated source (nothing to go wrong) comes back as it is,
  with no report."""
  if not hasattr(source, "scan_failures"):
    return source, None
  log = BadFileLog(workdir, process_index)
  message = check_start_up(source, log, max_fraction, write=process_index == 0)
  if message:
    say(message)
  return SkipBadFiles(source, log), DecodeReport(log, len(source), max_fraction)
