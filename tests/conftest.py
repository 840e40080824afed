"""Test set-up: 8 simulated CPU devices, absl flags marked parsed (Grain workers read them)."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402  (after the environment is set)

flags.FLAGS.mark_as_parsed()
