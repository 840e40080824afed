"""THE trainer: mesh, data, state, one pure update step, the loop, checkpoints, logging.

Methods plug in through `anatjax.methods.Method`; nothing below knows which one runs.
The train state is a plain dict {step, params, opt_state, method_state}, placed on the
mesh by the sharding rules, updated by one jitted, donated, pure step:

    (state, batch) -> (state, metrics),  randomness = fold_in(seed, step)

so a run killed anywhere and restarted with the same command continues from its last
checkpoint and produces the numbers it would have produced uninterrupted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from anatjax import checkpoint, config as config_lib, export, methods, reporting, sharding
from anatjax.data import bad_files, pipeline, sources


class NonFiniteLoss(RuntimeError):
  pass


class StopRequest:
  """A request to save and stop at a step boundary (SIGTERM, SIGINT, preemption).

  One process: SIGTERM and SIGINT set the request, checked after every step. Several
  processes: every process must stop after the same step, so SIGTERM is left to JAX's
  preemption service, which tells all processes and agrees on a common step
  (`reached_preemption_sync_point`, asked after every step).
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def requested(self, step: int) -> bool:
    if self._multiprocess and multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = "SIGTERM"
    return self.signal_name is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class TimedIterator:
  """Counts the seconds the loop spends waiting for its next batch (the device idles
  then, unless earlier steps are still queued): the host pipeline's report card."""

  def __init__(self, iterator):
    self._iterator = iterator
    self.wait_s = 0.0

  def __next__(self):
    start = time.perf_counter()
    item = next(self._iterator)
    self.wait_s += time.perf_counter() - start
    return item


class Profiler:
  """A JAX profiler trace of steps [start_step, start_step + num_steps) (off when
  num_steps is 0), written to WORKDIR/profile for TensorBoard/XProf, with a Perfetto
  trace (perfetto_trace.json.gz) that can be read without them."""

  def __init__(self, directory: str, start_step: int, num_steps: int, enabled: bool):
    self.directory, self.start, self.stop_step = directory, start_step, start_step + num_steps
    self.enabled, self.running = enabled and num_steps > 0, False

  def at_step(self, step: int) -> None:
    """Call before running step `step` (0-based)."""
    if self.enabled and step == self.start and not self.running:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.running = True
    elif self.running and step == self.stop_step:
      self.stop()

  def stop(self) -> None:
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
      say(f"Wrote a profile of steps {self.start}-{self.stop_step - 1} to {self.directory}")


def build(config):
  """(source, schedule, method) for a config; fails on bad names before any compiling."""
  source = sources.make_source(config.data)
  schedule = config_lib.Schedule.from_config(
      config, sources.examples_per_epoch(source, config.batch_size))
  return source, schedule, methods.make(config, schedule)


def state_initializer(method):
  """key -> the initial train state {step, params, opt_state, method_state}."""
  def init_state(key):
    params, method_state = method.init(key)
    return {"step": jnp.zeros([], jnp.int32), "params": params,
            "opt_state": method.optimizer.init(params), "method_state": method_state}
  return init_state


def with_pretrained_encoder(config, method, state):
  """The initial state with the encoder weights of `config.init_from` (a timm-style
  .safetensors, a big_vision .npz or a weights-only PyTorch checkpoint)."""
  def load(target):
    return export.import_encoder(config.init_from, target,
                                 image_size=config.data.image_size)
  params, method_state = method.with_encoder(state["params"], state["method_state"], load)
  return dict(state, params=params, method_state=method_state)


def make_train_step(method, step_key, accumulate: int = 1, mesh=None):
  """The pure update: (state, batch) -> (state, metrics), randomness fold_in(key, step).

  With `accumulate` > 1 the gradient is summed over that many micro-batches inside the
  step (a lax.scan), which still is one optimiser step on the whole global batch: the
  method's `prepare` sees the whole batch and its loss is normalised batch-wide.
  """
  grad_fn = jax.grad(method.loss, has_aux=True)

  def train_step(state, batch):
    step, params = state["step"], state["params"]
    rng = jax.random.fold_in(step_key, step)
    method_state, context, metrics = method.prepare(
        params, state["method_state"], batch, step)
    # Per-example results of `prepare` (teacher outputs, say) travel with the batch, so
    # micro-batches split them together.
    batch = {**batch, **context.pop("per_example", {})}

    def micro_grads(i, micro):
      return grad_fn(params, method_state, context, micro, jax.random.fold_in(rng, i), step)

    if accumulate == 1:
      grads, loss_metrics = micro_grads(0, batch)
    else:
      micro = jax.tree.map(lambda x: split_micro_batches(x, accumulate, mesh), batch)
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
          micro_grads, 0, jax.tree.map(lambda x: x[0], micro)))

      def add_micro(total, xs):
        return jax.tree.map(jnp.add, total, micro_grads(*xs)), None
      (grads, loss_metrics), _ = jax.lax.scan(add_micro, zeros,
                                              (jnp.arange(accumulate), micro))

    forward_state = loss_metrics.pop("method_state", {})   # summed over micro-batches
    method_state = {**method_state,
                    **jax.tree.map(lambda x: x / accumulate, forward_state)}
    updates, opt_state = method.optimizer.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    method_state = method.after_update(params, method_state, step)
    metrics = {**metrics, **loss_metrics, "grad_norm": optax.tree.norm(grads)}
    return ({"step": step + 1, "params": params, "opt_state": opt_state,
             "method_state": method_state}, metrics)
  return train_step


