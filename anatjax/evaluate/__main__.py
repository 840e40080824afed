"""`python -m anatjax.evaluate --config=configs/eval/<protocol>.py[:args] --init=INIT
[--workdir=OUT] [--step=N]`, or the whole benchmark (pretraining included, no --init):
`python -m anatjax.evaluate --config=configs/eval/synthcxr_benchmark.py[:args]`.

INIT is 'random' (the encoder of the config's model block, untrained), a training run's
directory (its newest checkpoint, or --step; the teacher unless --config.which=student),
or an encoder weights file (.safetensors / .npz / .pth, through anatjax.export, in the
architecture of the config's model block). Writes OUT/results.json (every metric with its
protocol, label fraction, seed and init), OUT/results.md and OUT/figures/; prints the
Markdown summary. Default OUT: RUN_DIR/eval/<config> for a run, else
workdirs/eval/<config>_<init name>.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from anatjax.config import config_name

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config, e.g. configs/eval/cxr_probe.py:runlocal",
    lock_config=True)
_INIT = flags.DEFINE_string(
    "init", None, "'random', a training run directory, or an encoder weights file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results go (see the module doc).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a run (default: newest).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str, init: str) -> str:
  name = config_name(config_arg)
  if os.path.isdir(init):
    return os.path.join(init, "eval", name)
  stem = "random" if init == "random" else os.path.splitext(os.path.basename(init))[0]
  return os.path.join("workdirs", "eval", f"{name}_{stem}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from anatjax import evaluate  # pylint: disable=g-import-not-at-top  (after flag parsing)
  config_arg = flags.FLAGS["config"].serialize().split("=", 1)[1]
  if _CONFIG.value.protocol == "benchmark":
    run_benchmark(config_arg)
    return
  if _INIT.value is None:
    sys.exit("Error: --init is required: 'random', a training run directory or a weights "
             "file.")
  workdir = _WORKDIR.value or default_workdir(config_arg, _INIT.value)
  try:
    results = evaluate.evaluate(_CONFIG.value, _INIT.value, workdir, step=_STEP.value,
                                log=lambda s: print(s, flush=True))
  except evaluate.SetupError as e:
    sys.exit(f"Error: {e}")
  print()
  print(open(os.path.join(workdir, "results.md")).read(), flush=True)
  print(f"Outputs in {os.path.abspath(workdir)}: "
        f"{', '.join(['results.json', 'results.md', *results['figures']])}", flush=True)


def run_benchmark(config_arg: str):
  from anatjax.evaluate import benchmark  # pylint: disable=g-import-not-at-top
  if _INIT.value is not None:
    sys.exit("Error: the benchmark pretrains its own encoders: drop --init.")
  workdir = _WORKDIR.value or os.path.join("workdirs", "eval", config_name(config_arg))
  results = benchmark.run(_CONFIG.value, workdir, log=lambda s: print(s, flush=True))
  print()
  print(open(os.path.join(workdir, "results.md")).read(), flush=True)
  print(f"Outputs in {os.path.abspath(workdir)}: "
        f"{', '.join(['results.json', 'results.md', *results['figures']])}", flush=True)


def parse_flags(argv):
  """absl parsing with a config error (unknown key or argument) as one short message.

  (anatjax.main has the same helper, but importing it would define its own --config.)
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    text = re.split(r"\b\w+Error: ", text)[-1]   # a config file's error, without traceback
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    sys.exit(f"Bad flag or config: {message.strip(chr(39))}\nPass --helpfull to see the flags.")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
