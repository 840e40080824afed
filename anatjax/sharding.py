"""Device mesh, parameter placement rules and global batches.

The mesh has axes ('data', 'fsdp'), both with Auto axis types (jax.make_mesh defaults to
Explicit, under which Flax's sharding annotations become hard assertions). Batches are
split over both axes; parameters, optimiser and method state are placed by an ordered
(regex, rule) table matched against each leaf's path:
  'fsdp'       shard the largest dimension that divides evenly over the 'fsdp' axis
               (arrays smaller than `min_fsdp_size` elements stay replicated);
  'replicate'  a full copy on every device.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from anatjax.optim import path_str

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
DEFAULT_RULES = ((".*", "fsdp"),)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh. One size may be -1 (all remaining devices).

  With explicit sizes whose product is smaller than the device count, the first devices
  are used (e.g. data=1,fsdp=1 runs on one device of many).
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = [mesh_config.data, mesh_config.fsdp]
  if shape.count(-1) > 1:
    raise ValueError("config mesh: at most one of mesh.data, mesh.fsdp may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"config mesh={tuple(shape)}: {len(devices)} devices do not divide "
                       f"into groups of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices):
    raise ValueError(f"config mesh data={shape[0]} x fsdp={shape[1]} needs "
                     f"{math.prod(shape)} devices; {len(devices)} available")
  return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:math.prod(shape)])


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh, rules=DEFAULT_RULES, min_fsdp_size: int = 2 ** 12):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
  fsdp_size = mesh.shape["fsdp"]

  def place(path, leaf):
    name = path_str(path)
    rule = next((r for rx, r in compiled if rx.search(name)), "replicate")
    if rule == "fsdp":
      spec = fsdp_spec(np.shape(leaf), fsdp_size, min_fsdp_size)
    elif rule == "replicate":
      spec = P()
    else:
      raise ValueError(f"sharding rule {rule!r} for {name!r}: use 'fsdp' or 'replicate'")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(place, tree)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def global_batch(local_batch: dict, mesh) -> dict:
  """This process's share of the batch (numpy) -> global arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