def split_micro_batches(x, count: int, mesh=None):
  """[B, ...] -> [count, B/count, ...], micro-batch i = examples i, i+count, ...

  Strided rather than contiguous, so that every micro-batch draws evenly from each
  device's shard of the batch and stays spread over all devices.
  """
  x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  if mesh is not None:
    spec = sharding.P(None, sharding.AXES, *([None] * (x.ndim - 2)))
    x = jax.lax.with_sharding_constraint(x, sharding.NamedSharding(mesh, spec))
  return x


def load_checkpoint(workdir: str, step: int | None = None):
  """(config, method, state, step) of a run's checkpoint (default: the newest), on host.

  For tools that read trained weights (export, evaluation): the config is the one saved
  in the checkpoint, the state comes back as NumPy arrays, the data position is ignored.
  """
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ckpt.existing_step(step)
    meta = ckpt.read_meta(step)
    config = ml_collections.ConfigDict(meta["config"])
    if "schedule" in meta:   # no data needed (a 3-D store need not exist on this machine)
      method = methods.make(config, config_lib.Schedule(**meta["schedule"]))
    else:                    # a checkpoint from before the schedule was saved with it
      _, _, method = build(config)
    abstract = jax.eval_shape(state_initializer(method), jax.random.key(0))
    state = ckpt.read_state(step, abstract)
  finally:
    ckpt.close()
  return config, method, state, step


