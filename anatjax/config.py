"""Config helpers: typed `get_config(arg)` arguments, durations, and checks.

Config files take one string argument, e.g. `configs/afire_vitb.py:variant=S/16,runlocal`.
`parse_arg` turns it into typed fields, with defaults that name the allowed keys, so a
mistyped argument fails with the closest valid names before anything compiles.

Durations (training length, warm-up, checkpoint interval, ...) are strings with a unit:
`"400ep"` (epochs), `"5000st"` (steps) or `"2e6ex"` (examples). A bare number means steps.
They become steps once the dataset size and the batch size are known (`Schedule`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping

import ml_collections


def closest(name: str, candidates) -> str:
  """A ' Did you mean ...?' hint, or '' when nothing is close."""
  matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
  return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,flag,...' into a ConfigDict typed by `defaults`.

  A bare `flag` sets a boolean default to True. Values are cast to the type of the
  default; unknown keys raise a ValueError naming the closest known keys.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r}; known: {sorted(defaults)}."
          + closest(key, defaults))
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value: {key}=...")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      result[key] = value.lower() in ("true", "1")
    else:
      result[key] = type(default)(value)
  return result


_DURATION = re.compile(r"^\s*([0-9.eE+]+)\s*(ep|st|ex)?\s*$")


def duration_to_steps(value, *, steps_per_epoch: int, batch_size: int,
                      name: str = "duration") -> int:
  """'400ep' | '5000st' | '2e6ex' | 5000 -> a whole number of steps."""
  match = _DURATION.match(str(value))
  if not match:
    raise ValueError(
        f"config {name}={value!r}: expected a number with unit ep (epochs), "
        "st (steps) or ex (examples), e.g. '400ep', '5000st', '2e6ex'.")
  amount, unit = float(match.group(1)), match.group(2) or "st"
  steps = {"ep": amount * steps_per_epoch, "st": amount,
           "ex": amount / batch_size}[unit]
  return int(math.ceil(steps - 1e-9))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a run is, in steps. Built once from the config and the data size."""
  batch_size: int
  steps_per_epoch: int
  total_steps: int

  @classmethod
  def from_config(cls, config, num_examples: int) -> "Schedule":
    batch = config.batch_size
    examples_per_epoch = num_examples * config.data.repeats_per_epoch
    steps_per_epoch = examples_per_epoch // batch
    if steps_per_epoch < 1:
      raise ValueError(
          f"config batch_size={batch} is larger than one epoch of data "
          f"({num_examples} examples x data.repeats_per_epoch="
          f"{config.data.repeats_per_epoch}); lower the batch size or add data.")
    total = duration_to_steps(config.duration, steps_per_epoch=steps_per_epoch,
                              batch_size=batch, name="duration")
    return cls(batch, steps_per_epoch, max(total, 1))

  def steps(self, value, name: str) -> int:
    return duration_to_steps(value, steps_per_epoch=self.steps_per_epoch,
                             batch_size=self.batch_size, name=name)


# Keys that steer how a run is executed or observed, not what it computes; changing them
# between a checkpoint and a resume is always allowed (e.g. moving to other hardware:
# the state restores onto any mesh, and accumulation gives the same step).
RUN_CONTROL_KEYS = ("allow_config_change", "log_every", "data.num_workers",
                    "checkpoint.keep", "checkpoint.async_save", "mesh.data", "mesh.fsdp",
                    "sharding_rules", "grad_accum_steps", "model.remat",
                    "profile.start_step", "profile.num_steps", "data.max_bad_fraction")


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A stable hash of what the config trains (run-control keys excluded)."""
  flat = flatten(config.to_dict())
  for key in RUN_CONTROL_KEYS:
    flat.pop(key, None)
  text = json.dumps(flat, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: Mapping, sep: str = ".", prefix: str = "") -> dict:
  """Nested mappings -> {'a.b.c': leaf} (joined by `sep`)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, sep, path + sep))
    else:
      out[path] = value
  return out


def compute_dtype(name: str):
  """The matmul/activation dtype: 'float32', 'bfloat16', or 'auto' (bfloat16 on GPU and
  TPU, float32 on CPU, where XLA runs bfloat16 matmuls slower than float32)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if name == "auto":
    import jax  # pylint: disable=g-import-not-at-top
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config model.dtype={name!r}: use 'auto', 'float32' or 'bfloat16'")
  return jnp.dtype(name)


def config_name(config_arg: str) -> str:
  """A --config argument as a directory name for default workdirs:
  'configs/eval/cxr_probe.py:runlocal,num_seeds=3' -> 'cxr_probe_runlocal_num_seeds-3'."""
  path, _, args = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if args:
    name += "_" + re.sub(r"[^A-Za-z0-9_.-]+", "", args.replace(",", "_").replace("=", "-"))
  return name
