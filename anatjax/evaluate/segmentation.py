"""Protocol 4: segmentation transfer — anatomy masks from 10 % and 100 % of the train masks.

The model is the encoder plus a light decoder on its final patch tokens, SETR-PUP
(Zheng et al., CVPR 2021, "progressive upsampling") with few channels: the token grid
goes through stages of 3x3 conv -> norm -> ReLU -> 2x bilinear upsampling until it
reaches the image size (3 stages for 8-pixel patches, 4 for 16), then a 1x1 conv gives
per-pixel logits over the 12 anatomy labels. The channels halve at each stage (the
convolutions at the finer grids dominate the cost on a CPU), and a per-pixel LayerNorm
takes the place of SETR's BatchNorm, so the model has no batch statistics to carry and a
prediction does not depend on the batch it is in. Two modes share every line but what
is trained:
- finetune: encoder and decoder end to end, the encoder with layer-wise lr decay (the
  optimiser, schedule, batch order and best-on-validation loop of `probes`' fine-tuning);
- frozen: the decoder only, on the fixed encoder (how much the tokens hold as they are).
Loss: mean pixel softmax cross-entropy + `dice_weight` x (1 - soft Dice), the soft Dice
taken over the batch per label and averaged over labels (the CE + Dice of nnU-Net; it
keeps thin structures such as the clavicles and trachea from being traded away for the
large ones). The masks of a subset are those of the label subsets of `data` (the same
seeded, nested images as protocol 1, written to OUT/splits/).
Metric: Dice per label on the test split, pooled over all test pixels (2 TP / (2 TP + FP +
FN), scikit-learn's per-class F1 on the flattened label maps), and the mean over the
structures, background excluded. The evaluation point with the best validation mean Dice
is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatjax import losses
from anatjax.evaluate import data as data_lib, features as features_lib, metrics, probes

MODES = ("finetune", "frozen")
# Background (outside the body) is a label to predict but not a structure to score.
NOT_IN_MEAN = ("background",)


class ProgressiveUpsampling(nn.Module):
  """SETR-PUP: patch tokens [B, L, D] -> logits [B, S, S, num_classes], float32.

  Stage i: 3x3 conv to channels / 2^i, LayerNorm over the channels, ReLU, 2x bilinear
  upsampling; then a 1x1 conv to the classes at full resolution.
  """
  num_classes: int
  image_size: int
  channels: int = 64

  @nn.compact
  def __call__(self, patch_tokens):
    batch, length, _ = patch_tokens.shape
    grid = int(round(length ** 0.5))
    x = patch_tokens.astype(jnp.float32).reshape(batch, grid, grid, -1)
    stage = 0
    while x.shape[1] < self.image_size:
      width = max(1, self.channels // 2 ** stage)
      x = nn.relu(nn.LayerNorm(epsilon=1e-6)(nn.Conv(width, (3, 3))(x)))
      side = min(2 * x.shape[1], self.image_size)   # a last partial step for odd patches
      x = jax.image.resize(x, (batch, side, side, width), "bilinear")
      stage += 1
    return nn.Conv(self.num_classes, (1, 1))(x)


def segmentation_loss(logits, labels, dice_weight: float):
  """Mean pixel cross-entropy + dice_weight x (1 - soft Dice averaged over labels), the
  Dice smoothed by 1 (losses.soft_dice_and_cross_entropy)."""
  cross_entropy, soft_dice = losses.soft_dice_and_cross_entropy(logits, labels, 1.0)
  return cross_entropy + dice_weight * (1 - soft_dice)


# ------------------------------------------------------------------ the model
def logits_fn(encoder, decoder):
  """(params {encoder, decoder}, uint8 images) -> pixel logits; traceable."""
  def logits(params, images):
    tokens = encoder.tokens(params["encoder"], images)[:, 1:]
    return decoder.apply({"params": params["decoder"]}, tokens)
  return logits


@functools.lru_cache(maxsize=8)
def predict_fn(encoder, decoder):
  """jit (params, images) -> uint8 label maps, one compile per encoder and decoder."""
  logits = logits_fn(encoder, decoder)
  return jax.jit(lambda params, images: jnp.argmax(logits(params, images), -1)
                 .astype(jnp.uint8))


@dataclasses.dataclass(eq=False)
class Segmenter:
  """Encoder + decoder with their parameters, applied to uint8 images [N, S, S]."""
  encoder: features_lib.Encoder
  decoder: ProgressiveUpsampling
  params: dict           # {"encoder", "decoder"}

  def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(list(self._predicted_batches(images, batch_size)))

  def confusion(self, images, labels, batch_size: int) -> np.ndarray:
    """The pixel confusion matrix over a split, accumulated batch by batch (bounded
    memory at any split size)."""
    k = self.decoder.num_classes
    total = np.zeros((k, k), np.int64)
    for (start, stop), predicted in zip(features_lib.batches(len(images), batch_size),
                                        self._predicted_batches(images, batch_size)):
      total += metrics.confusion_matrix(labels[start:stop], predicted, k)
    return total

  def _predicted_batches(self, images, batch_size: int):
    predict = predict_fn(self.encoder, self.decoder)
    for start, stop in features_lib.batches(len(images), batch_size):
      batch = features_lib.pad_to(images[start:stop], batch_size)
      yield np.asarray(predict(self.params, batch))[:stop - start]


@functools.lru_cache(maxsize=8)
def decoder_init_fn(decoder, grid: int, width: int):
  """jit seed -> the decoder's initial parameters for a grid x grid of width-D tokens."""
  tokens = jnp.zeros((1, grid * grid, width), jnp.float32)

  def init(seed):
    # An RBG key (XLA's RngBitGenerator): it compiles in a fraction of threefry's time on
    # a CPU, and is as deterministic given the seed.
    return decoder.init(jax.random.key(seed, impl="rbg"), tokens)["params"]
  return jax.jit(init)


