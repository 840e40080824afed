"""Orbax checkpoints: train state + data-iterator position + metadata, with auto-resume.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a run killed mid-save leaves no
half-checkpoint among the steps. A checkpoint that is there but does not restore (files
damaged afterwards) is set aside as `<step>.unreadable-<n>` with a warning, and the
previous one is used: nothing is ever deleted except by the keep-last-K policy.
"""

from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

FORMAT_VERSION = 1
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json")  # Grain's per-process state files


class IteratorSnapshot:
  """The data iterator's position, captured when the step is saved.

  Async saves run after the loop has moved on; saving the live iterator would record a
  later position than the parameters', so the state is frozen here first. Grain's Orbax
  handler accepts any object with a `get_state()` returning JSON bytes.
  """

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state(), indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = False,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"No checkpoints in {self.directory}: train first, or pass "
                              "the --workdir of a run.")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def existing_step(self, step: int | None = None) -> int:
    """`step` (default: the newest) if a checkpoint of it exists; a clear error if not."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}: train first, or pass "
                              "the --workdir of a run.")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available: {steps}")
    return step

  def save(self, step: int, state, iterator, meta: dict) -> None:
    meta = dict(meta, step=int(step), format_version=FORMAT_VERSION)
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator)),
        meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def read_state(self, step: int, abstract_state):
    """The train state of `step` as host NumPy arrays (no data iterator, no devices)."""
    host = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(host)))["state"]

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote the data-iterator state of `step` (one file each)."""
    names = os.listdir(os.path.join(self.directory, str(step), "data"))
    counts = {int(m.group(1)) for m in map(_DATA_FILE.fullmatch, names) if m}
    return counts.pop() if len(counts) == 1 else None

  def restore_latest(self, abstract_state, iterator, check_meta=lambda meta: None):
    """(step, state, meta, data_restored) of the newest checkpoint that restores, or None.

    `abstract_state` (ShapeDtypeStructs with shardings) says where the arrays go, on any
    mesh. `iterator` is moved to the saved data position in place when the checkpoint was
    written by as many processes as there are now; otherwise `data_restored` is False and
    the caller positions the data itself. `check_meta(meta)` may raise to refuse a
    checkpoint (e.g. another config); that error propagates untouched. Checkpoints that
    fail to read are skipped for the previous one; once an older one restores, the
    unreadable newer ones are set aside so that training can save again.
    """
    failures = []
    for step in reversed(self.steps()):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        continue
      check_meta(meta)
      try:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_restored = self.saved_process_count(step) == jax.process_count()
        if data_restored:
          items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        continue
      for bad_step, error in failures:
        self._set_aside(bad_step, error)
      return step, restored["state"], meta, data_restored
    if failures:
      details = "\n".join(f"  step {s}: {type(e).__name__}: {_first_line(e)}"
                          for s, e in failures)
      raise RuntimeError(
          f"No checkpoint in {self.directory} restores:\n{details}\nNothing was changed. "
          "If the model or data config changed, start a fresh --workdir.")
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    path = os.path.join(self.directory, str(step))
    n = 0
    while os.path.exists(f"{path}.unreadable-{n}"):
      n += 1
    if jax.process_index() == 0:
      os.rename(path, f"{path}.unreadable-{n}")
    if jax.process_count() > 1:  # every process sees the rename before listing again
      multihost_utils.sync_global_devices(f"anatjax_set_aside_{step}")
    logging.warning(
        "Checkpoint %s does not restore (%s: %s); it was moved to %s.unreadable-%d and "
        "training resumes from an earlier checkpoint.", path, type(error).__name__,
        _first_line(error), path, n)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else ""
