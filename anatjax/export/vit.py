"""The 2-D ViT's mapping between anatjax (big_vision names) and timm's VisionTransformer.

One explicit table: each row names the anatjax parameter(s), the timm state-dict key, the
transform to timm's layout and its inverse. Fused timm tensors (`attn.qkv`) take three
anatjax parameters in one row. Everything here is NumPy: no torch, no timm.

Positions are not a parameter in anatjax (a fixed MAE 2-D sin-cos table, CLS row zero), so
the export writes that table as timm's `pos_embed` [1, 1 + L, D] (and as big_vision's
`pos_embedding` in the .npz layout), and the import only checks a file's `pos_embed`
against the fixed table (see `anatjax.export.check_positions`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from anatjax.models.vit import sincos_2d

NAME = "vit"


@dataclasses.dataclass(frozen=True)
class Row:
  """anatjax parameter path(s) <-> one timm key.

  to_torch(*anatjax_arrays) -> the timm array;
  from_torch(timm_array, anatjax_shapes) -> tuple of anatjax arrays, one per path.
  """
  jax: tuple[str, ...]
  torch: str
  to_torch: Callable[..., np.ndarray]
  from_torch: Callable[[np.ndarray, Sequence[tuple]], tuple]


# ------------------------------------------------------------------ transforms and inverses
def _same(x):
  return x


def _same_inv(t, shapes):
  return (t.reshape(shapes[0]),)


def _conv(k):
  """flax Conv kernel [p, p, C, D] -> torch Conv2d weight [D, C, p, p]."""
  return k.transpose(3, 2, 0, 1)


def _conv_inv(w, shapes):
  return (w.transpose(2, 3, 1, 0),)


def _dense(k):
  """flax Dense kernel [in, out] -> torch Linear weight [out, in]."""
  return k.T


def _dense_inv(w, shapes):
  return (w.T,)


def _qkv(q, k, v):
  """three DenseGeneral kernels [D, H, hd] -> fused torch Linear weight [3*H*hd, D]."""
  return np.concatenate([x.reshape(x.shape[0], -1).T for x in (q, k, v)], axis=0)


def _qkv_inv(w, shapes):
  return tuple(part.T.reshape(shape) for part, shape in zip(np.split(w, 3, axis=0), shapes))


def _qkv_bias(q, k, v):
  """three biases [H, hd] -> fused [3*H*hd]."""
  return np.concatenate([x.reshape(-1) for x in (q, k, v)])


def _qkv_bias_inv(b, shapes):
  return tuple(part.reshape(shape) for part, shape in zip(np.split(b, 3), shapes))


def _out(k):
  """attention output DenseGeneral kernel [H, hd, D] -> torch Linear weight [D, H*hd]."""
  return k.reshape(-1, k.shape[-1]).T


def _out_inv(w, shapes):
  return (w.T.reshape(shapes[0]),)


# ------------------------------------------------------------------ the table
def depth_of(flat_params: Mapping[str, object]) -> int:
  """Number of `Transformer/encoderblock_{i}` blocks in a flat anatjax parameter dict."""
  blocks = {int(m.group(1)) for key in flat_params
            if (m := re.match(r"Transformer/encoderblock_(\d+)/", key))}
  return max(blocks) + 1 if blocks else 0


def table(depth: int) -> list[Row]:
  """The full anatjax <-> timm table of a ViT with `depth` blocks."""
  rows = [
      Row(("embedding/kernel",), "patch_embed.proj.weight", _conv, _conv_inv),
      Row(("embedding/bias",), "patch_embed.proj.bias", _same, _same_inv),
      Row(("cls",), "cls_token", _same, _same_inv),
  ]
  for i in range(depth):
    j, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    mha = j + "MultiHeadDotProductAttention_0/"
    rows += [
        Row((j + "LayerNorm_0/scale",), t + "norm1.weight", _same, _same_inv),
        Row((j + "LayerNorm_0/bias",), t + "norm1.bias", _same, _same_inv),
        Row(tuple(mha + n + "/kernel" for n in ("query", "key", "value")),
            t + "attn.qkv.weight", _qkv, _qkv_inv),
        Row(tuple(mha + n + "/bias" for n in ("query", "key", "value")),
            t + "attn.qkv.bias", _qkv_bias, _qkv_bias_inv),
        Row((mha + "out/kernel",), t + "attn.proj.weight", _out, _out_inv),
        Row((mha + "out/bias",), t + "attn.proj.bias", _same, _same_inv),
        Row((j + "LayerNorm_1/scale",), t + "norm2.weight", _same, _same_inv),
        Row((j + "LayerNorm_1/bias",), t + "norm2.bias", _same, _same_inv),
        Row((j + "MlpBlock_0/Dense_0/kernel",), t + "mlp.fc1.weight", _dense, _dense_inv),
        Row((j + "MlpBlock_0/Dense_0/bias",), t + "mlp.fc1.bias", _same, _same_inv),
        Row((j + "MlpBlock_0/Dense_1/kernel",), t + "mlp.fc2.weight", _dense, _dense_inv),
        Row((j + "MlpBlock_0/Dense_1/bias",), t + "mlp.fc2.bias", _same, _same_inv),
    ]
  rows += [
      Row(("Transformer/encoder_norm/scale",), "norm.weight", _same, _same_inv),
      Row(("Transformer/encoder_norm/bias",), "norm.bias", _same, _same_inv),
  ]
  return rows


# A scanned Transformer (ViT(scan=True)) keeps its blocks stacked under one name with a
# leading layer axis; the table is written for the per-block layout.
_SCANNED = re.compile(r"^Transformer/encoderblock/(.+)$")


def is_scanned(flat: Mapping[str, object]) -> bool:
  return any(_SCANNED.match(k) for k in flat)


def unscan(flat: Mapping[str, object]) -> dict:
  """Flat parameters (arrays) or shapes (tuples) of a scanned Transformer -> per-block."""
  out = {}
  for key, value in flat.items():
    m = _SCANNED.match(key)
    if not m:
      out[key] = value
      continue
    depth = value[0] if isinstance(value, tuple) else value.shape[0]
    for i in range(depth):
      out[f"Transformer/encoderblock_{i}/{m.group(1)}"] = (
          value[1:] if isinstance(value, tuple) else value[i])
  return out


def rescan(flat: Mapping[str, np.ndarray]) -> dict:
  """Per-block flat arrays -> the scanned layout (blocks stacked on a leading axis)."""
  out, blocks = {}, {}
  for key, value in flat.items():
    m = re.match(r"^Transformer/encoderblock_(\d+)/(.+)$", key)
    if m:
      blocks.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      out[key] = value
  for rest, per_layer in blocks.items():
    out[f"Transformer/encoderblock/{rest}"] = np.stack(
        [per_layer[i] for i in range(len(per_layer))])
  return out


# timm keys that are not encoder weights: ignored on import (a classifier, or the
# pooled-feature norm/head of a fine-tuned model; the import reports them as skipped).
IGNORED_TORCH = re.compile(r"^(head\.|head_drop\.)")
POS_EMBED = "pos_embed"


# ------------------------------------------------------------------ geometry
@dataclasses.dataclass(frozen=True)
class Geometry:
  image_hw: tuple[int, int]
  patch_size: int
  channels: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int

  @property
  def grid_hw(self) -> tuple[int, int]:
    return (self.image_hw[0] // self.patch_size, self.image_hw[1] // self.patch_size)

  @property
  def num_tokens(self) -> int:
    return self.grid_hw[0] * self.grid_hw[1]


def image_hw(image_size) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def geometry(flat_shapes: Mapping[str, tuple], image_size) -> Geometry:
  """The architecture, read off the parameter shapes, plus the image size."""
  try:
    p, p2, channels, width = flat_shapes["embedding/kernel"]
    num_heads = flat_shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/"
                            "query/kernel"][1]
    mlp_dim = flat_shapes["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"][1]
  except (KeyError, ValueError) as e:
    raise ValueError("These parameters are not an anatjax 2-D ViT encoder (embedding/kernel "
                     f"[p,p,C,D] and Transformer/encoderblock_0/... expected): {e!r}") from e
  hw = image_hw(image_size)
  if p != p2 or hw[0] % p or hw[1] % p:
    raise ValueError(f"image size {hw} is not a multiple of the patch size {p}x{p2}")
  return Geometry(hw, int(p), int(channels), int(width), depth_of(flat_shapes),
                  int(num_heads), int(mlp_dim))


def positions(geo: Geometry) -> np.ndarray:
  """The fixed table the encoder adds, as timm's pos_embed: [1, 1 + L, D], CLS row zero."""
  return np.asarray(sincos_2d(*geo.grid_hw, geo.width), np.float32)[None]


