"""Protocol: LD's segmentation transfer (shared/methods/ld.md 6), on the synthetic
structures that mirror the published radiograph tasks (JSRT/SCR heart, lungs, clavicles).

Per structure, label fraction and seed: the encoder under evaluation (an LD run's VGG
encoder with its BatchNorm statistics, or a fresh one for --init=random) under a newly
initialised U-Net decoder (the layout of spec 1.2) and a 3 x 3 conv to one channel with a
sigmoid, trained with the soft Dice loss -2 TP / (|G| + |P| + 1) over the flattened batch
(prediction and target inverted when the batch has no foreground), Adam at a constant
lr 1e-3, batch 2, in two phases:
  1. encoder frozen (its BatchNorm in inference mode), `epochs` epochs of the decoder;
  2. from phase 1's best model, everything fine-tuned for `epochs` epochs.
The validation images are the first 20 % of the (fraction's) training list; the epoch
with the lowest validation Dice loss is kept in each phase. Augmentation: a rotation
U(-30, 30) degrees per image (bilinear image, nearest mask). Test: full images,
threshold 0.5, Dice per image, mean (and std) over the test split.
With an LD run, the figure also shows the run's K-way clustering of test images (the
arg-max region per pixel).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from anatjax import config as config_lib
from anatjax.data.synthetic_cxr import STRUCTURES, structure_mask
from anatjax.evaluate import data as data_lib, features, metrics, probes
from anatjax.methods.ld import image_input, load_run
from anatjax.models.unet import (SIZE_MULTIPLE, UNetDecoder, VGGEncoder, check_image_size,
                                 conv3x3, torch_default_inits, LDUNet)

ENCODER_CONVS = 13   # VGG16-BN-tiny: 2 + 2 + 3 + 3 + 3 conv layers


class TransferUNet(nn.Module):
  """images [N, H, W, C] -> logits [N, H, W]: the VGG encoder, a fresh decoder, one conv."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train_encoder: bool, train_decoder: bool):
    skips = VGGEncoder(self.dtype, name="encoder")(images, train_encoder)
    g = UNetDecoder(self.dtype, name="decoder")(skips, train_decoder)
    logits = conv3x3(1, g.shape[-1], torch_default_inits, self.dtype, "out")(g)
    return logits[..., 0].astype(jnp.float32)


@dataclasses.dataclass(eq=False)
class UNetEncoder:
  """The encoder under evaluation: variables {"params", "batch_stats"} of the VGG
  encoder (None: a fresh one per seed), the size it was trained at, and what it is."""
  variables: dict | None
  image_size: int
  channels: int
  info: dict
  clusters: dict | None = None   # an LD run's whole network, for the cluster figure
  depth: int = ENCODER_CONVS

  def grid(self, image_size: int) -> int:
    if image_size % SIZE_MULTIPLE:
      raise ValueError(f"image size {image_size}: the U-Net needs a multiple of "
                       f"{SIZE_MULTIPLE}")
    return image_size // SIZE_MULTIPLE


def load_encoder(init: str, config, step: int | None = None) -> UNetEncoder:
  """'random' (config.model), or an LD run's encoder (newest checkpoint, or `step`)."""
  if init == "random":
    info = {"init": "random", "kind": "random", "seed": config.seed,
            "variant": "LD U-Net encoder", "image_size": config.model.image_size}
    return UNetEncoder(None, config.model.image_size, config.model.channels, info)
  if not os.path.isdir(os.path.join(init, "checkpoints")):
    raise ValueError(f"--init={init!r}: expected 'random' or an LD run directory")
  run_config, whole, step = load_run(init, step, "protocol ld_segmentation (ViT encoders: "
                                     "configs/eval/segmentation.py)")
  variables = {kind: whole[kind]["encoder"] for kind in ("params", "batch_stats")}
  info = {"init": os.path.abspath(init), "kind": "run", "method": "ld", "step": int(step),
          "stage": run_config.ld.stage, "variant": "LD U-Net encoder",
          "image_size": run_config.ld.crop_size,
          "shape": (run_config.ld.shape.to_dict() if run_config.ld.get("shape")
                    and run_config.ld.shape.enabled else None)}
  return UNetEncoder(variables, run_config.ld.crop_size, run_config.model.channels, info,
                     clusters={**whole, "num_clusters": run_config.ld.num_clusters})


