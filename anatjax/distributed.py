"""Multi-process runs on JAX's own multi-controller runtime (`jax.distributed`).

A run is multi-process when it is launched as several processes: by SLURM (srun with more
than one task), on a multi-host TPU VM pod, or with explicit `--coordinator_address`,
`--num_processes` and `--process_id` (anything else: Kubernetes, a laptop). Only then is
`jax.distributed.initialize` called; a single-process run never touches it.
"""

from __future__ import annotations

import os

import jax


def launch_kind(coordinator_address, num_processes, process_id) -> str | None:
  """'flags', 'slurm', 'tpu' or None (a single process)."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    missing = [name for name, v in zip(
        ("--coordinator_address", "--num_processes", "--process_id"), explicit) if v is None]
    if missing:
      raise ValueError(f"Multi-process flags given without {', '.join(missing)}: pass all "
                       "three (e.g. --coordinator_address=10.0.0.1:12345 "
                       "--num_processes=2 --process_id=0), or none.")
    return "flags"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "slurm"
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "tpu"
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               timeout_s: int = 300) -> bool:
  """Joins the other processes of a multi-process run; returns whether it is one.

  SLURM and TPU pods are detected by JAX itself from their environment; explicit flags
  override. CPU processes talk through gloo (the CPU collectives of jaxlib).
  """
  kind = launch_kind(coordinator_address, num_processes, process_id)
  if kind is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"Could not join the multi-process run (detected from {kind}) within {timeout_s} s: "
        f"{type(e).__name__}: {e}. Check that every process was started with the same "
        "coordinator address, that the coordinator (process 0) is reachable on that port, "
        "and that --num_processes matches the processes launched.") from e
  return True