def torch_extras(geo: Geometry) -> dict[str, np.ndarray]:
  """Non-parameter tensors the timm model needs: the position table."""
  return {POS_EMBED: positions(geo)}


def npz_extras(geo: Geometry) -> dict[str, np.ndarray]:
  """big_vision keys beyond the parameters. timm's npz loader takes a top-level
  `pos_embedding` as the sign of big_vision naming (LayerNorm_0/1, MlpBlock_0,
  MultiHeadDotProductAttention_0); without it, it looks for the original ViT names."""
  return {"pos_embedding": positions(geo)}


# ------------------------------------------------------------------ the timm constructor
# timm's registered plain ViTs: (width, heads, standard depth) per size name, and the
# (patch, image) pairs registered for each.
_TIMM_SIZES = {
    (192, 3): ("tiny", 12), (384, 6): ("small", 12), (768, 12): ("base", 12),
    (1024, 16): ("large", 24), (1280, 16): ("huge", 32),
}
_TIMM_REGISTERED = {
    "tiny": {(16, 224), (16, 384)},
    "small": {(32, 224), (32, 384), (16, 224), (16, 384), (8, 224)},
    "base": {(32, 224), (32, 384), (16, 224), (16, 384), (8, 224)},
    "large": {(32, 224), (32, 384), (16, 224), (16, 384), (14, 224)},
    "huge": {(14, 224)},
}


