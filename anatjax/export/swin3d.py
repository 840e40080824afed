"""The 3-D Swin encoder (anatjax/models/swin3d.py) as MONAI `SwinUNETR.swinViT` weights, and
back: NumPy + safetensors, no torch.

Export: `monai_state_dict(params)` -> {"swinViT.<key>": array} by the table in the model's
module docstring (Dense kernels transposed to [out, in], the patch-embedding kernel moved
to [out, in, kd, kh, kw], LayerNorm scale -> weight, plus every block's int64
`relative_position_index` buffer, the constant MONAI computes). `export_swin3d` writes it to
a safetensors file with a JSON sidecar naming the MONAI constructor. In MONAI:

  net = SwinUNETR(in_channels=1, out_channels=N, feature_size=48, depths=(2, 2, 2, 2),
                  num_heads=(3, 6, 12, 24), downsample="mergingv2", use_v2=False)
  net.load_state_dict(tensors, strict=False)        # the encoder of a whole SwinUNETR, or
  net.swinViT.load_state_dict({k.removeprefix("swinViT."): v ...}, strict=True)

(older MONAI versions also need img_size). The parameters do not say which patch merge the
encoder used ("mergingv2" and "merging" have the same weights), so the caller names it.

Import: `params_from_monai(state_dict)` maps the "swinViT." entries of a MONAI state dict
(a whole SwinUNETR's, or the encoder's with the prefix) to the Flax tree; it accepts NumPy
arrays or CPU torch tensors and checks the index buffers against the constant.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from anatjax.export import flatten, sidecar, unflatten
from anatjax.models import swin3d

PREFIX = "swinViT."
INDEX_BUFFER = "relative_position_index"
NORMS = ("norm1", "norm2", "norm")   # LayerNorms: Flax scale <-> MONAI weight


def _monai_module(modules: list[str]) -> str:
  """Flax module path -> MONAI's: layers{s} gains its ModuleList index 0, blocks_{b} is
  the ModuleList blocks.{b}; every other name is shared."""
  out = []
  for name in modules:
    block = re.fullmatch(r"blocks_(\d+)", name)
    if re.fullmatch(r"layers\d+", name):
      out.append(f"{name}.0")
    elif block:
      out.append(f"blocks.{block.group(1)}")
    else:
      out.append(name)
  return ".".join(out)


def _kernel_to_monai(kernel: np.ndarray) -> np.ndarray:
  # Dense [in, out] -> Linear [out, in]; Conv [kd, kh, kw, in, out] -> [out, in, kd, kh, kw].
  return kernel.T if kernel.ndim == 2 else kernel.transpose(4, 3, 0, 1, 2)


def _kernel_from_monai(weight: np.ndarray) -> np.ndarray:
  return weight.T if weight.ndim == 2 else weight.transpose(2, 3, 4, 1, 0)


def geometry(params: Mapping) -> dict:
  """The constructor arguments that the parameter shapes determine."""
  flat = flatten(params)
  kernel = flat["patch_embed/proj/kernel"]
  stages = sorted({int(m.group(1)) for p in flat if (m := re.match(r"layers(\d+)/", p))})
  depths = tuple(len({p.split("/")[1] for p in flat if p.startswith(f"layers{s}/blocks_")})
                 for s in stages)
  heads = tuple(flat[f"layers{s}/blocks_0/attn/relative_position_bias_table"].shape[1]
                for s in stages)
  feature_size = int(kernel.shape[-1])
  return dict(
      in_channels=int(kernel.shape[3]), feature_size=feature_size,
      patch_size=tuple(int(p) for p in kernel.shape[:3]), depths=depths, num_heads=heads,
      mlp_ratio=flat["layers1/blocks_0/mlp/linear1/kernel"].shape[1] / feature_size,
      qkv_bias="layers1/blocks_0/attn/qkv/bias" in flat)


def expected_keys(depths, qkv_bias: bool = True, prefix: str = PREFIX) -> set[str]:
  """The state-dict keys of MONAI's swinViT (use_v2=False) for these stage depths."""
  keys = {"patch_embed.proj.weight", "patch_embed.proj.bias"}
  block_leaves = ["norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                  f"attn.{INDEX_BUFFER}", "attn.qkv.weight", "attn.proj.weight",
                  "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.linear1.weight",
                  "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias"]
  block_leaves += ["attn.qkv.bias"] if qkv_bias else []
  for s, depth in enumerate(depths, start=1):
    keys |= {f"layers{s}.0.blocks.{b}.{leaf}" for b in range(depth) for leaf in block_leaves}
    keys |= {f"layers{s}.0.downsample.{leaf}"
             for leaf in ("norm.weight", "norm.bias", "reduction.weight")}
  return {prefix + k for k in keys}


def _check_table(table_shape, window, key: str):
  rows = math.prod(2 * w - 1 for w in window)
  if table_shape[0] != rows:
    raise ValueError(f"{key}: {table_shape[0]} rows, but window {window} needs {rows}: pass "
                     "the window_size the encoder was built with")


