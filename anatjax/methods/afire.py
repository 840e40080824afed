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

import functools

import jax
import jax.numpy as jnp
import optax

from anatjax import config as config_lib, losses, optim
from anatjax.data import transforms
from anatjax.data.lesions import LesionConfig
from anatjax.methods import Method
from anatjax.models.decoders import RestorationDecoder
from anatjax.models.heads import PositionPrototypeHead
from anatjax.models.vit import ViT, parse_variant, unstack_blocks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROTOTYPES = r"head/prototypes$"


def normalize(images_uint8, channels: int):
  """uint8 [B, H, W] greyscale -> float32 [B, H, W, C], ImageNet-normalised per channel."""
  x = images_uint8.astype(jnp.float32)[..., None] / 255.0
  mean = jnp.asarray(IMAGENET_MEAN[:channels] if channels == 3 else IMAGENET_MEAN[:1])
  std = jnp.asarray(IMAGENET_STD[:channels] if channels == 3 else IMAGENET_STD[:1])
  return (jnp.broadcast_to(x, x.shape[:-1] + (channels,)) - mean) / std


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

  def after_update(params, method_state, step):
    m = teacher_momentum(step)
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, method_state["teacher"],
                           {"encoder": params["encoder"], "head": params["head"]})
    return dict(method_state, teacher=teacher)

  opt = config.optim
  lr = optim.warmup_cosine(opt.base_lr * schedule.batch_size / opt.base_batch_size,
                           schedule.steps(opt.warmup, "optim.warmup"), total_steps,
                           opt.min_lr)
  wd = optim.cosine(opt.weight_decay, opt.weight_decay_end, total_steps)
  freeze_steps = schedule.steps(cfg.freeze_prototypes, "afire.freeze_prototypes")
  optimizer = make_optimizer(opt, lr, wd, freeze_steps)

  def encoder_params(params, method_state, which="teacher"):
    source = {"teacher": method_state["teacher"], "student": params}
    if which not in source:
      raise ValueError(f"which={which!r}: AFiRe exports 'teacher' or 'student'")
    return unstack_blocks(source[which]["encoder"])

  def with_encoder(params, method_state, load):
    encoder_params = load(params["encoder"])
    teacher = dict(method_state["teacher"], encoder=encoder_params)  # still a copy
    return dict(params, encoder=encoder_params), dict(method_state, teacher=teacher)

  slm = LesionConfig.for_image_size(size, **config.slm)
  host = (transforms.Greyscale(size),
          transforms.SyntheticLesions(slm, encoder.patch_size))
  return Method("afire", init, prepare, loss_fn, after_update, optimizer, encoder_params,
                with_encoder, host,
                {"lr": lr, "weight_decay": wd, "teacher_momentum": teacher_momentum})


def make_optimizer(opt, lr, wd, freeze_steps: int) -> optax.GradientTransformation:
  """AdamW as the reference trains AFiRe (DINO's recipe).

  Per-tensor gradient clipping (each position's prototype slice clipped on its own, as the
  reference's 196 separate layers were), decay on ndim >= 2 tensors only, and the
  prototypes held completely still during the first `freeze_steps` steps.
  """
  def labels(params):
    return optim.label_tree(params, [(PROTOTYPES, "frozen")], "free")

  def clip_groups(params):
    return optim.label_tree(params, [(PROTOTYPES, 1)], 0)

  # The first moment may be kept in bfloat16 to save memory; the second stays float32
  # (its small values underflow in bfloat16).
  adam = functools.partial(optax.scale_by_adam, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           mu_dtype=jnp.dtype(opt.mu_dtype))
  return optax.chain(
      optim.clip_by_norm_per_tensor(opt.clip_norm, clip_groups),
      optax.multi_transform(
          {"free": adam(), "frozen": optim.hold_until(freeze_steps, adam())}, labels),
      optax.add_decayed_weights(wd, mask=optim.decay_mask),
      optax.scale_by_learning_rate(lr),
      optax.multi_transform(
          {"free": optax.identity(), "frozen": optim.hold_until(freeze_steps)}, labels),
  )