def timm_model(geo: Geometry) -> tuple[str, dict]:
  """(timm model name, kwargs) of `timm.create_model` giving this architecture.

  kwargs go to VisionTransformer; they are only the ones that differ from the named model,
  plus num_classes=0 (no classifier: the export is an encoder).
  """
  kwargs: dict = {}
  size = _TIMM_SIZES.get((geo.width, geo.num_heads))
  if size is None:            # not a timm size: name the base model, override its shape
    name_size, std_depth, patch, img = "base", 12, 16, 224
    kwargs.update(embed_dim=geo.width, num_heads=geo.num_heads)
    std_ratio = 4.0
  else:
    name_size, std_depth = size
    registered = _TIMM_REGISTERED[name_size]
    std_ratio = 4.0
    square = geo.image_hw[0] if geo.image_hw[0] == geo.image_hw[1] else None
    if (geo.patch_size, square) in registered:
      patch, img = geo.patch_size, square
    elif (geo.patch_size, 224) in registered:
      patch, img = geo.patch_size, 224
    else:
      patch, img = min(registered, key=lambda pi: (abs(pi[0] - geo.patch_size), pi[1]))
  name = f"vit_{name_size}_patch{patch}_{img}"
  if geo.image_hw != (img, img):
    kwargs["img_size"] = (geo.image_hw[0] if geo.image_hw[0] == geo.image_hw[1]
                          else tuple(geo.image_hw))
  if geo.patch_size != patch:
    kwargs["patch_size"] = geo.patch_size
  if geo.depth != std_depth:
    kwargs["depth"] = geo.depth
  ratio = geo.mlp_dim / geo.width
  if ratio != std_ratio:
    kwargs["mlp_ratio"] = ratio
  if geo.channels != 3:
    kwargs["in_chans"] = geo.channels
  # the constructor's order: size first, then the architecture, then num_classes
  order = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
           "mlp_ratio")
  kwargs = {k: kwargs[k] for k in order if k in kwargs}
  kwargs["num_classes"] = 0
  return name, kwargs


def create_model_call(name: str, kwargs: Mapping) -> str:
  """"timm.create_model('vit_base_patch16_224', num_classes=0)" and the like."""
  args = [repr(name)] + [f"{k}={v!r}" for k, v in kwargs.items()]
  return f"timm.create_model({', '.join(args)})"