def monai_state_dict(params: Mapping, *, window_size=7,
                     prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """The encoder's MONAI state dict, float32 (the index buffers int64), keys `prefix` + key.

  params: the SwinViT3D parameter tree (its "params" collection); window_size: the
  configured window (the bias tables are its size; MONAI's buffers are computed from it).
  """
  window = swin3d._triple(window_size)   # pylint: disable=protected-access
  tensors = {}
  for path, value in flatten(params).items():
    *modules, leaf = path.split("/")
    value = np.asarray(value, np.float32)
    module = _monai_module(modules)
    if leaf == "kernel":
      name, value = "weight", _kernel_to_monai(value)
    elif leaf == "scale" and modules[-1] in NORMS:
      name = "weight"
    elif leaf in ("bias", "relative_position_bias_table"):
      name = leaf
    else:
      raise ValueError(f"Swin export: unexpected parameter {path}")
    tensors[f"{prefix}{module}.{name}"] = np.ascontiguousarray(value)
    if leaf == "relative_position_bias_table":
      _check_table(value.shape, window, path)
      # a copy: the cached constant is read-only, and torch warns on such arrays
      tensors[f"{prefix}{module}.{INDEX_BUFFER}"] = np.array(
          swin3d.relative_position_index(window))
  geo = geometry(params)
  expected = expected_keys(geo["depths"], geo["qkv_bias"], prefix)
  if set(tensors) != expected:   # e.g. a tree holding more than the encoder
    raise ValueError(f"Swin export: not the encoder's parameters: missing "
                     f"{sorted(expected - set(tensors))[:4]}, unexpected "
                     f"{sorted(set(tensors) - expected)[:4]}")
  return tensors


def params_from_monai(state_dict: Mapping[str, Any], *, window_size=7,
                      prefix: str = PREFIX) -> dict:
  """The Flax parameter tree (NumPy float32) of the `prefix` entries of a MONAI state dict.

  Raises ValueError on entries that are not swinViT's (use_v2's layers{s}c blocks, say),
  and on index buffers that differ from the constant the Flax encoder uses.
  """
  window = swin3d._triple(window_size)   # pylint: disable=protected-access
  flat = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    value = np.asarray(value)
    module, leaf = key[len(prefix):].rsplit(".", 1)
    module = re.sub(r"^(layers\d+)\.0\.", r"\1.", module)   # the inverse of _monai_module
    modules = re.sub(r"\bblocks\.(\d+)", r"blocks_\1", module).split(".")
    if leaf == INDEX_BUFFER:
      if not np.array_equal(value, swin3d.relative_position_index(window)):
        raise ValueError(f"{key}: not the relative position index of window {window}")
      continue
    if leaf == "weight":
      leaf, value = (("scale", value) if modules[-1] in NORMS
                     else ("kernel", _kernel_from_monai(value)))
    elif leaf == "relative_position_bias_table":
      _check_table(value.shape, window, key)
    elif leaf != "bias":
      raise ValueError(f"{key}: not a swinViT entry")
    flat["/".join(modules + [leaf])] = np.ascontiguousarray(value, np.float32)
  if not flat:
    raise ValueError(f"no entries with the prefix {prefix!r} in the state dict")
  params = unflatten(flat)
  geo = geometry(params)
  found = {k for k in state_dict if k.startswith(prefix)}
  expected = expected_keys(geo["depths"], geo["qkv_bias"], prefix)
  if found != expected:
    raise ValueError(f"not a MONAI swinViT (use_v2=False) state dict: missing "
                     f"{sorted(expected - found)[:4]}, unexpected {sorted(found - expected)[:4]}")
  return params


def monai_constructor(geo: Mapping, window_size, downsample: str) -> str:
  """The MONAI call that builds a SwinUNETR whose swinViT takes these weights."""
  return (f"monai.networks.nets.SwinUNETR(in_channels={geo['in_channels']}, out_channels=N, "
          f"patch_size={geo['patch_size'][0]}, depths={tuple(geo['depths'])}, "
          f"num_heads={tuple(geo['num_heads'])}, window_size={window_size}, "
          f"mlp_ratio={geo['mlp_ratio']}, qkv_bias={geo['qkv_bias']}, "
          f"feature_size={geo['feature_size']}, downsample={downsample!r}, use_v2=False)")


def input_convention(spacing_mm) -> dict:
  """How the pretraining crops were laid out, for a MONAI user's transforms. anatjax's
  arrays are (z, y, x) with axes pointing superior, posterior and left: MONAI's
  Orientationd(axcodes="SPL") gives the same layout (and Spacingd its pixdim in that
  order); intensities are Alice's window, (HU + 125) / 350 clipped to [0, 1]."""
  return {"axcodes": "SPL", "pixdim": [float(s) for s in spacing_mm],
          "intensity": "ScaleIntensityRanged(a_min=-125, a_max=225, b_min=0, b_max=1, "
                       "clip=True)"}


def export_swin3d(params: Mapping, out: str, *, window_size=7, downsample: str = "mergingv2",
                  metadata: Mapping | None = None) -> dict:
  """Writes the encoder's MONAI state dict to `out` (safetensors, keys "swinViT.*") and the
  sidecar `out + '.json'`; `metadata` (method, step, ...) goes into both. Returns the
  sidecar's content."""
  if downsample not in swin3d.MERGE_ORDERS:
    raise ValueError(f"downsample={downsample!r}: expected one of {sorted(swin3d.MERGE_ORDERS)}")
  tensors = monai_state_dict(params, window_size=window_size)
  geo = geometry(params)
  if len(set(geo["patch_size"])) != 1:
    raise ValueError(f"MONAI's SwinUNETR takes one patch size for all axes, not "
                     f"{geo['patch_size']}")
  info = {
      "format": "anatjax-swin3d-encoder",
      "layout": "monai-swinunetr-swinvit-safetensors",
      **{k: list(v) if isinstance(v, tuple) else v for k, v in geo.items()},
      "window_size": window_size,
      "downsample": downsample,
      "hidden_states": "swinViT(x, normalize=True): 5 maps, NCDHW in MONAI",
      "monai_create_model": monai_constructor(geo, window_size, downsample),
      "monai_load": "net.load_state_dict(tensors, strict=False) loads the encoder; "
                    "net.swinViT.load_state_dict(keys without 'swinViT.', strict=True)",
      **(metadata or {}),
  }
  if downsample == "merging":
    info["monai_version"] = "< 1.5 (later versions merge in another order)"
  return sidecar.save(tensors, out, info)
