"""Entry point: `python -m anatjax.main --config=configs/<recipe>.py[:args] [--workdir=DIR]`.

Flags only: which config, where the run lives (default workdirs/<config name>), the
overrides `--config.<key>=<value>`, and how to join a multi-process run (see
anatjax/distributed.py). Running the same command again resumes the run.
"""

from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from anatjax import distributed, train as trainer
from anatjax.config import config_name

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':args', e.g. configs/afire_vitb.py:runlocal",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, metrics, config). "
    "Default: workdirs/<config file name>[_<args>].")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs launched by hand: host:port of process "
    "0 (SLURM and TPU pods are detected without flags).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for all processes to join.")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  """'configs/afire_vitb.py:variant=S/16,runlocal' -> 'workdirs/afire_vitb_variant-S16_runlocal'."""
  return os.path.join("workdirs", config_name(config_arg))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter; --verbosity=0 shows it
  multiprocess = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value, _INIT_TIMEOUT.value)
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().split("=", 1)[1])
  try:
    summary = trainer.train(config, workdir)
  except trainer.NonFiniteLoss as e:
    logging.error("%s", e)
    sys.exit(1)
  if multiprocess:  # leave together: no process exits while others still save
    multihost_utils.sync_global_devices("anatjax_main_done")
  if jax.process_index():
    return
  losses = summary["losses"]
  print(f"Outputs in {os.path.abspath(workdir)}: checkpoints/, metrics.jsonl, "
        "tensorboard/, config.json", flush=True)
  if losses:
    (s0, l0), (s1, l1) = losses[0], losses[-1]
    print(f"Loss went from {l0:.4f} (step {s0}) to {l1:.4f} (step {s1}); "
          f"{summary['step']}/{summary['total_steps']} steps done.", flush=True)


def parse_flags(argv):
  """absl parsing, with config errors (unknown keys, bad values) as one clear message."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    # Errors raised inside a config file arrive wrapped with their traceback: keep the
    # message at its end.
    text = re.split(r"\b\w+Error: ", text)[-1]
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if len(message) > 1 and message[0] == message[-1] == "'":  # a KeyError's quoting
      message = message[1:-1]
    sys.exit(f"Bad flag or config: {message}\n"
             "Pass --helpfull to see the flags.")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
