"""LD: local discrimination with pixel embeddings and soft regions (two stages).

Specification: shared/methods/ld.md. The host makes two views of every image
(anatjax/data/ld_views.py); a batch of 2B images is B samples, image j paired with image
B + j. One step (inside the jitted update):
1. the mixup image x_mix = lam I1_v1 + (1 - lam) I2_v1 of each pair (lam: the first
   image's draw), and ONE training-mode pass of the U-Net over all 5B images
   (I1_v1, I2_v1, I1_v2, I2_v2, mix): per-pixel embeddings v, soft assignments A; the
   BatchNorm statistics are those of the whole (global) batch, and the running averages
   come back to the trainer as method state;
2. patch vectors P = L2norm(8 x 8 average pooling of v); view 2's grids are turned back
   into view 1's frame (the host's dihedral orientation, undone per example);
3. stage 1: L = L_PD + L_mix (patch discrimination between the views, hypersphere mixup);
   stage 2: + 10 L_RD + 0.1 L_ent (region discrimination and binary entropy of the
   assignments of the 4B non-mix images) [+ w_area L_area];
4. Adam (no weight decay), lr 1e-3 halved every 10k steps.
Shape-guided variant (ld.shape.enabled, stage 2): cluster channel 0 is pushed towards
reference shapes of another modality by a discriminator trained in the same step
(`adversarial_terms`; spec 7.2); reference shapes from a mask folder or, on the phantom,
a structure's masks of other synthetic patients.
Stage 2 starts from a stage-1 run (`ld.init_from_run`): encoder, decoder and embedding
head (weights and BatchNorm statistics) copied by name; the cluster head, Adam's state
and the schedule start afresh.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anatjax import config as config_lib, dihedral, losses
from anatjax.data.ld_views import ColourJitter, LDViews, ShapeReferences, shape_bank
from anatjax.methods import Method
from anatjax.methods.common import IMAGENET_MEAN, IMAGENET_STD
from anatjax.models.shape_discriminator import ShapeDiscriminator
from anatjax.models.unet import SIZE_MULTIPLE, LDUNet

STAGES = (1, 2)
# What stage 2 takes from stage 1, by name (spec 4): everything but the cluster head.
TRANSFERRED = ("encoder", "decoder", "embedding_head")


def normalise(images, channels: int):
  """Views in [0, 1] -> network input: radiographs (x - 0.5) / 0.5, colour ImageNet's."""
  if channels == 1:
    return (images - 0.5) / 0.5
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def image_input(images_uint8, channels: int):
  """uint8 greyscale [N, S, S] -> the network's normalised [N, S, S, channels] (tools that
  run a trained network on plain images: landmarks, transfer, shape prior)."""
  x = jnp.asarray(images_uint8).astype(jnp.float32)[..., None] / 255.0
  return normalise(jnp.broadcast_to(x, x.shape[:-1] + (channels,)), channels)


def load_run(run_dir: str, step: int | None = None, purpose: str = "this"):
  """(config, U-Net variables on the host, step) of an LD run's checkpoint (the newest, or
  `step`); another method's run is refused, naming `purpose`."""
  from anatjax import train  # pylint: disable=g-import-not-at-top  (train imports methods)
  config, _, state, step = train.load_checkpoint(run_dir, step)
  if config.method != "ld":
    raise ValueError(f"{run_dir} is a {config.method} run: {purpose} needs an LD run")
  return config, jax.device_get(unet_variables(state["params"], state["method_state"])), step


def network_input(batch, channels: int):
  """The 5B images (I1_v1, I2_v1, I1_v2, I2_v2, mix) of a batch of 2B paired images,
  normalised, and the pairs' mixup weights [B]."""
  view1, view2 = batch["view1"], batch["view2"]
  pairs = view1.shape[0] // 2
  lam = batch["lam"][:pairs]
  mix = lam[:, None, None, None] * view1[:pairs] + (1.0 - lam[:, None, None, None]) * view1[pairs:]
  return normalise(jnp.concatenate([view1, view2, mix]), channels), lam


def ld_losses(embeddings, assignments, batch, lam, cfg) -> dict:
  """Every LD loss term of one forward pass (spec 3.3), float32."""
  pairs = lam.shape[0]
  patches = losses.pool_patch_embeddings(embeddings, cfg.grid)
  view1 = patches[:2 * pairs]
  view2 = dihedral.undo_batch(patches[2 * pairs:4 * pairs], batch["mirror"], batch["turns"])
  terms = {
      "pd": losses.patch_discrimination(view1, view2, cfg.temperature),
      "mix": losses.hypersphere_mixup(patches[4 * pairs:], view1[:pairs], view1[pairs:], lam,
                                      cfg.temperature),
  }
  if cfg.stage == 2:
    non_mix = slice(0, 4 * pairs)
    terms["rd"] = losses.region_discrimination(embeddings[non_mix], assignments[non_mix],
                                               cfg.region_temperature)
    terms["ent"] = losses.binary_entropy(assignments[non_mix])
    if cfg.w_area:
      terms["area"] = losses.area_prior(assignments[non_mix])
  return terms


