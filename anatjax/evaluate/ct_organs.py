r"""Alice's downstream evaluation on the synthetic CT phantom: multi-organ segmentation by
fine-tuning a 3-D Swin encoder under a light decoder (shared/methods/alice.md section 6,
scaled to what the phantom and a CPU allow).

  python -m anatjax.evaluate.ct_organs --config=configs/eval/ct_organs.py:runlocal \
      --init=random|RUN_DIR|ENCODER.safetensors [--workdir=OUT] [--step=N]

Why this protocol: the spec fine-tunes SwinUNETR on BTCV / FLARE and reports mean organ
Dice with 10-100 % of the labelled cases. The phantom has organ labels, so the same
question (does the pretrained encoder make a segmenter better, most of all with few
labels?) can be asked of any Swin export without a download.

Cohort. Phantom subjects of a held-out population (`data.population_seed`; a run whose
pretraining rendered that population is refused), rendered on a `data.synthetic_size`^3
grid (as pretraining renders them) and resampled to `data.spacing_mm` (z, y, x), the
image linearly, the labels nearest. The HU go through pretraining's window: clipped to
[-125, 225] and x = (HU + 125) / 350 in [0, 1] (anatjax.data.alice_pairs.to_unit). Each
volume is cropped to its foreground, the bounding box of the voxels inside the window
(> -125 HU) and of the organs, as MONAI's CropForegroundd does in the SwinUNETR recipe:
the air around the body is free background that would only cost inference time.
Classes (ORGANS): background 0 and 8 organs of the phantom's labels - liver, spleen,
right and left kidney, stomach, aorta, heart, and the lungs (right and left merged: two
lungs that differ only by side would add a second lateral pair to the kidneys, not a
new kind of structure). Splits: `data.num_train`, `num_val`, `num_test` consecutive
subject indices from `data.first_index`. Each subject is cached as an .npz in
`data.cache_dir` (default OUT/cohort), keyed by everything that makes it, so evaluating
a second encoder renders nothing.

Model. anatjax.models.swin3d.SwinViT3D (hidden states h0..h4) under
anatjax.models.alice.ReconstructionDecoder with one output channel per class: the
decoder Alice pretrains with, re-initialised, its last layer giving the logits at full
resolution. The encoder (`--init`): 'random' (SwinViT3D's own initialisers, the
geometry of `model`), a pretraining run directory (its encoder, `which`: auto = the
teacher; geometry from its parameters and its config's window and patch merge) or a
MONAI swinViT safetensors file as anatjax.export.swin3d.export_swin3d writes it (window
and patch merge from the file's metadata, else from `model`). The decoder is always new;
initialisation keys are seeds of JAX's "rbg" generator, whose initialisers compile in
milliseconds on a CPU (threefry's take seconds per parameter shape).

Fine-tuning, per label fraction (`fractions`) and seed (`seeds`): a seeded permutation of
the training subjects, of which the first max(1, round(f N)) are used (so the 10 %
subset lies inside the 100 % one). Each step takes `train.crops_per_volume` crops of
`train.crop_size`^3 from each of `train.volumes_per_step` random subjects, their centres
alternating between a random organ voxel and a random background voxel (1:1, MONAI's
RandCropByPosNegLabeld), shifted to keep the crop inside the volume (a volume smaller
than the crop is zero-padded at its end), and flips each crop along each axis with
probability `train.flip_prob`; a flip across the body (axis 2) swaps the left and right
kidney, so that a label still names a side of the image. Loss: cross-entropy + (1 - soft
Dice), the Dice pooled over the batch for each class (background included), smoothing
1e-5. AdamW (`train.lr`, `train.weight_decay`), constant rate, `train.steps` steps.
Every `train.eval_every` steps and at the end, the validation subjects are segmented
whole (below); the parameters of the best validation mean Dice are kept for the test.

Inference: a sliding window of the crop size over the whole (foreground-cropped) volume,
windows overlapping by `eval.overlap` (the last one per axis moved back to end at the
border), softmax probabilities blended with a Gaussian weight per window (sigma =
`eval.sigma_scale` x the window, centred), then the arg-max class.

Metric: per test volume, the Dice of each organ (NaN where the organ is neither true nor
predicted: skipped in means) and its mean over the organs; reported per organ and mean,
averaged over the test volumes (`value`), with every volume's numbers (`per_volume`).

Outputs: OUT/results.json (records {init, label_fraction, num_train_volumes, seed, metric
"dice", class (an organ or "mean"), value, per_volume, best_step, best_val_dice}, plus the
encoder, cohort and training history; rewritten after every run, `complete` at the end),
OUT/results.md (the table: mean ± std over seeds) and OUT/figures/ct_organs.png (an axial
and a coronal slice of the first test subject: image, ground truth, prediction of the
first seed at the largest fraction). Default OUT: RUN_DIR/eval/<config>, or
workdirs/eval/<config>_<random | file name>.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from anatjax import config as config_lib, export, losses
from anatjax.data import synthetic_ct
from anatjax.data.alice_pairs import WINDOW_HU, to_unit
from anatjax.data.volume import resample
from anatjax.evaluate import metrics, report
from anatjax.export import swin3d as swin_export
from anatjax.models.alice import ReconstructionDecoder
from anatjax.models.swin3d import SwinViT3D

# (class name, the phantom labels it is made of); class k is ORGANS[k - 1], 0 background.
ORGANS = (
    ("liver", ("liver",)),
    ("spleen", ("spleen",)),
    ("kidney_right", ("kidney_right",)),
    ("kidney_left", ("kidney_left",)),
    ("stomach", ("stomach",)),
    ("aorta", ("aorta",)),
    ("heart", ("heart",)),
    ("lungs", ("lung_right", "lung_left")),
)
ORGAN_NAMES = tuple(name for name, _ in ORGANS)
NUM_CLASSES = len(ORGANS) + 1
FLIP_ACROSS_BODY = 2          # axis 2 runs from the patient's right to the left
DICE_SMOOTH = 1e-5
# Bumped when the cached content of a subject changes, so that old caches are redone.
CACHE_VERSION = 1


# ------------------------------------------------------------------ classes
def class_lut() -> np.ndarray:
  """[len(LABEL_NAMES)] uint8: the class of each phantom label (0 for the unused ones)."""
  lut = np.zeros(len(synthetic_ct.LABEL_NAMES), np.uint8)
  for k, (_, labels) in enumerate(ORGANS, start=1):
    for label in labels:
      lut[synthetic_ct.LABEL_NAMES.index(label)] = k
  return lut


def mirror_lut() -> np.ndarray:
  """[NUM_CLASSES] the class a flip across the body turns each class into: X_left <->
  X_right, the others unchanged."""
  lut = np.arange(NUM_CLASSES, dtype=np.uint8)
  for k, name in enumerate(ORGAN_NAMES, start=1):
    for a, b in (("_left", "_right"), ("_right", "_left")):
      if name.endswith(a):
        lut[k] = ORGAN_NAMES.index(name[:-len(a)] + b) + 1
  return lut


# ------------------------------------------------------------------ the cohort
@dataclasses.dataclass
class Case:
  """One prepared subject: `image` in [0, 1] (float32), `labels` classes (uint8), both
  [D, H, W] on the evaluation grid, cropped to the foreground."""
  index: int
  image: np.ndarray
  labels: np.ndarray


def foreground_box(hu: np.ndarray, classes: np.ndarray) -> tuple[slice, ...]:
  """The bounding box of the voxels inside the HU window and of the organs."""
  inside = (hu > WINDOW_HU[0]) | (classes > 0)
  if not inside.any():
    raise ValueError("a phantom volume with nothing inside the HU window")
  box = []
  for axis in range(3):
    hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
    box.append(slice(int(hit[0]), int(hit[-1]) + 1))
  return tuple(box)


def prepare_subject(population_seed: int, index: int, synthetic_size: int,
                    spacing_mm) -> dict:
  """Renders one subject, resamples it, windows the HU, maps the labels to classes and
  crops the foreground: {"image": int16 HU in the window, "labels": uint8 classes}."""
  ct = synthetic_ct.subject(population_seed, index, shape=synthetic_size)
  image = resample(ct.image, spacing_mm, order=1).array
  labels = resample(ct.labels, spacing_mm, order=0, cval=0).array
  hu = np.clip(image, *WINDOW_HU).astype(np.int16)
  classes = class_lut()[labels]
  box = foreground_box(image, classes)
  return {"image": hu[box], "labels": classes[box]}


def cache_key(data) -> str:
  """What a cached subject depends on."""
  text = json.dumps({"population_seed": data.population_seed,
                     "synthetic_size": data.synthetic_size,
                     "spacing_mm": [float(s) for s in data.spacing_mm],
                     "organs": ORGANS, "window": WINDOW_HU, "version": CACHE_VERSION},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_indices(data) -> dict[str, list[int]]:
  """Consecutive subject indices per split, train first."""
  out, first = {}, data.first_index
  for split in ("train", "val", "test"):
    count = data[f"num_{split}"]
    if count < 1:
      raise ValueError(f"config data.num_{split}={count}: at least one subject is needed")
    out[split] = list(range(first, first + count))
    first += count
  return out


def load_case(data, index: int, cache_dir: str) -> Case:
  """The subject from the cache, prepared and cached first if it is not there."""
  path = os.path.join(cache_dir, f"subject_{cache_key(data)}_{index:05d}.npz")
  if not os.path.exists(path):
    prepared = prepare_subject(data.population_seed, index, data.synthetic_size,
                               tuple(data.spacing_mm))
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **prepared)
    os.replace(tmp, path)
  with np.load(path) as f:
    return Case(index, to_unit(f["image"]), f["labels"])


def build_cohort(data, cache_dir: str, log=print) -> dict[str, list[Case]]:
  """{"train", "val", "test"}: the prepared subjects of each split."""
  os.makedirs(cache_dir, exist_ok=True)
  start = time.time()
  cohort = {split: [load_case(data, i, cache_dir) for i in indices]
            for split, indices in split_indices(data).items()}
  shapes = sorted({c.image.shape for cases in cohort.values() for c in cases})
  log(f"Cohort: {', '.join(f'{len(v)} {k}' for k, v in cohort.items())} subjects of "
      f"population {data.population_seed} at {tuple(data.spacing_mm)} mm, volumes "
      f"{shapes[0]} to {shapes[-1]} ({time.time() - start:.0f} s; cache {cache_dir})")
  return cohort


# ------------------------------------------------------------------ the encoder
@dataclasses.dataclass(frozen=True)
class SwinGeometry:
  """SwinViT3D's constructor arguments (hashable: one compilation per geometry)."""
  feature_size: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int
  patch_size: int
  downsample: str = "mergingv2"
  mlp_ratio: float = 4.0
  qkv_bias: bool = True

  def min_multiple(self) -> int:
    """Crop edges must be multiples of this: each merge halves an even grid."""
    return self.patch_size * 2 ** len(self.depths)


