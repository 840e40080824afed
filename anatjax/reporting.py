"""What a run tells its user: metrics.jsonl, TensorBoard events, and a progress line."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors the
  scalars to TensorBoard event files in WORKDIR/tensorboard. Only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step":
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; for a step logged twice (a resumed run) the last wins."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


class Progress:
  """A one-line progress report: step, epoch, loss terms, images/s and ETA.

  On a terminal it redraws one line; in a log file each report is its own line.
  """

  def __init__(self, total_steps: int, steps_per_epoch: int, batch_size: int,
               start_step: int, enabled: bool = True):
    self.total, self.per_epoch, self.batch = total_steps, steps_per_epoch, batch_size
    self.enabled = enabled
    self._tty = sys.stderr.isatty()
    self._mark = (start_step, time.perf_counter(), 0.0)
    self.images_per_s = float("nan")

  def update(self, step: int, scalars: dict, data_wait_s: float) -> None:
    """Report after `step` steps are done; adds `images_per_s` and `data_wait` (the
    fraction of the time since the last report spent waiting for batches) to scalars."""
    now = time.perf_counter()
    last_step, last_time, last_wait = self._mark
    elapsed = max(now - last_time, 1e-9)
    if step > last_step:
      self.images_per_s = (step - last_step) * self.batch / elapsed
    self._mark = (step, now, data_wait_s)
    scalars["images_per_s"] = self.images_per_s
    scalars["data_wait"] = (data_wait_s - last_wait) / elapsed
    if not self.enabled:
      return
    eta = (self.total - step) * self.batch / self.images_per_s
    eta_text = (str(datetime.timedelta(seconds=int(eta))) if np.isfinite(eta) else "?")
    terms = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in scalars.items()
                     if k.startswith("loss_"))
    line = (f"step {step}/{self.total} (epoch {step / self.per_epoch:.2f}) | "
            f"loss {scalars['loss']:.4f}{f' ({terms})' if terms else ''} | "
            f"{self.images_per_s:.1f} img/s, "
            f"data wait {scalars['data_wait']:.0%} | ETA {eta_text}")
    sys.stderr.write(("\r" + line + "\033[K") if self._tty else line + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled and self._tty:
      sys.stderr.write("\n")