def log_probability(p):
  """log p clamped at -100, as PyTorch's BCELoss does."""
  return jnp.maximum(jnp.log(p), -100.0)


def adversarial_terms(discriminator, disc_params, channel_maps, real_masks) -> dict:
  """The shape prior's two losses from one forward (spec 7.2), separable by gradients:
    adv  = BCE(D(A_c), 1) with D's parameters under stop-gradient: reaches the network;
    disc = BCE over [real masks -> 1, sg(A_c) -> 0]: reaches only D.
  Their sum's gradient is therefore the generator's gradient of `adv` and D's gradient
  of `disc`, both at the pre-update parameters: the reference's G-then-D update in one
  step, computed on the same forward pass's A_c."""
  frozen = jax.lax.stop_gradient(disc_params)
  fake_for_g = discriminator.apply({"params": frozen}, channel_maps)
  real = discriminator.apply({"params": disc_params}, real_masks)
  fake = discriminator.apply({"params": disc_params}, jax.lax.stop_gradient(channel_maps))
  return {"adv": -jnp.mean(log_probability(fake_for_g)),
          "disc": -0.5 * (jnp.mean(log_probability(real))
                          + jnp.mean(log_probability(1.0 - fake)))}


def unet_variables(params, method_state) -> dict:
  """The U-Net's variables of an LD state (without the shape-guided discriminator)."""
  return {"params": {k: v for k, v in params.items() if k != "discriminator"},
          "batch_stats": method_state["batch_stats"]}


def clusters_used(assignments) -> jax.Array:
  """Mean over images of how many clusters win at least 1 % of an image's pixels."""
  winners = jax.nn.one_hot(jnp.argmax(assignments, -1), assignments.shape[-1])
  return jnp.mean(jnp.sum(jnp.mean(winners, axis=(1, 2)) >= 0.01, axis=-1))


