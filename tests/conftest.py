"""Test set-up, before JAX is imported: 8 simulated CPU devices, a compilation cache shared
by the whole session (many tests compile the same tiny train step), and absl flags marked
parsed (Grain worker processes read them)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="anatjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from absl import flags  # noqa: E402  (after the environment is set)

flags.FLAGS.mark_as_parsed()