def train(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its checkpoints). Returns a summary."""
  # ---------------------------------------------------------------- setup + data
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  source, schedule, method = build(config)
  # Image files: unusable ones are skipped, counted and reported (anatjax/data/bad_files).
  source, bad_file_report = bad_files.guard(source, workdir, config.data.max_bad_fraction,
                                            jax.process_index(), say)
  mesh = sharding.make_mesh(config.mesh)
  if config.batch_size % (mesh.size * config.grad_accum_steps):
    raise ValueError(
        f"config batch_size={config.batch_size} does not divide into "
        f"grad_accum_steps={config.grad_accum_steps} micro-batches over the {mesh.size} "
        f"devices of the mesh {dict(mesh.shape)}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config batch_size={config.batch_size} does not divide over "
                     f"{jax.process_count()} processes")

  def data_from(start_batch):
    return iter(pipeline.make_dataset(
        source, method.host_transforms, batch_size=config.batch_size // jax.process_count(),
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers,
        start_batch=start_batch))

  iterator = data_from(0)
  config_hash = config_lib.config_hash(config)
  say(f"{method.name} on {config.data.source} ({len(source)} examples, "
      f"{config.data.image_size} px): {schedule.total_steps} steps of batch "
      f"{config.batch_size} ({schedule.total_steps / schedule.steps_per_epoch:.1f} epochs "
      f"of {schedule.steps_per_epoch} steps) on {mesh.size} device(s) "
      f"{dict(mesh.shape)}, workdir {workdir}")

  # ---------------------------------------------------------------- state
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  init_state = state_initializer(method)
  abstract = jax.eval_shape(init_state, init_key)
  state_shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)

  def check_meta(meta):
    if meta.get("config_hash") != config_hash and not config.allow_config_change:
      raise ValueError(
          f"The checkpoint at step {meta.get('step')} in {ckpt.directory} was trained with "
          f"another config (hash {meta.get('config_hash')} vs {config_hash} now; see "
          f"{workdir}/config.json for the saved one). Resume with the original config, "
          "use a new --workdir, or pass --config.allow_config_change=True.")

  restored = ckpt.restore_latest(
      jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                   abstract, state_shardings),
      iterator, check_meta)
  if restored:
    start_step, state, _, data_restored = restored
    say(f"Resumed from {ckpt.directory}/{start_step}.")
    if not data_restored:
      # Saved by another number of processes: the data stream is the same for any
      # process count (see pipeline.make_dataset), so start it at the step's batch.
      iterator.close()
      iterator = data_from(start_step)
      say(f"The checkpoint was written by {ckpt.saved_process_count(start_step)} "
          f"process(es), this run has {jax.process_count()}: the data resumes at global "
          f"batch {start_step} of the same stream.")
  else:
    start_step = 0
    state = jax.jit(init_state, out_shardings=state_shardings)(init_key)
    if config.init_from:
      state = jax.device_put(with_pretrained_encoder(config, method, state),
                             state_shardings)
      say(f"Initialised the encoder from {config.init_from}.")
    if method.warm_start:
      params, method_state, done = method.warm_start(state["params"], state["method_state"])
      state = jax.device_put(dict(state, params=params, method_state=method_state),
                             state_shardings)
      say(done)

  if is_main:  # only now: a refused resume leaves the run's own config.json in place
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)

  # ---------------------------------------------------------------- compile + loop
  total = schedule.total_steps
  if start_step >= total:
    iterator.close()
    ckpt.close()
    say(f"{workdir} is already trained to step {start_step} of {total}.")
    return summary(workdir, start_step, start_step, total, None, [], state)

  # The first batch is read now to give the step its input shapes; the first step uses it.
  first_batch = sharding.global_batch(next(iterator), mesh)
  batches = TimedIterator(itertools.chain(
      [first_batch], (sharding.global_batch(b, mesh) for b in iterator)))
  compiled = jax.jit(
      make_train_step(method, step_key, config.grad_accum_steps, mesh),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.NamedSharding(mesh, sharding.P())),
      donate_argnums=0).lower(state, first_batch).compile()
  say(memory_report(compiled))

  checkpoint_every = schedule.steps(config.checkpoint.every, "checkpoint.every")
  meta = {"method": method.name, "config_hash": config_hash,
          "config": json.loads(json.dumps(config.to_dict(), default=str)),
          "schedule": dataclasses.asdict(schedule)}
  writer = reporting.MetricsWriter(workdir, enabled=is_main)
  progress = reporting.Progress(total, schedule.steps_per_epoch, config.batch_size,
                                start_step, enabled=is_main)
  history = []
  profiler = Profiler(os.path.join(workdir, "profile"), config.profile.start_step,
                      config.profile.num_steps, enabled=is_main)

  def finish_step(step, metrics):
    """Host side of step `step` (1-based count of steps done): check, log."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for name in ("loss", *sorted(k for k in scalars if k.startswith("loss_"))):
      if not np.isfinite(scalars[name]):
        raise NonFiniteLoss(
            f"{name} is {scalars[name]} at step {step}. The run stopped without saving "
            f"this state; the last good checkpoint is {ckpt.steps()[-1:] or 'none'} in "
            f"{ckpt.directory}. Lower the learning rate or check the data, then rerun.")
    if step % config.log_every == 0 or step == total:
      scalars.update({k: float(fn(step - 1)) for k, fn in method.schedules.items()})
      if bad_file_report:
        scalars["bad_files"] = bad_file_report.poll(say)
      progress.update(step, scalars, batches.wait_s)  # adds images_per_s, data_wait
      writer.write(step, scalars)
    history.append((step, scalars["loss"]))

  step, pending, stop = start_step, None, StopRequest()
  try:
    with stop:
      while step < total:
        profiler.at_step(step)
        state, metrics = compiled(state, next(batches))
        step += 1
        if pending:  # the previous step's numbers: fetching them does not stall the device
          finish_step(*pending)
        pending = (step, metrics)
        stopping = stop.requested(step)
        if step % checkpoint_every == 0 or step == total or stopping:
          finish_step(*pending)  # never save a state whose loss was not finite
          pending = None
          ckpt.save(step, state, iterator, meta)
        if stopping:
          break
      if pending:
        finish_step(*pending)
  finally:
    profiler.stop()
    iterator.close()  # stops the Grain workers and frees their shared memory
    ckpt.wait()
    ckpt.close()
    writer.close()
    progress.close()

  if stop.signal_name:
    say(f"Stopped on {stop.signal_name} after step {step}; checkpoint saved in "
        f"{ckpt.directory}/{step}. Run the same command again to resume.")
  return summary(workdir, start_step, step, total, stop.signal_name, history, state)


def summary(workdir, start_step, step, total_steps, stopped_by, losses, state) -> dict:
  """What `train` returns: where the run is, how it ended, [(step, loss)], final state."""
  return {"workdir": workdir, "start_step": start_step, "step": step,
          "total_steps": total_steps, "stopped_by": stopped_by, "losses": losses,
          "state": state}


def say(message: str) -> None:
  """A line for the user, from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def memory_report(compiled) -> str:
  stats = compiled.memory_analysis()
  if stats is None:
    return "Compiled the train step (no memory analysis on this backend)."
  mib = 2 ** 20
  return (f"Compiled the train step. Per device: arguments "
          f"{stats.argument_size_in_bytes / mib:.1f} MiB, outputs "
          f"{stats.output_size_in_bytes / mib:.1f} MiB, temporaries "
          f"{stats.temp_size_in_bytes / mib:.1f} MiB.")