@functools.lru_cache(maxsize=4)
def train_step_fn(encoder, decoder, image_size: int, trains_encoder: bool,
                  layer_decay: float, weight_decay: float, dice_weight: float):
  """(optimizer, jit (trainable, opt_state, fixed, images, labels, lr) -> trainable,
  opt_state, loss). `trainable` holds the decoder, and the encoder when fine-tuning;
  `fixed` the frozen encoder otherwise. The optimizer is probes' fine-tuning AdamW, in
  which everything outside the encoder gets the full lr."""
  init = decoder_init_fn(decoder, encoder.grid(image_size), encoder.width)
  shapes = {"decoder": jax.eval_shape(init, 0)}
  if trains_encoder:
    shapes["encoder"] = encoder.params
  tx = probes.finetune_optimizer(shapes, encoder.depth, layer_decay, weight_decay)
  logits = logits_fn(encoder, decoder)

  def loss_fn(trainable, fixed, images, labels):
    return segmentation_loss(logits({**fixed, **trainable}, images), labels, dice_weight)

  return tx, probes.scaled_train_step(loss_fn, tx)


def fit(encoder, mode: str, images, labels, val, *, config, seed: int
        ) -> tuple[Segmenter, dict]:
  """Trains the decoder (and in 'finetune' mode the encoder) on images [N, S, S] with
  label maps `labels`; returns the segmenter at the evaluation with the best validation
  mean Dice, and the training log."""
  if mode not in MODES:
    raise ValueError(f"config modes: unknown mode {mode!r}; use one of {MODES}")
  cfg, seg = config.finetune, config.segmentation
  size = images.shape[-1]
  decoder = ProgressiveUpsampling(len(data_lib.ANATOMY_NAMES), size,
                                  int(seg.decoder_channels))
  trainable = {"decoder": decoder_init_fn(decoder, encoder.grid(size), encoder.width)(seed)}
  fixed = {}
  if mode == "finetune":   # a copy: the train step donates it, the encoder's own survives
    trainable["encoder"] = jax.tree.map(jnp.array, encoder.params)
  else:   # on the device once, not copied there at every step
    fixed["encoder"] = jax.tree.map(jnp.asarray, encoder.params)
  tx, train_step = train_step_fn(encoder, decoder, size, mode == "finetune",
                                 float(cfg.layer_decay), float(cfg.weight_decay),
                                 float(seg.dice_weight))

  def segmenter(params):
    return Segmenter(encoder, decoder, {**fixed, **params})

  def validate(params):
    confusion = segmenter(params).confusion(val.images, val.anatomy, config.batch_size)
    return dice_result(confusion)["mean"]

  best, log = probes.fit_keep_best(
      lambda p, s, rows, lr: train_step(p, s, fixed, images[rows], labels[rows], lr),
      trainable, tx.init(trainable), cfg=cfg, count=len(images), seed=seed,
      validate=validate)
  return segmenter(best), log


