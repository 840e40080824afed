"""Two CPU processes on 127.0.0.1 (gloo collectives), launched by launch/local_multiprocess.sh.

One run covers the multi-process contract: two processes x two devices train the same
numbers as one process x four devices; SIGTERM to one process makes both save the same
step and exit 0; that checkpoint resumes in a single process, with the data picking up
at the right global batch, and the numbers stay those of the uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from anatjax import reporting, train
from configs import afire_vitb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"duration": "60st", "log_every": 1, "batch_size": 16, "data.image_size": 32,
             "data.num_workers": 0, "model.variant": "mu/8", "model.depth": 0,
             "checkpoint.every": "1000st"}


def config_with(**extra):
  config = afire_vitb.get_config("runlocal")
  for key, value in {**OVERRIDES, **extra}.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in reporting.read_metrics(str(workdir))}


@pytest.mark.skipif(sys.platform != "linux", reason="uses pgrep and process groups")
def test_two_processes_match_one_stop_together_and_resume_in_one(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, LOG_DIR=str(tmp_path), PATH=os.path.dirname(sys.executable)
             + os.pathsep + os.environ["PATH"])
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  script = subprocess.Popen(
      ["bash", "launch/local_multiprocess.sh", "2", "2", "--",
       "--config=configs/afire_vitb.py:runlocal", f"--workdir={workdir}",
       "--initialization_timeout=120", *flags],
      cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      start_new_session=True)
  try:
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists() or len(losses_by_step(workdir)) < 3:
      assert script.poll() is None and time.time() < deadline, script.communicate()[0]
      time.sleep(0.2)
    children = subprocess.run(["pgrep", "-f", "-P", str(script.pid), "process_id=1"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGTERM)  # only the second process is told
    out, _ = script.communicate(timeout=240)
  finally:
    if script.poll() is None:
      os.killpg(script.pid, signal.SIGKILL)
  assert script.returncode == 0, out
  stopped = int(out.split("Stopped on SIGTERM after step ")[1].split(";")[0])
  assert stopped < 60
  saved = workdir / "checkpoints" / str(stopped) / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(saved))
  states = [json.loads((saved / f"process_{p}-of-2.json").read_text()) for p in range(2)]
  # Both at the batch of the saved step, each in its own slice of the stream (disjoint
  # halves: tests/test_pipeline.py).
  assert states[0]["next_index"] == states[1]["next_index"] == stopped
  two_process = losses_by_step(workdir)

  # The same run in one process on four devices, uninterrupted.
  reference = train.train(config_with(**{"mesh.data": 4}), str(tmp_path / "reference"))
  want = dict(reference["losses"])
  np.testing.assert_allclose([two_process[s] for s in range(1, stopped + 1)],
                             [want[s] for s in range(1, stopped + 1)], atol=1e-5)

  # The two-process checkpoint resumes in one process and finishes the same run.
  resumed = train.train(config_with(**{"mesh.data": 4}), str(workdir))
  assert resumed["start_step"] == stopped and resumed["step"] == 60
  np.testing.assert_allclose([l for _, l in resumed["losses"]],
                             [want[s] for s in range(stopped + 1, 61)], atol=1e-5)
