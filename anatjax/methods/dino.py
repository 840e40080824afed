"""DINO baseline: self-distillation of the CLS token across multi-crop views (Caron et al.,
2021), with the same ViT encoder and the same optimiser recipe AFiRe inherits from it.

One step: the EMA teacher embeds the two global views of each image into K-way
distributions, softmax((logits - centre) / teacher_temp), under stop-gradient; the student
embeds every view (two global, n local) and its softmax(logits / student_temp) is pulled
to the teacher's distribution of every *other* global view (cross-entropy averaged over
the 2(n + 1) view pairs); the centre follows the teacher's batch-mean logits (EMA 0.9),
which with the sharp teacher temperature keeps the outputs from collapsing. The head is
DINO's: a 3-layer MLP, an L2-normalised bottleneck, a weight-normalised last layer whose
directions stay frozen during the first epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anatjax import config as config_lib, losses, optim
from anatjax.data import transforms, views
from anatjax.methods import Method
from anatjax.methods.common import (ema_teacher_update, normalize, teacher_or_student,
                                    with_teacher_encoder)
from anatjax.models.heads import PositionPrototypeHead
from anatjax.models.vit import ViT, parse_variant, unstack_blocks

LAST_LAYER = r"head/prototypes$"


def make(config, schedule) -> Method:
  cfg, model = config.dino, config.model
  vit = parse_variant(model.variant, model.depth)
  for name, size in (("data.image_size", config.data.image_size),
                     ("dino.local_size", cfg.local_size)):
    if size % vit["patch_size"]:
      raise ValueError(f"{name}={size} is not a multiple of the patch size "
                       f"{vit['patch_size']} of model.variant={model.variant!r}")
  dtype = config_lib.compute_dtype(model.dtype)
  encoder = ViT(**vit, remat=model.remat, scan=model.scan_layers, dtype=dtype)
  # DINO's head is the per-position prototype head with one position (the CLS token):
  # MLP, L2-normalised bottleneck, weight-normalised bias-free last layer.
  head = PositionPrototypeHead(1, model.out_dim, model.head_hidden_dim,
                               model.head_bottleneck_dim, dtype=dtype)
  size, channels = config.data.image_size, model.channels
  total_steps = schedule.total_steps

  def init(rng):
    k_enc, k_head = jax.random.split(rng)
    params = {
        "encoder": encoder.init(k_enc, jnp.zeros((1, size, size, channels)))["params"],
        "head": head.init(k_head, jnp.zeros((1, 1, encoder.width)))["params"],
    }
    method_state = {"teacher": params, "center": jnp.zeros((model.out_dim,), jnp.float32)}
    return params, method_state

  def cls_logits(params, views_uint8):
    """[B, V, S, S] uint8 views -> [B, V, K] head logits of their CLS tokens."""
    batch, num_views = views_uint8.shape[:2]
    images = normalize(views_uint8.reshape(batch * num_views, *views_uint8.shape[2:]),
                       channels)
    tokens = encoder.apply({"params": params["encoder"]}, images)
    logits = head.apply({"params": params["head"]}, tokens[:, :1])
    return logits.reshape(batch, num_views, -1)

  teacher_temp = optim.linear(cfg.warmup_teacher_temp, cfg.teacher_temp,
                               schedule.steps(cfg.warmup_teacher_temp_duration,
                                              "dino.warmup_teacher_temp_duration"))

  def prepare(params, method_state, batch, step):
    """Teacher distributions of the global views (whole batch) and the centre update."""
    del params
    logits = jax.lax.stop_gradient(cls_logits(method_state["teacher"], batch["global"]))
    probs = jax.nn.softmax((logits - method_state["center"]) / teacher_temp(step), axis=-1)
    batch_center = jnp.mean(logits, axis=(0, 1))
    center = cfg.center_momentum * method_state["center"] + (
        1.0 - cfg.center_momentum) * batch_center
    context = {"per_example": {"teacher_probs": probs},
               "batch_size": batch["global"].shape[0]}
    metrics = {
        # log K for a uniform teacher, 0 for a one-hot one: both extremes mean collapse.
        "teacher_entropy": -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-12), axis=-1)),
    }
    return dict(method_state, center=center), context, metrics

  def loss_fn(params, method_state, context, batch, rng, step):
    del method_state, rng, step  # DINO's randomness is the host's views
    student = [cls_logits(params, batch["global"])]
    if "local" in batch:
      student.append(cls_logits(params, batch["local"]))
    student = jnp.concatenate(student, axis=1)                   # [b, 2 + n, K]
    targets = batch["teacher_probs"]                             # [b, 2, K]
    # ce[b, t, v]: teacher view t against student view v; pairs with t == v are left out.
    ce = losses.soft_cross_entropy(targets[:, :, None], student[:, None], cfg.student_temp)
    num_views = student.shape[1]
    pairs = jnp.arange(2)[:, None] != jnp.arange(num_views)[None, :]
    loss = jnp.sum(ce * pairs) / (jnp.sum(pairs) * context["batch_size"])
    return loss, {"loss": loss}

  opt = config.optim
  lr = optim.warmup_cosine(opt.base_lr * schedule.batch_size / opt.base_batch_size,
                           schedule.steps(opt.warmup, "optim.warmup"), total_steps,
                           opt.min_lr)
  wd = optim.cosine(opt.weight_decay, opt.weight_decay_end, total_steps)
  optimizer = optim.dino_adamw(
      opt, lr, wd, frozen=LAST_LAYER,
      freeze_steps=schedule.steps(cfg.freeze_last_layer, "dino.freeze_last_layer"))
  teacher_momentum = optim.cosine(cfg.teacher_momentum, 1.0, total_steps)

  def encoder_params(params, method_state, which="auto"):
    return unstack_blocks(teacher_or_student(params, method_state, which, "DINO"))

  host = (transforms.Greyscale(None),
          views.MultiCrop(size, cfg.local_size, cfg.num_local_crops, cfg.global_scale,
                          cfg.local_scale))
  return Method("dino", init, prepare, loss_fn, ema_teacher_update(teacher_momentum),
                optimizer, encoder_params, with_teacher_encoder, host,
                {"lr": lr, "weight_decay": wd, "teacher_momentum": teacher_momentum,
                 "teacher_temp": teacher_temp})