def make(config, schedule) -> Method:
  cfg = config.ld
  if cfg.stage not in STAGES:
    raise ValueError(f"config ld.stage={cfg.stage!r}: use 1 (patch discrimination + mixup) "
                     "or 2 (+ region discrimination and entropy)")
  size, channels = cfg.crop_size, config.model.channels
  if size % SIZE_MULTIPLE or size % cfg.grid:
    raise ValueError(f"config ld.crop_size={size}: the U-Net needs a multiple of "
                     f"{SIZE_MULTIPLE} and the patch grid a multiple of ld.grid={cfg.grid}")
  if size > config.data.image_size:
    raise ValueError(f"config ld.crop_size={size} is larger than data.image_size="
                     f"{config.data.image_size}, the images the crops are taken from")
  micro_batch = config.batch_size // config.grad_accum_steps
  if micro_batch % 2:
    raise ValueError(f"config batch_size={config.batch_size}: LD pairs the images of each "
                     f"(micro-)batch, so batch_size / grad_accum_steps must be even (it is "
                     f"{micro_batch}); batch_size = 2 x ld samples")
  shape = cfg.shape
  if shape.enabled and cfg.stage != 2:
    raise ValueError("config ld.shape.enabled: the shape prior is part of stage 2 (use "
                     "stage=2,shape_guided)")
  weights = {"pd": cfg.w_pd, "mix": cfg.w_mix, "rd": cfg.w_rd, "ent": cfg.w_ent,
             "area": cfg.w_area, "adv": shape.w_adv, "disc": 1.0}
  discriminator = ShapeDiscriminator(slope=shape.slope)
  model = LDUNet(num_clusters=cfg.num_clusters, embedding_dim=cfg.embedding_dim,
                 dtype=config_lib.compute_dtype(config.model.dtype))
  accumulate = config.grad_accum_steps

  def init(rng):
    unet_key, disc_key = jax.random.split(rng)
    variables = model.init(unet_key, jnp.zeros((1, size, size, channels)), train=False)
    params = variables["params"]
    if shape.enabled:
      params = {**params, "discriminator": discriminator.init(
          disc_key, jnp.zeros((1, size, size, 1)))["params"]}
    return params, {"batch_stats": variables["batch_stats"]}

  def prepare(params, method_state, batch, step):
    del params, batch, step
    return method_state, {}, {}

  def loss_fn(params, method_state, context, batch, rng, step):
    del context, rng, step
    images, lam = network_input(batch, channels)
    (embeddings, assignments), updated = model.apply(
        unet_variables(params, method_state), images, train=True, mutable=["batch_stats"])
    terms = ld_losses(embeddings, assignments, batch, lam, cfg)
    if shape.enabled:
      non_mix = 4 * lam.shape[0]
      real = jnp.concatenate([batch["shape_masks"][:, 0], batch["shape_masks"][:, 1]])
      terms.update(adversarial_terms(
          discriminator, params["discriminator"],
          assignments[:non_mix, ..., shape.channel:shape.channel + 1], real))
    loss = sum(weights[name] * value for name, value in terms.items()) / accumulate
    metrics = {"loss": loss, **{f"loss_{k}": v / accumulate for k, v in terms.items()}}
    if cfg.stage == 2:
      metrics["clusters_used"] = clusters_used(assignments[:4 * lam.shape[0]]) / accumulate
    return loss, {**metrics, "method_state": {"batch_stats": updated["batch_stats"]}}

  def after_update(params, method_state, step):
    del params, step
    return method_state

  def encoder_params(params, method_state, which="auto"):
    if which not in ("auto", "student"):
      raise ValueError(f"which={which!r}: LD trains one network (no EMA teacher); use "
                       "'auto'")
    return {"params": params["encoder"],
            "batch_stats": method_state["batch_stats"]["encoder"]}

  def with_encoder(params, method_state, load):
    del params, method_state, load
    raise ValueError("config init_from: LD's U-Net encoder does not load ViT weights files; "
                     "stage 2 starts from a stage-1 run with ld.init_from_run=RUN_DIR")

  def warm_start(params, method_state):
    return copy_from_run(cfg.init_from_run, params, method_state)

  lr = optax.exponential_decay(cfg.lr, schedule.steps(cfg.lr_halve_every, "ld.lr_halve_every"),
                               0.5, staircase=True)
  optimizer = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
  host = (LDViews(size, channels, base_scale=cfg.base_scale,
                  base_rotation=cfg.base_rotation, view_rotation=cfg.view_rotation,
                  jitter=ColourJitter(*cfg.colour_jitter), p_greyscale=cfg.p_greyscale,
                  view2_ops=cfg.view2_ops, lam_range=cfg.lam_range),)
  if shape.enabled:   # D: Adam at lr_scale x the network's lr, on the same halving
    disc_lr = lambda step: shape.lr_scale * lr(step)
    optimizer = optax.multi_transform(
        {"network": optimizer, "discriminator": optax.adam(disc_lr, b1=0.9, b2=0.999)},
        lambda p: {k: "discriminator" if k == "discriminator" else "network" for k in p})
    host += (ShapeReferences(shape_bank(shape.masks_dir, shape.structure,
                                        shape.num_reference, size, shape.reference_seed),
                             size, shape.max_cut),)
  return Method("ld", init, prepare, loss_fn, after_update, optimizer, encoder_params,
                with_encoder, host, {"lr": lr},
                warm_start=warm_start if cfg.init_from_run else None)


def copy_from_run(run_dir: str, params, method_state):
  """(params, method_state, message) with TRANSFERRED taken from `run_dir`'s newest
  checkpoint, by name, shapes checked; the rest (the cluster head) stays as initialised."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"config ld.init_from_run={run_dir!r} is not a folder: give the "
                            "workdir of the stage-1 run")
  _, run, step = load_run(run_dir, purpose="config ld.init_from_run")
  params, stats = dict(params), dict(method_state["batch_stats"])
  for name in TRANSFERRED:
    for tree, source, what in ((params, run["params"], "weights"),
                               (stats, run["batch_stats"], "statistics")):
      _check_same_shapes(tree[name], source[name], f"{run_dir} {name} {what}")
      tree[name] = source[name]
  message = (f"Stage 2 starts from {run_dir} step {step}: {', '.join(TRANSFERRED)} copied "
             "(weights and BatchNorm statistics); cluster_head, optimiser and schedule new.")
  return params, dict(method_state, batch_stats=stats), message


def _check_same_shapes(target, source, where: str) -> None:
  want = jax.tree_util.tree_flatten_with_path(target)[0]
  have = {jax.tree_util.keystr(p): np.shape(v)
          for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
  for path, value in want:
    key = jax.tree_util.keystr(path)
    if have.get(key) != np.shape(value):
      raise ValueError(f"{where}: {key} is {have.get(key, 'missing')} in the run, "
                       f"{np.shape(value)} here; both stages need the same model block")
