"""Optimiser pieces the self-supervised recipes share: schedules, per-tensor clipping,
step-driven freezing and DINO's AdamW recipe."""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def cosine(start: float, end: float, steps: int):
  """Per-step cosine from `start` (step 0) to `end` (step `steps`), constant after."""
  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * t))
  return schedule


def linear(start: float, end: float, steps: int):
  """Per-step linear ramp from `start` (step 0) to `end` (step `steps`), constant after."""
  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return start + (end - start) * t
  return schedule


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float):
  """Linear warm-up from 0 to `peak`, then cosine to `end` at `total_steps`."""
  decay = cosine(peak, end, total_steps - warmup_steps)
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    return jnp.where(step < warmup_steps, warm, decay(step - warmup_steps))
  return schedule


def path_str(path) -> str:
  """A pytree key path as 'a/b/c' (the names the regex rules match)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def label_tree(tree, rules, default: Any):
  """Labels each leaf by the first (regex, label) rule whose regex matches its path."""
  compiled = [(re.compile(pattern), label) for pattern, label in rules]
  def label(path, _):
    name = path_str(path)
    return next((lbl for rx, lbl in compiled if rx.search(name)), default)
  return jax.tree_util.tree_map_with_path(label, tree)


def clip_by_norm_per_tensor(max_norm: float, group_axes=None):
  """Scales each tensor g by min(1, max_norm / (||g|| + 1e-6)) - not a global norm.

  `group_axes` is a pytree like the params, or a function of the updates returning one (or
  None), holding per leaf how many leading axes index independent groups clipped
  separately: a stacked [L, ...] tensor that stands for L separate layers uses 1, so each
  slice is clipped as its own tensor.
  """
  def clip(g, groups):
    axes = tuple(range(groups, g.ndim))
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
    return (g * jnp.minimum(1.0, max_norm / (norm + 1e-6))).astype(g.dtype)

  def update(updates, state, params=None):
    del params
    if group_axes is None:
      groups = jax.tree.map(lambda _: 0, updates)
    else:
      groups = group_axes(updates) if callable(group_axes) else group_axes
    return jax.tree.map(clip, updates, groups), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class HoldState(NamedTuple):
  count: jax.Array
  inner: Any


def hold_until(num_steps: int, inner: optax.GradientTransformation = None):
  """Zero updates for the first `num_steps` steps, leaving `inner`'s state untouched.

  While held, the parameters get no update at all (no gradient step, no weight decay) and
  `inner` does not advance: an Adam wrapped here starts its moments and bias correction
  when the hold ends, as PyTorch's AdamW does for a parameter whose grad is None.
  """
  inner = inner or optax.identity()

  def init(params):
    return HoldState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    def run():
      return inner.update(updates, state.inner, params)
    def hold():
      return jax.tree.map(jnp.zeros_like, updates), state.inner
    new_updates, inner_state = jax.lax.cond(state.count >= num_steps, run, hold)
    return new_updates, HoldState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformation(init, update)


def decay_mask(params):
  """DINO grouping: weight decay on tensors with ndim >= 2, none on biases and norms."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def dino_adamw(opt, lr, wd, *, frozen: str, freeze_steps: int,
               clip_groups=()) -> optax.GradientTransformation:
  """AdamW as DINO trains (AFiRe and the DINO baseline use it).

  Per-tensor gradient clipping at opt.clip_norm (`clip_groups`: (regex, leading group
  axes) for stacked tensors whose slices are clipped on their own), weight decay `wd` on
  ndim >= 2 tensors only, and the parameters matching `frozen` held completely still for
  the first `freeze_steps` steps. `lr` and `wd` are step -> value schedules.
  """
  def labels(params):
    return label_tree(params, [(frozen, "frozen")], "free")

  def groups(params):
    return label_tree(params, clip_groups, 0)

  # The first moment may be kept in bfloat16 to save memory; the second stays float32
  # (its small values underflow in bfloat16).
  adam = functools.partial(optax.scale_by_adam, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           mu_dtype=jnp.dtype(opt.mu_dtype))
  return optax.chain(
      clip_by_norm_per_tensor(opt.clip_norm, groups),
      optax.multi_transform(
          {"free": adam(), "frozen": hold_until(freeze_steps, adam())}, labels),
      optax.add_decayed_weights(wd, mask=decay_mask),
      optax.scale_by_learning_rate(lr),
      optax.multi_transform(
          {"free": optax.identity(), "frozen": hold_until(freeze_steps)}, labels),
  )