@dataclasses.dataclass(eq=False)
class Encoder:
  """The encoder under evaluation: SwinViT3D parameters (None: a fresh one per seed),
  its geometry and what it is (`info`, in results.json)."""
  params: dict | None
  geometry: SwinGeometry
  info: dict


def _geometry_from_params(params, window_size, downsample: str, source: str) -> SwinGeometry:
  """The geometry the parameter shapes determine (one input channel, a cubic patch, as
  MONAI's SwinUNETR on CT), with the window and patch merge they do not show."""
  geo = swin_export.geometry(params)
  if geo["in_channels"] != 1 or len(set(geo["patch_size"])) != 1:
    raise ValueError(f"{source}: an encoder of {geo['in_channels']} input channels and "
                     f"patch {geo['patch_size']}; CT needs one channel, a cubic patch")
  return SwinGeometry(int(geo["feature_size"]), tuple(int(d) for d in geo["depths"]),
                      tuple(int(h) for h in geo["num_heads"]), int(window_size),
                      int(geo["patch_size"][0]), downsample, float(geo["mlp_ratio"]),
                      bool(geo["qkv_bias"]))


def _metadata_value(metadata: dict, key: str, default):
  """A value of an export's header metadata: JSON-encoded by anatjax's writer, taken as
  it is from other writers."""
  if key not in metadata:
    return default
  try:
    return json.loads(metadata[key])
  except json.JSONDecodeError:
    return metadata[key]


