"""MAE baseline: masked-patch reconstruction with the same ViT encoder (He et al., 2022).

One step: each image loses a random 75% of its patches (a fresh permutation per image
from the step's key); the encoder sees only the visible quarter (with their position
embeddings); a light ViT decoder gets the encoded visible tokens back in place, one
shared learned mask token everywhere else, and predicts every patch's pixels; the loss is
the mean squared error on the hidden patches only, against each patch's pixels
normalised by that patch's own mean and variance (MAE's norm_pix_loss). AdamW with
betas (0.9, 0.95), no clipping, no teacher: the trained encoder is the exported one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from anatjax import config as config_lib, losses, optim
from anatjax.data import transforms, views
from anatjax.methods import Method
from anatjax.methods.common import normalize
from anatjax.models.decoders import RestorationDecoder, patchify
from anatjax.models.vit import ViT, parse_variant, unstack_blocks


def build_modules(config):
  model = config.model
  vit = parse_variant(model.variant, model.depth)
  if config.data.image_size % vit["patch_size"]:
    raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of the "
                     f"patch size {vit['patch_size']} of model.variant={model.variant!r}")
  grid = config.data.image_size // vit["patch_size"]
  layers = dict(remat=model.remat, scan=model.scan_layers,
                dtype=config_lib.compute_dtype(model.dtype))
  dec = model.decoder
  decoder = RestorationDecoder(grid, grid, vit["patch_size"], model.channels, dec.width,
                               dec.depth, dec.num_heads, dec.mlp_dim,
                               shared_mask_token=True, **layers)
  return ViT(**vit, **layers), decoder


def random_masking(rng, batch: int, num_patches: int, num_visible: int):
  """(keep [B, num_visible] patch indices in ascending order, hidden [B, L] bool): an
  independent uniformly random subset per image."""
  order = jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1)
  keep = jnp.sort(order[:, :num_visible], axis=1)
  hidden = jnp.ones((batch, num_patches), bool).at[
      jnp.arange(batch)[:, None], keep].set(False)
  return keep, hidden


def scatter_visible(tokens, keep, num_patches: int):
  """Encoder output [B, 1 + n, D] for patches `keep` -> [B, 1 + L, D], zeros elsewhere."""
  batch, _, width = tokens.shape
  grid = jnp.zeros((batch, num_patches, width), tokens.dtype)
  grid = grid.at[jnp.arange(batch)[:, None], keep].set(tokens[:, 1:])
  return jnp.concatenate([tokens[:, :1], grid], axis=1)


def normalized_patch_targets(images, patch_size: int, eps: float = 1e-6):
  """Each patch's pixels minus the patch mean, over sqrt(patch variance + eps)."""
  patches = patchify(images, patch_size)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def make(config, schedule) -> Method:
  cfg = config.mae
  encoder, decoder = build_modules(config)
  size, channels = config.data.image_size, config.model.channels
  num_patches = (size // encoder.patch_size) ** 2
  num_visible = max(1, int(round(num_patches * (1.0 - cfg.mask_ratio))))

  def init(rng):
    k_enc, k_dec = jax.random.split(rng)
    params = {
        "encoder": encoder.init(k_enc, jnp.zeros((1, size, size, channels)))["params"],
        "decoder": decoder.init(k_dec, jnp.zeros((1, 1 + num_patches, encoder.width)),
                                jnp.zeros((1, num_patches), bool))["params"],
    }
    return params, {}

  def prepare(params, method_state, batch, step):
    del params, step
    hidden_patches = batch["image"].shape[0] * (num_patches - num_visible)
    return method_state, {"hidden_patches": hidden_patches}, {}

  def loss_fn(params, method_state, context, batch, rng, step):
    del method_state, step
    images = normalize(batch["image"], channels)
    keep, hidden = random_masking(rng, images.shape[0], num_patches, num_visible)
    tokens = encoder.apply({"params": params["encoder"]}, images, keep=keep)
    restored = decoder.apply({"params": params["decoder"]},
                             scatter_visible(tokens, keep, num_patches), hidden)
    target = (normalized_patch_targets(images, encoder.patch_size) if cfg.norm_pix_loss
              else patchify(images, encoder.patch_size))
    per_patch = jnp.mean(jnp.square(patchify(restored, encoder.patch_size) - target), -1)
    loss = losses.masked_mean(per_patch, hidden, count=context["hidden_patches"])
    return loss, {"loss": loss}

  def after_update(params, method_state, step):
    del params, step
    return method_state

  def encoder_params(params, method_state, which="auto"):
    del method_state
    if which not in ("auto", "student"):
      raise ValueError(f"which={which!r}: MAE trains one encoder (no EMA teacher); use "
                       "'auto' (or 'student')")
    return unstack_blocks(params["encoder"])

  def with_encoder(params, method_state, load):
    return dict(params, encoder=load(params["encoder"])), method_state

  opt = config.optim
  lr = optim.warmup_cosine(opt.base_lr * schedule.batch_size / opt.base_batch_size,
                           schedule.steps(opt.warmup, "optim.warmup"), schedule.total_steps,
                           opt.min_lr)
  optimizer = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                          mu_dtype=jnp.dtype(opt.mu_dtype), mask=optim.decay_mask)
  host = (transforms.Greyscale(None),
          views.RandomResizedCrop(size, cfg.crop_scale, cfg.p_flip))
  return Method("mae", init, prepare, loss_fn, after_update, optimizer, encoder_params,
                with_encoder, host, {"lr": lr})
