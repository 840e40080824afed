"""The encoder under evaluation (`--init=RUN_DIR|random|weights file`) and its features.

An `Encoder` is a ViT module (never scanned: evaluation sees the per-block layout that
`method.encoder` and the export return), its parameters, the image size it was trained at
and where it came from. Feature extraction runs one jitted forward at a fixed batch size
(the last batch padded) on the default device, and returns NumPy arrays: the CLS token,
the mean of the patch tokens and, when asked, every patch token.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from anatjax import config as config_lib, export
from anatjax.methods.common import normalize
from anatjax.models.vit import ViT, parse_variant

FEATURES = ("cls", "mean", "cls+mean")


@dataclasses.dataclass(eq=False)
class Encoder:
  vit: ViT
  params: dict
  image_size: int       # the size it was (pre)trained at
  channels: int
  info: dict            # init, kind, variant, depth, step, method, ... (for the report)

  @property
  def patch_size(self) -> int:
    return self.vit.patch_size

  @property
  def width(self) -> int:
    return self.vit.width

  @property
  def depth(self) -> int:
    return self.vit.depth

  def grid(self, image_size: int) -> int:
    if image_size % self.patch_size:
      raise ValueError(f"image size {image_size} is not a multiple of the encoder's patch "
                       f"size {self.patch_size}")
    return image_size // self.patch_size

  def tokens(self, params, images_uint8):
    """uint8 [B, S, S] -> tokens [B, 1 + L, D] (CLS first), float32; traceable."""
    return self.vit.apply({"params": params}, normalize(images_uint8, self.channels))

  # Compiled functions live on the encoder, so every probe, classifier and fine-tuning
  # run of one evaluation shares them (a new closure per call would recompile).
  @functools.cached_property
  def _forward(self):
    def forward(params, images):
      tokens = self.tokens(params, images)
      return tokens[:, 0], jnp.mean(tokens[:, 1:], axis=1), tokens[:, 1:]
    return jax.jit(forward)

  @functools.cached_property
  def pooled_logits(self):
    """jit (params, head {w, b, mu, sd}, images) -> logits of a mean-pooled linear head."""
    def logits(params, head, images):
      pooled = jnp.mean(self.tokens(params, images)[:, 1:], axis=1)
      return ((pooled - head["mu"]) / head["sd"]) @ head["w"] + head["b"]
    return jax.jit(logits)


def build_vit(model_config) -> ViT:
  """The (unscanned) ViT a config's model block describes."""
  vit = parse_variant(model_config.variant, model_config.depth)
  return ViT(**vit, dtype=config_lib.compute_dtype(model_config.dtype))


def _describe(vit: ViT, model_config) -> dict:
  return {"variant": model_config.variant, "width": vit.width, "depth": vit.depth,
          "patch_size": vit.patch_size, "channels": model_config.channels}


@functools.lru_cache(maxsize=2)
def _random_params(vit: ViT, size: int, channels: int, seed: int) -> dict:
  # Cached: compiling the initialiser takes seconds even for tiny models on a CPU.
  params = jax.jit(vit.init)(jax.random.key(seed),
                             jnp.zeros((1, size, size, channels), jnp.float32))["params"]
  return jax.device_get(params)


def random_encoder(config) -> Encoder:
  """A freshly initialised encoder (config.model; seed config.seed): the no-pretraining
  baseline, evaluated exactly like a trained one."""
  vit = build_vit(config.model)
  size, channels = config.model.image_size, config.model.channels
  params = _random_params(vit, size, channels, int(config.seed))
  info = {"init": "random", "kind": "random", "seed": config.seed,
          **_describe(vit, config.model), "image_size": size}
  return Encoder(vit, params, size, channels, info)


def run_encoder(workdir: str, which: str = "auto", step: int | None = None) -> Encoder:
  """The encoder of a training run's checkpoint (default: the newest step; `which` as
  the method's `encoder` takes it)."""
  from anatjax import train as trainer  # pylint: disable=g-import-not-at-top
  run_config, method, state, step = trainer.load_checkpoint(workdir, step)
  params = method.encoder(state["params"], state["method_state"], which)
  vit = build_vit(run_config.model)
  info = {"init": os.path.abspath(workdir), "kind": "run", "method": method.name,
          "which": which, "step": int(step), **_describe(vit, run_config.model),
          "image_size": run_config.data.image_size}
  return Encoder(vit, params, run_config.data.image_size, run_config.model.channels, info)


def file_encoder(path: str, config) -> Encoder:
  """An encoder of the architecture config.model describes, weights from a file."""
  vit = build_vit(config.model)
  size, channels = config.model.image_size, config.model.channels
  target = jax.eval_shape(
      lambda: vit.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"])
  params = export.import_encoder(path, target, image_size=size, which=config.which)
  info = {"init": os.path.abspath(path), "kind": "file", "which": config.which,
          **_describe(vit, config.model), "image_size": size}
  return Encoder(vit, params, size, channels, info)


def load_encoder(init: str, config, step: int | None = None) -> Encoder:
  """`init`: 'random', a run directory (with checkpoints/), or a weights file."""
  if init == "random":
    return random_encoder(config)
  if os.path.isdir(init):
    if not os.path.isdir(os.path.join(init, "checkpoints")):
      raise ValueError(f"--init={init}: a directory, but not a training run (no "
                       "checkpoints/ inside)")
    return run_encoder(init, config.which, step)
  if os.path.isfile(init):
    return file_encoder(init, config)
  raise ValueError(f"--init={init!r}: expected 'random', a run directory or a weights "
                   "file; nothing exists at that path")


def eval_image_size(encoder: Encoder, config) -> int:
  """config.data.image_size, or the encoder's own size when it is 0."""
  size = config.data.image_size or encoder.image_size
  encoder.grid(size)
  return size


def batches(count: int, batch_size: int):
  """(start, stop) of consecutive batches covering [0, count)."""
  for start in range(0, count, batch_size):
    yield start, min(start + batch_size, count)


def pad_to(x: np.ndarray, size: int) -> np.ndarray:
  if len(x) == size:
    return x
  pad = np.zeros((size - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def extract(encoder: Encoder, images: np.ndarray, batch_size: int, params=None,
            tokens: bool = False) -> dict[str, np.ndarray]:
  """Features of uint8 images [N, S, S]: {"cls", "mean"} [N, D] and "tokens" [N, L, D].

  One compiled forward (fixed batch, last batch padded); outputs are float32 NumPy.
  """
  params = encoder.params if params is None else params
  out = {"cls": [], "mean": [], "tokens": []}
  for start, stop in batches(len(images), batch_size):
    cls, mean, toks = encoder._forward(params, pad_to(images[start:stop], batch_size))
    n = stop - start
    out["cls"].append(np.asarray(cls[:n]))
    out["mean"].append(np.asarray(mean[:n]))
    if tokens:
      out["tokens"].append(np.asarray(toks[:n]))
  if not tokens:
    del out["tokens"]
  return {k: np.concatenate(v) for k, v in out.items()}


def pooled(features: dict[str, np.ndarray], kind: str) -> np.ndarray:
  """The image-level representation a probe reads: 'cls', 'mean' or 'cls+mean'."""
  if kind not in FEATURES:
    raise ValueError(f"features={kind!r}: use one of {FEATURES}")
  if kind == "cls+mean":
    return np.concatenate([features["cls"], features["mean"]], axis=1)
  return features[kind]