def file_encoder(path: str, model) -> Encoder:
  """A MONAI swinViT state dict in a safetensors file (anatjax.export.swin3d's layout)."""
  tensors, metadata = export.read_safetensors(path)
  window = _metadata_value(metadata, "window_size", model.window_size)
  downsample = _metadata_value(metadata, "downsample", model.downsample)
  if not isinstance(window, int):
    raise ValueError(f"--init={path}: window_size {window!r} in its metadata; this "
                     "protocol takes one window edge for all axes")
  params = swin_export.params_from_monai(tensors, window_size=window)
  geometry = _geometry_from_params(params, window, downsample, f"--init={path}")
  info = {"init": os.path.abspath(path), "kind": "file", "window_size": window,
          "downsample": downsample,
          **{k: _metadata_value(metadata, k, None) for k in ("method", "step")
             if k in metadata}}
  return Encoder(params, geometry, info)


def run_encoder(run_dir: str, which: str, population_seed: int,
                step: int | None = None) -> Encoder:
  """A pretraining run's 3-D Swin encoder (`which`), refused if it pretrained on the
  evaluation's phantom population."""
  from anatjax import train  # pylint: disable=g-import-not-at-top  (heavy: the trainer)
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise FileNotFoundError(f"--init={run_dir!r} is neither 'random', a .safetensors file "
                            "nor a run directory (no checkpoints/ in it)")
  config, method, state, step = train.load_checkpoint(run_dir, step)
  if "feature_size" not in config.model or "window_size" not in config.model:
    raise ValueError(f"--init={run_dir}: a {config.method} run, without a 3-D Swin "
                     "encoder (its config.model has no feature_size / window_size)")
  data = config.data
  if data.get("volumes") == "synthetic_ct" and data.get("source_seed") == population_seed:
    raise ValueError(f"config data.population_seed={population_seed} is the population "
                     f"{run_dir} pretrained on (its data.source_seed): pick another one")
  params = jax.device_get(method.encoder(state["params"], state["method_state"], which))
  downsample = config.model.get("downsample", "mergingv2")
  geometry = _geometry_from_params(params, config.model.window_size, downsample,
                                   f"--init={run_dir}")
  info = {"init": os.path.abspath(run_dir), "kind": "run", "method": config.method,
          "step": int(step), "which": which}
  return Encoder(params, geometry, info)


