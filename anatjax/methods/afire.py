"""AFiRe: token-wise anatomy-guided consistency + anomaly-removal restoration.

Specification: shared/methods/afire.md. One step (all inside the jitted update):
1. the EMA teacher (encoder + prototype head) embeds the clean image -> cosine logits
   [B, L, K] against each position's own K prototypes, under stop-gradient;
2. the prototype buffer P [L, K] takes the global-batch mean of those logits (overwritten
   during epoch 0, EMA 0.75 afterwards) and Sinkhorn turns P into one target distribution
   per position, shared by all images;
3. the student sees the lesioned image; its logits are pulled to the targets by a soft
   cross-entropy averaged over the tokens no lesion touches;
4. the student's decoder rebuilds the clean image with lesion tokens replaced by
   position-specific mask tokens (mean squared error over the whole image);
5. AdamW (DINO grouping, per-tensor clipping, prototypes frozen for the first epoch), then
   the teacher follows the student by EMA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anatjax import config as config_lib, losses, optim
from anatjax.data import transforms
from anatjax.data.lesions import LesionConfig
from anatjax.methods import Method
from anatjax.methods.common import (ema_teacher_update, normalize, teacher_or_student,
                                    with_teacher_encoder)
from anatjax.models.decoders import RestorationDecoder
from anatjax.models.heads import PositionPrototypeHead
from anatjax.models.vit import ViT, parse_variant, unstack_blocks

PROTOTYPES = r"head/prototypes$"


def build_modules(config):
  """The three Flax modules: encoder and head (student and teacher), decoder (student)."""
  model = config.model
  vit = parse_variant(model.variant, model.depth)
  patch = vit["patch_size"]
  if config.data.image_size % patch:
    raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of the "
                     f"patch size {patch} of model.variant={model.variant!r}")
  grid = config.data.image_size // patch
  dtype = config_lib.compute_dtype(model.dtype)
  layers = dict(remat=model.remat, scan=model.scan_layers, dtype=dtype)
  encoder = ViT(**vit, **layers)
  head = PositionPrototypeHead(grid * grid, model.num_prototypes, model.head_hidden_dim,
                               model.head_bottleneck_dim, dtype=dtype)
  dec = model.decoder
  decoder = RestorationDecoder(grid, grid, patch, model.channels, dec.width, dec.depth,
                               dec.num_heads, dec.mlp_dim, **layers)
  return encoder, head, decoder


def make(config, schedule) -> Method:
  cfg = config.afire
  encoder, head, decoder = build_modules(config)
  size, channels = config.data.image_size, config.model.channels
  grid = size // encoder.patch_size
  steps_per_epoch, total_steps = schedule.steps_per_epoch, schedule.total_steps

  def init(rng):
    k_enc, k_head, k_dec = jax.random.split(rng, 3)
    images = jnp.zeros((1, size, size, channels), jnp.float32)
    tokens = jnp.zeros((1, 1 + grid * grid, encoder.width), jnp.float32)
    params = {
        "encoder": encoder.init(k_enc, images)["params"],
        "head": head.init(k_head, tokens[:, 1:])["params"],
        "decoder": decoder.init(k_dec, tokens, jnp.zeros((1, grid * grid), bool))["params"],
    }
    method_state = {
        # The teacher starts as an exact copy of the student's encoder and head.
        "teacher": {"encoder": params["encoder"], "head": params["head"]},
        "prototype_buffer": jnp.zeros((grid * grid, config.model.num_prototypes),
                                      jnp.float32),
        # Images whose lesion-texture search failed (blank, constant, tiny bright region)
        # and got the fallback texture: counted over the whole run, never fatal.
        "texture_fallbacks": jnp.zeros([], jnp.int32),
    }
    return params, method_state

  def token_logits(params, images):
    tokens = encoder.apply({"params": params["encoder"]}, images)
    return tokens, head.apply({"params": params["head"]}, tokens[:, 1:])

  def prepare(params, method_state, batch, step):
    """Teacher pass over the whole global batch -> updated buffer, shared targets."""
    del params
    _, teacher_logits = token_logits(method_state["teacher"],
                                     normalize(batch["x_clean"], channels))
    batch_mean = jax.lax.stop_gradient(jnp.mean(teacher_logits, axis=0))
    first_epoch = step < steps_per_epoch
    buffer = jnp.where(first_epoch, batch_mean,
                       cfg.prototype_momentum * method_state["prototype_buffer"]
                       + (1.0 - cfg.prototype_momentum) * batch_mean)
    target = losses.sinkhorn(buffer, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters)
    abnormal = batch["abn"]
    fallbacks = method_state["texture_fallbacks"] + jnp.sum(
        batch["texture_fallback"].astype(jnp.int32))
    # The loss normalisers are counted over the whole batch, so a loss summed over
    # micro-batches equals the loss of the whole batch.
    context = {"target": target, "normal_tokens": jnp.sum(~abnormal),
               "pixels": batch["x_clean"].size * channels}
    metrics = {
        "abnormal_token_fraction": jnp.mean(abnormal.astype(jnp.float32)),
        "texture_fallbacks_total": fallbacks,
        # How peaked the shared targets are: log K when uniform, 0 when one-hot.
        "target_entropy": -jnp.mean(jnp.sum(target * jnp.log(target + 1e-12), axis=-1)),
    }
    new_state = dict(method_state, prototype_buffer=buffer, texture_fallbacks=fallbacks)
    return new_state, context, metrics

  def loss_fn(params, method_state, context, batch, rng, step):
    """The student's losses on (a micro-batch of) the batch, normalised batch-wide."""
    del method_state, rng, step  # AFiRe's randomness is the host's lesion synthesis
    abnormal = batch["abn"]
    tokens, student_logits = token_logits(params, normalize(batch["x_slm"], channels))
    token_ce = losses.soft_cross_entropy(context["target"][None], student_logits,
                                         cfg.student_temp)
    loss_cst = losses.masked_mean(token_ce, ~abnormal, count=context["normal_tokens"])
    restored = decoder.apply({"params": params["decoder"]}, tokens, abnormal)
    loss_rec = losses.mean_squared_error(restored, normalize(batch["x_clean"], channels),
                                         count=context["pixels"])
    loss = loss_cst + cfg.restoration_weight * loss_rec
    return loss, {"loss": loss, "loss_cst": loss_cst, "loss_rec": loss_rec}

  teacher_momentum = optim.cosine(cfg.teacher_momentum, 1.0, total_steps)

  opt = config.optim
  lr = optim.warmup_cosine(opt.base_lr * schedule.batch_size / opt.base_batch_size,
                           schedule.steps(opt.warmup, "optim.warmup"), total_steps,
                           opt.min_lr)
  wd = optim.cosine(opt.weight_decay, opt.weight_decay_end, total_steps)
  freeze_steps = schedule.steps(cfg.freeze_prototypes, "afire.freeze_prototypes")
  # Per-tensor clipping with each position's prototype slice clipped on its own, as
  # the reference's separate per-position layers were.
  optimizer = optim.dino_adamw(opt, lr, wd, frozen=PROTOTYPES, freeze_steps=freeze_steps,
                               clip_groups=[(PROTOTYPES, 1)])

  def encoder_params(params, method_state, which="auto"):
    return unstack_blocks(teacher_or_student(params, method_state, which, "AFiRe"))

  slm = LesionConfig.for_image_size(size, **config.slm)
  host = (transforms.Greyscale(size),
          transforms.SyntheticLesions(slm, encoder.patch_size))
  return Method("afire", init, prepare, loss_fn, ema_teacher_update(teacher_momentum),
                optimizer, encoder_params, with_teacher_encoder, host,
                {"lr": lr, "weight_decay": wd, "teacher_momentum": teacher_momentum})