# ------------------------------------------------------------------ training
def soft_dice_loss(probabilities, target):
  """-2 TP / (|G| + |P| + 1) over the whole batch; both inverted when |G| = 0."""
  empty = jnp.sum(target) == 0
  p = jnp.where(empty, 1.0 - probabilities, probabilities)
  g = jnp.where(empty, 1.0 - target, target)
  return -2.0 * jnp.sum(p * g) / (jnp.sum(g) + jnp.sum(p) + 1.0)


def rotate_pair(image, mask, degrees: float):
  """The image (bilinear) and its mask (nearest) rotated about the centre, fill 0."""
  size = image.shape[0]
  matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), degrees, 1.0)
  turn = lambda x, flags: cv2.warpAffine(x, matrix, (size, size), flags=flags,
                                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return turn(image, cv2.INTER_LINEAR), turn(mask, cv2.INTER_NEAREST)


@functools.lru_cache(maxsize=4)
def compiled(channels: int, dtype_name: str):
  """The model and its jitted functions (one compile per evaluation): init, the two
  phases' train steps and the test forward."""
  model = TransferUNet(config_lib.compute_dtype(dtype_name))

  to_input = functools.partial(image_input, channels=channels)

  def init(key, images):
    return model.init(key, to_input(images), train_encoder=False, train_decoder=False)

  def make_step(phase: int):
    tx = optax.adam(1.0)   # the lr scales the update (probes.scaled_train_step's way)

    def loss_fn(trainable, frozen, stats, images, masks):
      params = {**frozen, **trainable}
      logits, updated = model.apply({"params": params, "batch_stats": stats},
                                    to_input(images), train_encoder=phase == 2,
                                    train_decoder=True, mutable=["batch_stats"])
      return soft_dice_loss(jax.nn.sigmoid(logits), masks), updated["batch_stats"]

    @jax.jit
    def step(state, opt_state, frozen, images, masks, lr):
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["trainable"], frozen, state["batch_stats"], images, masks)
      updates, opt_state = tx.update(grads, opt_state, state["trainable"])
      updates = jax.tree.map(lambda u: lr * u, updates)
      return ({"trainable": optax.apply_updates(state["trainable"], updates),
               "batch_stats": {**state["batch_stats"], **stats}}, opt_state, loss)
    return tx, step

  @jax.jit
  def probabilities(variables, images):
    return jax.nn.sigmoid(model.apply(variables, to_input(images), train_encoder=False,
                                      train_decoder=False))

  return jax.jit(init), {1: make_step(1), 2: make_step(2)}, probabilities


def predict(probabilities_fn, variables, images, batch_size: int) -> np.ndarray:
  """Probabilities [N, S, S] in batches of `batch_size` (the last one padded: one compile)."""
  out = []
  for start, stop in features.batches(len(images), batch_size):
    batch = features.pad_to(images[start:stop], batch_size)
    out.append(np.asarray(probabilities_fn(variables, batch))[:stop - start])
  return np.concatenate(out)


def fit(encoder: UNetEncoder, images, masks, *, cfg, seed: int, dtype: str,
        eval_batch: int):
  """(variables of the best phase-2 model, log) for one structure and training list."""
  init, steps, probabilities_fn = compiled(encoder.channels, dtype)
  variables = jax.device_get(init(jax.random.key(seed), images[:1]))
  params, stats = dict(variables["params"]), dict(variables["batch_stats"])
  if encoder.variables is not None:
    params["encoder"] = encoder.variables["params"]
    stats["encoder"] = encoder.variables["batch_stats"]
  count = len(images)
  num_val = max(1, int(round(cfg.val_fraction * count))) if count > 1 else 0
  val, train = slice(0, num_val), slice(num_val, count)   # the first 20 % validate
  train_images, train_masks = images[train], masks[train]
  val_images, val_masks = (images[val], masks[val]) if num_val else (images, masks)
  rng = np.random.default_rng([seed, 0x5E6])
  loop = ml_collections.ConfigDict(dict(
      epochs=cfg.epochs, min_steps=1, batch_size=cfg.batch_size, num_evals=cfg.epochs,
      constant_lr=cfg.lr))
  log = {}
  for phase in (1, 2):
    tx, step = steps[phase]
    frozen_names = ("encoder",) if phase == 1 else ()
    frozen = {k: v for k, v in params.items() if k in frozen_names}
    state = {"trainable": {k: v for k, v in params.items() if k not in frozen_names},
             "batch_stats": stats}

    def train_step(state, opt_state, rows, lr, frozen=frozen, step=step):
      pairs = [rotate_pair(train_images[r], train_masks[r],
                           rng.uniform(-cfg.rotation, cfg.rotation)) for r in rows]
      x = np.stack([p[0] for p in pairs])
      y = np.stack([p[1] for p in pairs]).astype(np.float32)
      return step(state, opt_state, frozen, x, y, lr)

    def validate(state, frozen=frozen):
      variables = {"params": {**frozen, **state["trainable"]},
                   "batch_stats": state["batch_stats"]}
      p = predict(probabilities_fn, variables, val_images, eval_batch)
      return -float(soft_dice_loss(p, val_masks.astype(np.float32)))

    best, log[f"phase{phase}"] = probes.fit_keep_best(
        train_step, state, tx.init(state["trainable"]), cfg=loop, count=len(train_images),
        seed=seed + phase, validate=validate, from_start=phase == 2)
    params = {**frozen, **best["trainable"]}
    stats = best["batch_stats"]
  return {"params": params, "batch_stats": stats}, log