def load_encoder(init: str, config, step: int | None = None) -> Encoder:
  """--init: 'random', a .safetensors file or a run directory (module docstring)."""
  model = config.model
  if init == "random":
    geometry = SwinGeometry(model.feature_size, tuple(model.depths), tuple(model.num_heads),
                            model.window_size, model.patch_size, model.downsample)
    return Encoder(None, geometry, {"init": "random", "kind": "random"})
  if init.endswith(".safetensors"):
    return file_encoder(init, model)
  return run_encoder(init, config.which, config.data.population_seed, step)


# ------------------------------------------------------------------ model and steps
class OrganSegmenter(nn.Module):
  """x [n, D, H, W, 1] in [0, 1] -> logits [n, D, H, W, num_classes]."""
  geometry: SwinGeometry
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = SwinViT3D(**dataclasses.asdict(self.geometry), dtype=self.dtype,
                       name="encoder")(x)
    logits, _ = ReconstructionDecoder(self.num_classes, dtype=self.dtype,
                                      name="decoder")(hidden)
    return logits


def dice_ce_loss(logits, labels):
  """(cross-entropy + 1 - soft Dice, {"ce", "dice"}): the Dice of each class pooled over
  the batch's voxels, background included, then averaged over the classes; smoothed by
  DICE_SMOOTH."""
  ce, dice = losses.soft_dice_and_cross_entropy(logits, labels, DICE_SMOOTH)
  return ce + 1.0 - dice, {"ce": ce, "dice": dice}


@dataclasses.dataclass(frozen=True)
class Functions:
  """The segmenter's jitted functions and optimizer for one geometry."""
  init: object          # (key, x) -> params
  optimizer: optax.GradientTransformation
  step: object          # (params, opt_state, x, labels) -> (params, opt_state, metrics)
  probabilities: object   # (params, x) -> softmax [n, D, H, W, K]


@functools.lru_cache(maxsize=4)
def compiled(geometry: SwinGeometry, dtype_name: str, lr: float,
             weight_decay: float) -> Functions:
  """The model's jitted functions, one compilation per geometry and input shape."""
  model = OrganSegmenter(geometry, NUM_CLASSES, config_lib.compute_dtype(dtype_name))
  optimizer = optax.adamw(lr, weight_decay=weight_decay)

  def loss_fn(params, x, labels):
    return dice_ce_loss(model.apply({"params": params}, x), labels)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, labels):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **parts}

  return Functions(
      init=jax.jit(lambda key, x: model.init(key, x)["params"]),
      optimizer=optimizer, step=step,
      probabilities=jax.jit(lambda params, x: jax.nn.softmax(
          model.apply({"params": params}, x), axis=-1)))


def initial_params(functions: Functions, encoder: Encoder, crop: int, seed: int) -> dict:
  """The segmenter's parameters for `seed`: a new decoder, the encoder's or new ones."""
  params = functions.init(jax.random.key(seed, impl="rbg"),
                          jnp.zeros((1, crop, crop, crop, 1), jnp.float32))
  if encoder.params is None:
    return params
  new, given = jax.tree.map(np.shape, params["encoder"]), jax.tree.map(np.shape,
                                                                       encoder.params)
  if new != given:
    raise ValueError(f"{encoder.info['init']}: its parameters do not fit SwinViT3D"
                     f"{dataclasses.astuple(encoder.geometry)}")
  return {**params, "encoder": jax.tree.map(jnp.asarray, encoder.params)}


# ------------------------------------------------------------------ crops
def take_crop(array: np.ndarray, start, size: int) -> np.ndarray:
  """array[start : start + size] per axis, zero-padded at the end where it is shorter."""
  block = array[tuple(slice(s, s + size) for s in start)]
  return np.pad(block, [(0, size - n) for n in block.shape])


