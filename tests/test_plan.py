import os
import subprocess
import sys

import jax
import numpy as np

from anatjax import plan, train
from tiny import tiny_config


def test_fsdp_divides_the_state_that_data_parallelism_replicates():
  replicated = plan.plan(tiny_config(mesh=dict(data=8, fsdp=1)))
  sharded = plan.plan(tiny_config(mesh=dict(data=1, fsdp=8)))
  _, _, method = train.build(tiny_config())
  params, _ = jax.eval_shape(method.init, jax.random.key(0))
  leaves = jax.tree.leaves(params)
  total = sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves)
  assert replicated["params"] == total  # every device holds everything
  # FSDP: tensors of >= 4096 elements with a dimension divisible by 8 are split 8 ways.
  split = sum(np.prod(x.shape) * x.dtype.itemsize
              / (8 if x.size >= 4096 and any(d % 8 == 0 for d in x.shape) else 1)
              for x in leaves)
  assert sharded["params"] == split < total
  assert sharded["opt_state"] < replicated["opt_state"]
  assert replicated["batch"] == sharded["batch"]  # the batch is split 8 ways either way
  assert replicated["temporaries"] > 0
  assert replicated["total"] == sum(replicated[k] for k in (
      "params", "opt_state", "method_state", "batch", "temporaries"))


REMAT_PROBE = """
import jax, jax.numpy as jnp
def block(w, x):
  return x + jax.nn.gelu(x @ w[0]) @ w[1]
def loss(ws, x, remat):
  for w in ws:
    x = (jax.checkpoint(block) if remat else block)(w, x)
  return jnp.sum(x ** 2)
ws = [(jnp.ones((64, 256)), jnp.ones((256, 64))) for _ in range(16)]
x = jnp.ones((512, 64))
print(*(jax.jit(jax.grad(lambda ws, x: loss(ws, x, r))).lower(ws, x).compile()
        .memory_analysis().temp_size_in_bytes for r in (False, True)))
"""


def test_the_planning_scheduler_shows_what_remat_saves():
  """Under the flag `python -m anatjax.plan` compiles with, checkpointed blocks keep only
  their inputs: a 16-block MLP's gradient needs far fewer temporaries (each block's
  hidden activations are 4x its input)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": plan.MEMORY_SCHEDULER}
  out = subprocess.run([sys.executable, "-c", REMAT_PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  stored, rematerialised = map(int, out.split())
  assert rematerialised < 0.6 * stored