# ------------------------------------------------------------------ the protocol
def image_dice(probabilities, truth) -> np.ndarray:
  """Dice per image of `probabilities > 0.5` (1 where both are empty)."""
  predicted = probabilities > 0.5
  return np.array([metrics.dice(p, t) if (p.any() or t.any()) else 1.0
                   for p, t in zip(predicted, truth.astype(bool))])


def run_protocol(config, encoder: UNetEncoder, splits, out_dir: str, log=print) -> dict:
  cfg = config.transfer
  train, test = splits["train"], splits["test"]
  for name in cfg.structures:
    if name not in STRUCTURES:
      raise ValueError(f"config transfer.structures: unknown {name!r}; use "
                       f"{sorted(STRUCTURES)}")
  check_image_size(test.images[..., None])
  _, _, probabilities_fn = compiled(encoder.channels, config.model.dtype)
  records, figure = [], {"structures": list(cfg.structures), "predictions": {}}
  shown = test.images[:cfg.figure_images]
  for seed in config.seeds:
    for fraction in config.label_fractions:
      positions = data_lib.subset_positions(train, fraction, int(seed), config.data,
                                            f"{out_dir}/splits" if out_dir else None)
      per_structure = {}
      for name in cfg.structures:
        variables, fit_log = fit(encoder, train.images[positions],
                                 structure_mask(train.anatomy[positions], name), cfg=cfg,
                                 seed=int(seed), dtype=config.model.dtype,
                                 eval_batch=config.batch_size)
        probabilities = predict(probabilities_fn, variables, test.images, config.batch_size)
        dice = image_dice(probabilities, structure_mask(test.anatomy, name))
        per_structure[name] = float(dice.mean())
        records.append(dict(method="transfer", metric="dice", cls=name, seed=int(seed),
                            label_fraction=float(fraction), value=float(dice.mean()),
                            std_over_images=float(dice.std()),
                            num_labelled=int(len(positions)),
                            best_epoch={p: l.get("best_step") for p, l in fit_log.items()}))
        if seed == config.seeds[0] and fraction == max(config.label_fractions):
          figure["predictions"][name] = probabilities[:len(shown)]
        log(f"  {name:9s} seed {seed} {100 * fraction:5g}% masks: test Dice "
            f"{dice.mean():.4f} ± {dice.std():.4f}")
      records.append(dict(method="transfer", metric="dice", cls="mean", seed=int(seed),
                          label_fraction=float(fraction),
                          value=float(np.mean(list(per_structure.values())))))
  figure["examples"] = [{"image": shown[i],
                         "truth": {n: structure_mask(test.anatomy[i], n)
                                   for n in cfg.structures}} for i in range(len(shown))]
  if encoder.clusters is not None:
    figure["clusters"] = cluster_maps(encoder, shown)
  figure["label_fraction"] = max(config.label_fractions)
  return {"records": records, "notes": [], "figures": figure}


def cluster_maps(encoder: UNetEncoder, images) -> np.ndarray:
  """[N, S, S] the LD run's arg-max region per pixel."""
  whole = dict(encoder.clusters)
  model = LDUNet(num_clusters=whole.pop("num_clusters"))
  _, assignments = model.apply(whole, image_input(images, encoder.channels), train=False)
  return np.asarray(jnp.argmax(assignments, -1))