def crop_centre(rng: np.random.Generator, labels: np.ndarray, organ: bool,
                tries: int = 4096) -> np.ndarray:
  """A random organ voxel (organ=True) or background voxel: rejection sampling, which
  needs no index list of a large volume; any voxel if none is drawn."""
  flat = rng.integers(0, labels.size, tries)
  hits = flat[(labels.reshape(-1)[flat] > 0) == organ]
  return np.array(np.unravel_index(hits[0] if len(hits) else flat[0], labels.shape))


def crop_start(centre, shape, size: int) -> np.ndarray:
  """The start of the crop around `centre`, moved to keep the crop inside the volume."""
  return np.clip(np.asarray(centre) - size // 2, 0, np.maximum(np.asarray(shape) - size, 0))


def sample_batch(rng: np.random.Generator, cases: list[Case], train) -> tuple:
  """(x [B, s, s, s, 1] float32, labels [B, s, s, s] int32), B = volumes_per_step x
  crops_per_volume: organ- and background-centred crops in turn (1:1), random flips."""
  size, mirror = train.crop_size, mirror_lut()
  xs, ys = [], []
  for case in (cases[i] for i in rng.integers(0, len(cases), train.volumes_per_step)):
    for _ in range(train.crops_per_volume):
      centre = crop_centre(rng, case.labels, organ=len(xs) % 2 == 0)
      start = crop_start(centre, case.labels.shape, size)
      x, y = take_crop(case.image, start, size), take_crop(case.labels, start, size)
      for axis in range(3):
        if rng.random() < train.flip_prob:
          x, y = np.flip(x, axis), np.flip(y, axis)
          y = mirror[y] if axis == FLIP_ACROSS_BODY else y
      xs.append(x)
      ys.append(y)
  return np.stack(xs)[..., None], np.stack(ys).astype(np.int32)


# ------------------------------------------------------------------ sliding window
def window_starts(size: int, roi: int, overlap: float) -> list[int]:
  """Window starts along an axis of `size` (>= roi): a stride of roi (1 - overlap), the
  last window moved back to end at the border."""
  stride = max(1, int(roi * (1.0 - overlap)))
  count = math.ceil((size - roi) / stride) + 1
  return sorted({min(i * stride, size - roi) for i in range(count)})


def gaussian_weights(roi: int, sigma_scale: float) -> np.ndarray:
  """[roi]^3 the product of centred Gaussians of sigma = sigma_scale x roi, peak 1."""
  r = np.arange(roi) - (roi - 1) / 2.0
  g = np.exp(-0.5 * (r / (sigma_scale * roi)) ** 2)
  return (g[:, None, None] * g[None, :, None] * g[None, None, :]).astype(np.float32)


def sliding_window(predict, image: np.ndarray, roi: int, overlap: float,
                   sigma_scale: float, batch_size: int) -> np.ndarray:
  """[D, H, W, K] probabilities of `image` [D, H, W], blended over overlapping windows
  with Gaussian weights. predict(x [batch_size, roi, roi, roi, 1]) -> [.., K]; the last
  batch is padded (one compilation); a volume smaller than roi is zero-padded."""
  shape = image.shape
  padded = np.pad(image, [(0, max(roi - n, 0)) for n in shape])
  starts = [(z, y, x) for z in window_starts(padded.shape[0], roi, overlap)
            for y in window_starts(padded.shape[1], roi, overlap)
            for x in window_starts(padded.shape[2], roi, overlap)]
  weight = gaussian_weights(roi, sigma_scale)
  total, norm = None, np.zeros(padded.shape, np.float32)
  for first in range(0, len(starts), batch_size):
    chunk = starts[first:first + batch_size]
    x = np.stack([take_crop(padded, s, roi) for s in chunk])
    x = np.concatenate([x, np.zeros((batch_size - len(chunk),) + x.shape[1:], x.dtype)])
    p = np.asarray(predict(x[..., None]))
    if total is None:
      total = np.zeros(padded.shape + p.shape[-1:], np.float32)
    for (z, y, x0), probs in zip(chunk, p):
      region = (slice(z, z + roi), slice(y, y + roi), slice(x0, x0 + roi))
      total[region] += weight[..., None] * probs
      norm[region] += weight
  crop = tuple(slice(0, n) for n in shape)
  return total[crop] / norm[crop][..., None]


def segment(functions: Functions, params, image: np.ndarray, roi: int, evaluation) -> np.ndarray:
  """[D, H, W] uint8: the arg-max class of the blended sliding-window probabilities."""
  probabilities = sliding_window(lambda x: functions.probabilities(params, x), image, roi,
                                 evaluation.overlap, evaluation.sigma_scale,
                                 evaluation.batch_size)
  return np.argmax(probabilities, -1).astype(np.uint8)


def organ_dice(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """[len(ORGANS)] the Dice of each organ; NaN where it is neither true nor predicted."""
  confusion = metrics.confusion_matrix(truth, prediction, NUM_CLASSES)
  return metrics.per_class_dice(confusion)[1:]


def mean_dice(dice: np.ndarray) -> float:
  """The mean over the organs that are true or predicted (NaN: none)."""
  return float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan


def volume_dice(functions: Functions, params, cases: list[Case], roi: int, evaluation):
  """([V, organs] Dice, [V] mean Dice, the predictions) of every case."""
  predictions = [segment(functions, params, c.image, roi, evaluation) for c in cases]
  dice = np.stack([organ_dice(p, c.labels) for p, c in zip(predictions, cases)])
  return dice, np.array([mean_dice(d) for d in dice]), predictions


# ------------------------------------------------------------------ fine-tuning
def fine_tune(encoder: Encoder, train_cases: list[Case], val_cases: list[Case], config,
              seed: int, log=print) -> tuple[dict, dict]:
  """(the parameters of the best validation mean Dice, the history) of one fine-tuning."""
  t = config.train
  functions = compiled(encoder.geometry, config.model.dtype, float(t.lr),
                       float(t.weight_decay))
  params = initial_params(functions, encoder, t.crop_size, seed)
  opt_state = functions.optimizer.init(params)
  rng = np.random.default_rng([seed, len(train_cases), 0xC7])
  history = {"step": [], "loss": [], "val_dice": []}
  best, best_dice, best_step, recent = None, -math.inf, 0, []
  start = time.time()
  for step in range(1, t.steps + 1):
    x, labels = sample_batch(rng, train_cases, t)
    params, opt_state, m = functions.step(params, opt_state, x, labels)
    recent.append(m["loss"])
    if step % t.eval_every and step != t.steps:
      continue
    _, val, _ = volume_dice(functions, params, val_cases, t.crop_size, config.eval)
    val_dice, loss = float(np.nanmean(val)), float(np.mean(jax.device_get(recent)))
    history["step"].append(step)
    history["loss"].append(loss)
    history["val_dice"].append(val_dice)
    recent = []
    if best is None or val_dice > best_dice:   # NaN: no organ true or predicted
      best, best_dice, best_step = jax.device_get(params), val_dice, step
    log(f"    step {step}: loss {loss:.4f}, validation mean Dice {val_dice:.4f} "
        f"({time.time() - start:.0f} s)")
  history.update(best_step=best_step, best_val_dice=best_dice,
                 seconds=time.time() - start)
  return jax.device_put(best), history


def training_subsets(num_train: int, fractions, seed: int) -> dict[float, np.ndarray]:
  """{fraction: positions of the training cases}: the first max(1, round(f N)) of one
  seeded permutation, so smaller subsets lie inside larger ones."""
  order = np.random.default_rng([seed, 0x5B5]).permutation(num_train)
  return {float(f): np.sort(order[:max(1, int(round(f * num_train)))]) for f in fractions}


# ------------------------------------------------------------------ report
def records_of(dice: np.ndarray, means: np.ndarray, fields: dict) -> list[dict]:
  """One record per organ and one for the mean, each averaged over the test volumes."""
  def value(column):
    return float(np.nanmean(column)) if np.isfinite(column).any() else math.nan
  out = [dict(fields, metric="dice", **{"class": name}, value=value(dice[:, k]),
              per_volume=dice[:, k]) for k, name in enumerate(ORGAN_NAMES)]
  out.append(dict(fields, metric="dice", **{"class": "mean"}, value=value(means),
                  per_volume=means))
  return out


def describe(info: dict) -> str:
  if info["kind"] == "random":
    return "random initialisation"
  if info["kind"] == "run":
    return f"{info['method']} run {info['init']}, step {info['step']}, {info['which']} encoder"
  return f"weights file {info['init']}"


def markdown(results: dict) -> str:
  records, c = results["records"], results["cohort"]
  geo = results["encoder"]["geometry"]
  fractions = report.unique(records, "label_fraction")
  counts = {f: report.select(records, label_fraction=f)[0]["num_train_volumes"]
            for f in fractions}
  t = results["config"]["train"]
  lines = [f"# Organ segmentation on the synthetic CT phantom: "
           f"{describe(results['encoder'])}", "",
           f"Swin feature size {geo['feature_size']}, depths {tuple(geo['depths'])}, window "
           f"{geo['window_size']} + a new light decoder, fine-tuned {t['steps']} steps on "
           f"{t['crop_size']}^3 crops at {tuple(c['spacing_mm'])} mm; {c['num_train']} "
           f"training / {c['num_val']} validation / {c['num_test']} test subjects "
           f"(population {c['population_seed']}). Test Dice per organ, averaged over the "
           f"test volumes; mean ± std over seeds {results['seeds']}. "
           f"{results['seconds']:.0f} s.", "",
           report.table(["training volumes"] + list(ORGAN_NAMES) + ["mean"],
                        [[f"{counts[f]} ({100 * f:g} %)"] + [
                            report.summary(records, label_fraction=f, cls=name)
                            for name in ORGAN_NAMES + ("mean",)] for f in fractions])]
  if not results["complete"]:
    lines += ["", "(partial: the run is still going or was stopped)"]
  if results["figures"]:
    lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in results["figures"])]
  return "\n".join(lines) + "\n"


