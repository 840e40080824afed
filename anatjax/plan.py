"""Capacity planning without the hardware: per-device memory of a train step on a mesh.

  python -m anatjax.plan --config=configs/afire_vitb.py --devices=64 \
      --config.mesh.fsdp=8 --config.batch_size=1024

Compiles the real train step ahead of time for `--devices` simulated CPU devices and the
config's mesh, and prints what each device holds: parameters, optimiser state and method
state (from the sharding rules) and the step's temporaries (activations and workspace,
from the compiled executable). The state shares are exact. The temporaries are what XLA's
CPU compiler allocates under its memory-oriented scheduler (MEMORY_SCHEDULER below;
without it `model.remat` shows no saving at all): a CPU schedule, not the GPU/TPU one, so
read them as an estimate and confirm with `python -m anatjax.benchmark` on the target.
`--compile=false` prints the state shares only, in seconds.
"""

from __future__ import annotations

import os
import re
import sys


def _simulated_devices(argv) -> int:
  """--devices=N, read before JAX starts (the CPU device count is fixed at start-up)."""
  for arg in argv:
    match = re.fullmatch(r"--devices=(\d+)", arg)
    if match:
      return int(match.group(1))
  return 8


# XLA:CPU's default scheduler favours concurrency: it runs recomputed (rematerialised)
# blocks early, so their activations are live as long as without remat, and `model.remat`
# shows no saving at all (a 24-block MLP's gradient: 2504 MiB of temporaries with or
# without jax.checkpoint). The memory-oriented scheduler is the one to plan with (1096 MiB
# with checkpointing there).
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_NUM_CPU_DEVICES"] = str(_simulated_devices(sys.argv))
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER}".strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from anatjax import sharding, train
from anatjax.data import pipeline

def define_flags():
  """The command's flags (defined only when run as a command; see benchmark.py)."""
  config_flags.DEFINE_config_file("config", None, "The recipe to plan.", lock_config=True)
  flags.DEFINE_integer("devices", 8, "Simulated devices (the mesh may use fewer).")
  flags.DEFINE_bool(
      "compile", True, "Compile the step for its temporaries; without, only the state "
      "and batch shares (exact, from the sharding rules, and fast).")
  flags.mark_flags_as_required(["config"])


def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a tree placed by `shardings`."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shape = s.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def batch_spec(config, source, method):
  """The global batch's shapes, from one example through the method's host transforms."""
  example = pipeline.transform_one(source[0], method.host_transforms,
                                   np.random.default_rng(0))
  return {k: jax.ShapeDtypeStruct((config.batch_size,) + np.shape(v), np.asarray(v).dtype)
          for k, v in example.items()}


def plan(config, compile_step: bool = True) -> dict:
  """Bytes per device: params, opt_state, method_state, batch, temporaries, total."""
  source, _, method = train.build(config)
  mesh = sharding.make_mesh(config.mesh)
  abstract = jax.eval_shape(train.state_initializer(method), jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  batch = batch_spec(config, source, method)
  result = {key: shard_bytes(abstract[key], shardings[key])
            for key in ("params", "opt_state", "method_state")}
  result["batch"] = shard_bytes(batch, jax.tree.map(
      lambda _: sharding.batch_sharding(mesh), batch))
  if compile_step:
    step = train.make_train_step(method, jax.random.key(0), config.grad_accum_steps, mesh)
    compiled = jax.jit(
        step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.NamedSharding(mesh, sharding.P())),
        donate_argnums=0).lower(abstract, batch).compile()
    result["temporaries"] = compiled.memory_analysis().temp_size_in_bytes
  result["total"] = sum(result.values())
  result["mesh"] = dict(mesh.shape)
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  result = plan(config, flags.FLAGS.compile)
  mib = 2 ** 20
  print(f"{config.method} {config.model.variant} at {config.data.image_size} px, global "
        f"batch {config.batch_size}, grad_accum_steps={config.grad_accum_steps}, "
        f"model.dtype={config.model.dtype}, model.remat={config.model.remat}, "
        f"mesh {result['mesh']}:")
  for key in ("params", "opt_state", "method_state", "batch", "temporaries", "total"):
    if key in result:
      print(f"  {key:13} {result[key] / mib:10.1f} MiB per device")


if __name__ == "__main__":
  define_flags()
  app.run(main)
