"""Pieces several methods share: the encoder's input normalisation and the student-EMA
teacher bookkeeping of AFiRe and DINO."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images_uint8, channels: int):
  """uint8 [..., H, W] greyscale -> float32 [..., H, W, C], ImageNet-normalised per channel
  (greyscale replicated to 3 channels, as the ImageNet-style recipes feed radiographs)."""
  x = images_uint8.astype(jnp.float32)[..., None] / 255.0
  mean = jnp.asarray(IMAGENET_MEAN[:channels] if channels == 3 else IMAGENET_MEAN[:1])
  std = jnp.asarray(IMAGENET_STD[:channels] if channels == 3 else IMAGENET_STD[:1])
  return (jnp.broadcast_to(x, x.shape[:-1] + (channels,)) - mean) / std


# ----------------------------------------------------------- student and EMA teacher
# Such a method keeps params = {"encoder", "head", ...} (the student) and
# method_state["teacher"] = {"encoder", "head"}, an exponential moving average of them.

def teacher_or_student(params, method_state, which: str, method_name: str):
  """The encoder parameters `which` names: 'auto' and 'teacher' the EMA teacher (the
  encoder these methods evaluate and release), 'student' the one trained by gradients."""
  if which in ("auto", "teacher"):
    return method_state["teacher"]["encoder"]
  if which == "student":
    return params["encoder"]
  raise ValueError(f"which={which!r}: {method_name} has a 'teacher' (also 'auto') and a "
                   "'student' encoder")


def with_teacher_encoder(params, method_state, load):
  """Method.with_encoder for student-teacher methods: both start from the loaded weights."""
  encoder = load(params["encoder"])
  teacher = dict(method_state["teacher"], encoder=encoder)   # still a copy
  return dict(params, encoder=encoder), dict(method_state, teacher=teacher)


def ema_teacher_update(momentum):
  """Method.after_update: the teacher follows the student's encoder and head,
  teacher = m * teacher + (1 - m) * student with m = momentum(step)."""
  def after_update(params, method_state, step):
    m = momentum(step)
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, method_state["teacher"],
                           {"encoder": params["encoder"], "head": params["head"]})
    return dict(method_state, teacher=teacher)
  return after_update