# ------------------------------------------------------------------ the protocol
def dice_result(confusion: np.ndarray) -> dict:
  """{"mean", "per_class", "excluded"} (the shape of metrics.multilabel_auroc): Dice per
  label, and the mean over the structures (not background) whose Dice is defined;
  `excluded` names the structures left out because no pixel of the evaluated set has
  them in the truth or the prediction."""
  names = data_lib.ANATOMY_NAMES
  per_class = dict(zip(names, metrics.per_class_dice(confusion).tolist()))
  structures = {n: v for n, v in per_class.items() if n not in NOT_IN_MEAN}
  defined = [v for v in structures.values() if not math.isnan(v)]
  return {"mean": float(np.mean(defined)) if defined else math.nan,
          "per_class": per_class,
          "excluded": [n for n, v in structures.items() if math.isnan(v)]}


def run_protocol(config, encoder, splits, out_dir: str, log=print) -> dict:
  """Each mode at each mask fraction and seed; test Dice per structure."""
  train, val, test = splits["train"], splits["val"], splits["test"]
  records, notes, predictions = [], [], {}
  for seed in config.seeds:
    for fraction in config.label_fractions:
      positions = data_lib.subset_positions(train, fraction, int(seed), config.data,
                                            f"{out_dir}/splits" if out_dir else None)
      for mode in config.modes:
        model, fit_log = fit(encoder, mode, train.images[positions], train.anatomy[positions],
                             val, config=config, seed=int(seed))
        result = dice_result(model.confusion(test.images, test.anatomy, config.batch_size))
        if result["excluded"]:
          notes.append(f"{mode}, seed {seed}, {100 * fraction:g}% masks: no test pixel is "
                       f"or is predicted {', '.join(result['excluded'])} (left out of the "
                       "mean)")
        log(f"  {mode:8s} seed {seed} {100 * fraction:5g}% masks: test mean Dice "
            f"{result['mean']:.4f} (best step {fit_log['best_step']}/{fit_log['steps']})")
        records += probes.class_records(result, "dice", method=mode, seed=int(seed),
                                        label_fraction=float(fraction),
                                        num_labelled=int(len(positions)),
                                        best_step=fit_log["best_step"],
                                        steps=fit_log["steps"], val_dice=fit_log["best_val"])
        if seed == config.seeds[0] and fraction == max(config.label_fractions):
          predictions[mode] = model.predict(test.images[:config.segmentation.figure_images],
                                            config.batch_size)
  return {"records": records, "notes": notes,
          "figures": figure_data(test, predictions, max(config.label_fractions))}


def figure_data(test, predictions: dict, fraction: float) -> dict:
  """A few test images with their true anatomy and each mode's prediction."""
  count = min((len(p) for p in predictions.values()), default=0)
  return {"label_fraction": fraction, "modes": list(predictions),
          "examples": [{"image": test.images[i], "truth": test.anatomy[i],
                        **{mode: p[i] for mode, p in predictions.items()}}
                       for i in range(count)]}
