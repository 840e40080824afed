import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/local_multiprocess.sh", "launch/slurm_gpu.sbatch", "launch/tpu_pod.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_parses_and_prints_usage(script):
  path = os.path.join(REPO, script)
  subprocess.run(["bash", "-n", path], check=True)
  if shutil.which("shellcheck"):
    subprocess.run(["shellcheck", path], check=True)
  usage = subprocess.run(["bash", path], capture_output=True, text=True)
  assert usage.returncode == 2 and "Usage:" in usage.stderr
