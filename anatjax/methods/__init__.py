"""Self-supervised methods. Each module's `make(config, schedule)` returns a `Method`.

A method is data plus pure functions; the trainer calls them without knowing which method
runs. The train state the trainer keeps is {step, params, opt_state, method_state}: `params`
is what the optimiser updates, `method_state` everything else the method carries across
steps (EMA teachers, prototype buffers, queues, BatchNorm running statistics), updated
inside the jitted step.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import optax

from anatjax.config import closest

METHODS = ("afire", "mae", "dino", "ld", "drasclr", "alice", "anatomy_embedding")


class Method(NamedTuple):
  name: str
  # rng -> (params, method_state)
  init: Callable[[Any], tuple[Any, Any]]
  # (params, method_state, batch, step) -> (method_state, context, metrics): the
  # gradient-free work on the whole global batch before the loss (teacher passes,
  # targets, batch-wide normalisers). Arrays under context["per_example"] (leading axis =
  # batch) are merged into the batch that `loss` sees, and split with it.
  prepare: Callable[..., Any]
  # (params, method_state, context, batch, rng, step) -> (loss, metrics). With gradient
  # accumulation `batch` is one micro-batch and the micro-batches' losses and metrics
  # are summed, so a method normalises by batch-wide counts from `context`. A forward
  # pass that updates state (BatchNorm running statistics) returns the new values under
  # metrics["method_state"]: they replace those entries of method_state, averaged over
  # the micro-batches (not summed), and are not logged.
  loss: Callable[..., Any]
  # (params, method_state, step) -> method_state; the non-gradient update after the step
  after_update: Callable[..., Any]
  optimizer: optax.GradientTransformation
  # (params, method_state, which) -> the exportable encoder's parameters
  encoder: Callable[..., Any]
  # (params, method_state, load) -> (params, method_state) with the encoder replaced by
  # load(current encoder params) everywhere it lives (student, teacher, ...)
  with_encoder: Callable[..., Any]
  # host-side Grain transforms that turn a source item into this method's batch item
  host_transforms: tuple
  # name -> step -> value, logged with the metrics (learning rate, momentum, ...)
  schedules: dict
  # Host side, once when a run starts from scratch (not on resume): (params,
  # method_state) -> (params, method_state, what was done), e.g. LD stage 2 copying
  # stage 1's weights from its run. None: nothing to do.
  warm_start: Callable[..., Any] | None = None


def make(config, schedule) -> Method:
  if config.method not in METHODS:
    raise ValueError(f"config method={config.method!r} is not a known method; known: "
                     f"{list(METHODS)}." + closest(config.method, METHODS))
  return importlib.import_module(f"anatjax.methods.{config.method}").make(config, schedule)