# BGR colour of each organ, distinct from each other and from the grey of the CT.
ORGAN_BGR = ((60, 90, 200), (160, 60, 160), (60, 180, 60), (40, 220, 200), (0, 140, 255),
             (40, 40, 230), (200, 120, 255), (230, 170, 40))


def _overlay(grey: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """BGR: the grey image, each organ blended with its colour."""
  img = report.grey_bgr(grey)
  colours = np.array(((0, 0, 0),) + ORGAN_BGR, np.uint8)
  blend = cv2.addWeighted(img, 0.4, colours[classes], 0.6, 0)
  return np.where(classes[..., None] > 0, blend, img)


def _busiest_slice(labels: np.ndarray, axis: int) -> int:
  """The slice along `axis` showing the most organs (ties: the most organ voxels)."""
  others = tuple(a for a in range(3) if a != axis)
  present = np.stack([(labels == k).any(others) for k in range(1, NUM_CLASSES)])
  score = present.sum(0) * labels.size + (labels > 0).sum(others)
  return int(np.argmax(score))


def figure(path: str, case: Case, prediction: np.ndarray, spacing_mm, title: str,
           size: int = 240) -> str:
  """Rows: an axial and a coronal slice (superior up; the patient's right on the left);
  columns: the image, the ground truth and the prediction, all at one mm per pixel scale
  (the longest side of the volume = `size` pixels)."""
  z, y = _busiest_slice(case.labels, 0), _busiest_slice(case.labels, 1)
  views = [("axial", lambda a: a[z], (spacing_mm[1], spacing_mm[2])),
           ("coronal", lambda a: a[::-1, y], (spacing_mm[0], spacing_mm[2]))]
  scale = size / max(n * s for n, s in zip(case.image.shape, spacing_mm))   # px per mm
  rows = []
  for name, cut, (s_rows, s_cols) in views:
    grey = np.uint8(np.clip(cut(case.image), 0, 1) * 255)
    shape = (max(1, round(grey.shape[1] * s_cols * scale)),
             max(1, round(grey.shape[0] * s_rows * scale)))
    grey = cv2.resize(grey, shape, interpolation=cv2.INTER_LINEAR)
    rows.append((name, [report.grey_bgr(grey)] + [
        _overlay(grey, cv2.resize(cut(c), shape, interpolation=cv2.INTER_NEAREST))
        for c in (case.labels, prediction)]))
  gap, label, top = 12, 16, 34
  width = max(panel.shape[1] for _, panels in rows for panel in panels)
  legend_rows = (len(ORGANS) + 1) // 2
  height = top + sum(p[0].shape[0] + label + gap for _, p in rows) + 16 * legend_rows + gap
  img = report.canvas(max(3 * (width + gap) + gap, 420), height)
  report.text(img, title, (gap, 20), 0.4)
  y0 = top
  for name, panels in rows:
    y0 += label
    for col, (panel, what) in enumerate(zip(panels, ("image", "truth", "prediction"))):
      x0 = gap + col * (width + gap)
      img[y0:y0 + panel.shape[0], x0:x0 + panel.shape[1]] = panel
      report.text(img, f"{name} {what}", (x0, y0 - 4), 0.35)
    y0 += panels[0].shape[0] + gap
  for column in range(2):
    report.legend(img, [(n, ORGAN_BGR[k]) for k, n in enumerate(ORGAN_NAMES)
                        if k // legend_rows == column],
                  (gap + column * 140, y0 + 10), dot=True)
  return report.save(path, img)


def write_outputs(workdir: str, results: dict):
  report.write_results(workdir, results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(report.jsonable(results)))


# ------------------------------------------------------------------ the command
def check_config(config, encoder: Encoder):
  """Refuses what the model or the protocol cannot run, naming the config key."""
  geo = encoder.geometry
  if geo.patch_size != 2:
    raise ValueError(f"{encoder.info['init']}: patch size {geo.patch_size} (for "
                     "--init=random: config model.patch_size); the segmentation decoder "
                     "upsamples h0 by 2, so it needs patch size 2")
  crop, multiple = config.train.crop_size, geo.min_multiple()
  if crop % multiple:
    raise ValueError(f"config train.crop_size={crop}: the encoder's {len(geo.depths)} stages "
                     f"with patch size {geo.patch_size} need a multiple of {multiple}")
  for f in config.fractions:
    if not 0 < f <= 1:
      raise ValueError(f"config fractions: {f} is not in (0, 1]")
  if not 0 <= config.eval.overlap < 1:
    raise ValueError(f"config eval.overlap={config.eval.overlap}: use a value in [0, 1)")


def run(config, init: str | Encoder, workdir: str, *, step: int | None = None,
        log=print) -> dict:
  """The command (module docstring). `init`: 'random', a run directory, a .safetensors
  file, or an Encoder."""
  start = time.time()
  encoder = init if isinstance(init, Encoder) else load_encoder(init, config, step)
  check_config(config, encoder)
  os.makedirs(workdir, exist_ok=True)
  data = config.data
  cohort = build_cohort(data, data.cache_dir or os.path.join(workdir, "cohort"), log)
  results = {
      "protocol": "ct_organs",
      "encoder": {**encoder.info, "geometry": dataclasses.asdict(encoder.geometry)},
      "organs": ORGAN_NAMES,
      "cohort": {"population_seed": data.population_seed,
                 "spacing_mm": tuple(data.spacing_mm),
                 "synthetic_size": data.synthetic_size,
                 **{f"num_{s}": len(v) for s, v in cohort.items()},
                 "indices": {s: [c.index for c in v] for s, v in cohort.items()}},
      "seeds": tuple(int(s) for s in config.seeds), "records": [], "runs": [],
      "figures": [], "complete": False, "config": config.to_dict(),
  }
  shown = None
  for seed in config.seeds:
    for fraction, positions in training_subsets(len(cohort["train"]), config.fractions,
                                                int(seed)).items():
      log(f"  seed {seed}, {len(positions)} training volumes ({100 * fraction:g} %):")
      train_cases = [cohort["train"][i] for i in positions]
      params, history = fine_tune(encoder, train_cases, cohort["val"], config, int(seed),
                                  log)
      functions = compiled(encoder.geometry, config.model.dtype, float(config.train.lr),
                           float(config.train.weight_decay))
      dice, means, predictions = volume_dice(functions, params, cohort["test"],
                                             config.train.crop_size, config.eval)
      fields = {"init": encoder.info["init"], "label_fraction": fraction,
                "num_train_volumes": len(positions), "seed": int(seed),
                "best_step": history["best_step"], "best_val_dice": history["best_val_dice"]}
      records = records_of(dice, means, fields)
      results["records"] += records
      results["runs"].append({**fields, "train_indices": [c.index for c in train_cases],
                              "history": history})
      if seed == config.seeds[0] and fraction == max(config.fractions):
        shown = predictions[0]
      log("    test Dice: " + ", ".join(f"{r['class']} {r['value']:.3f}" for r in records))
      results["seconds"] = time.time() - start
      write_outputs(workdir, results)
  results["figures"] = [os.path.relpath(figure(
      os.path.join(workdir, "figures", "ct_organs.png"), cohort["test"][0], shown,
      data.spacing_mm, f"Subject {cohort['test'][0].index}: {describe(encoder.info)}, "
      f"{100 * max(config.fractions):g} % of the training volumes"), workdir)]
  results.update(complete=True, seconds=time.time() - start)
  write_outputs(workdir, results)
  log(markdown(report.jsonable(results)))
  return results


def default_workdir(config_arg: str, init: str) -> str:
  name = config_lib.config_name(config_arg)
  if os.path.isdir(init):
    return os.path.join(init, "eval", name)
  stem = "random" if init == "random" else os.path.splitext(os.path.basename(init))[0]
  return os.path.join("workdirs", "eval", f"{name}_{stem}")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  workdir = f.workdir or default_workdir(f["config"].serialize().split("=", 1)[1], f.init)
  try:
    run(f.config, f.init, workdir, step=f.step, log=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"Error: {e}") from e
  print(f"Outputs in {os.path.abspath(workdir)}")


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "configs/eval/ct_organs.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("init", None, "'random', a pretraining run directory, or a MONAI "
                      "swinViT .safetensors file.", required=True)
  flags.DEFINE_string("workdir", None, "Output folder (default RUN_DIR/eval/<config>, or "
                      "workdirs/eval/<config>_<random | file name>).")
  flags.DEFINE_integer("step", None, "Checkpoint step of a run (default: newest).")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
