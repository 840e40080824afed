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
