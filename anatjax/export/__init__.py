"""Encoder weights out of anatjax (timm safetensors, big_vision .npz) and back in.

Export (NumPy + safetensors only, no torch):
  export_encoder(params, out, image_size=..., format="timm"|"npz", metadata=...) -> sidecar
  export_run(workdir, out, step=None, which="teacher", format="timm") -> sidecar
    (an LD run: the whole U-Net for anatjax/export/ld_unet_torch.py, see export/unet.py;
    a DrasCLR run: f_q and its atlas for anatjax/export/drasclr_torch.py, export/cnn3d.py)
Import (what `--config.init_from=FILE` uses):
  import_encoder(path, target_params, image_size=...) -> params like target_params
  It reads timm-style .safetensors, big_vision .npz, or a .pth/.pt checkpoint (torch, if
  installed, with weights_only=True), including release layouts such as AFiRe's
  {"teacher": {"encoder.<timm key>": ..., "head.<...>": ...}}.
Positions: anatjax encoders add a fixed sin-cos table, so a file's position embedding is
never loaded into a parameter; it is compared with the fixed table (resampled with
`resample_posemb` when its grid differs) and a warning says when they differ.

Each backbone has one mapping table module (`anatjax.export.vit` for the 2-D ViT): rows of
(anatjax path(s), timm key, transform, inverse). A new backbone adds a module to BACKBONES.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from typing import Any, Mapping

from absl import logging
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, for bf16 safetensors files)
import numpy as np
import safetensors
import safetensors.numpy

from anatjax import config as config_lib
from anatjax.export import unet, vit as vit_table

FORMAT_VERSION = 1
FORMATS = ("timm", "npz")
BACKBONES = {vit_table.NAME: vit_table}
# The tolerance of the position-embedding comparison on import.
POSEMB_TOLERANCE = 1e-4
# Prefixes under which checkpoints keep the encoder next to other modules (AFiRe's
# release: encoder. + head.; DINO-style: backbone.), and the modules that are not encoder.
ENCODER_PREFIXES = ("encoder.", "backbone.")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


class WeightsFileError(ValueError):
  """A weights file that cannot be read, or does not fit the encoder. Names the file."""


# ------------------------------------------------------------------ trees
def flatten(tree: Mapping) -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}, the paths the tables use."""
  return config_lib.flatten(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# ------------------------------------------------------------------ position embeddings
def _cubic(x, a=-0.75):
  """Keys' cubic convolution kernel with torch's a = -0.75."""
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """[n_out, n_in] weights of 1-D resampling, as torch interpolate(align_corners=False)."""
  dst = np.arange(n_out)
  src = (dst + 0.5) * (n_in / n_out) - 0.5
  weights = np.zeros((n_out, n_in))
  if method == "bilinear":
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    t = np.clip(src - i0, 0.0, 1.0)
    np.add.at(weights, (dst, i0), 1 - t)
    np.add.at(weights, (dst, i1), t)
  elif method == "bicubic":
    i0 = np.floor(src).astype(int)
    t = src - i0
    for k in (-1, 0, 1, 2):
      np.add.at(weights, (dst, np.clip(i0 + k, 0, n_in - 1)), _cubic(t - k))
  else:
    raise ValueError(f"resampling method {method!r}: expected 'bicubic' or 'bilinear'")
  return weights


def resample_posemb(posemb: np.ndarray, new_grid_hw, num_prefix_tokens: int = 1,
                    old_grid_hw=None, method: str = "bicubic") -> np.ndarray:
  """Resamples a position embedding [1, P + h*w, D] to [1, P + H*W, D].

  The first `num_prefix_tokens` rows (CLS, registers) are kept as they are; the patch rows,
  a row-major h x w grid (square unless `old_grid_hw` is given), are resampled in 2-D by
  separable bicubic or bilinear interpolation, the same numbers as
  torch.nn.functional.interpolate(mode=method, align_corners=False, antialias=False).
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embedding of shape {posemb.shape}: expected [1, tokens, dim]")
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  n, dim = grid.shape
  if old_grid_hw is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"{n} patch positions (after {num_prefix_tokens} prefix tokens) are "
                       "not a square grid: pass old_grid_hw")
    old_grid_hw = (side, side)
  (h, w), (new_h, new_w) = tuple(old_grid_hw), tuple(new_grid_hw)
  if h * w != n:
    raise ValueError(f"old grid {h}x{w} does not hold the {n} patch positions")
  grid = grid.reshape(h, w, dim).astype(np.float64)
  out = np.einsum("Hh,Ww,hwd->HWd", _resize_matrix(h, new_h, method),
                  _resize_matrix(w, new_w, method), grid)
  out = out.reshape(1, new_h * new_w, dim).astype(posemb.dtype)
  return np.concatenate([prefix, out], axis=1)


def check_positions(posemb: np.ndarray, geo, source: str) -> tuple[np.ndarray | None, str | None]:
  """A file's position embedding against the encoder's fixed table.

  Returns (cls_row, problem): cls_row [1, 1, D] is the embedding's CLS row (timm adds it to
  the CLS token; the import folds it into `cls` so the CLS input is the same), or None
  when the file has no CLS row; problem is a shape error to report, or None. Logs a warning
  when the patch rows differ from the fixed table by more than POSEMB_TOLERANCE.
  """
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim == 2:
    posemb = posemb[None]
  expected = vit_table.positions(geo)
  if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[2] != geo.width:
    return None, (f"{vit_table.POS_EMBED}: file {tuple(posemb.shape)} vs encoder "
                  f"{tuple(expected.shape)}")
  n = posemb.shape[1]
  if n == geo.num_tokens + 1:
    prefix, old_grid = 1, geo.grid_hw
  elif n == geo.num_tokens:
    prefix, old_grid = 0, geo.grid_hw
  else:
    prefix = 1 if math.isqrt(n - 1) ** 2 == n - 1 else 0
    side = math.isqrt(n - prefix)
    if side * side != n - prefix:
      return None, (f"{vit_table.POS_EMBED}: file {tuple(posemb.shape)} is not a square grid "
                    f"(with or without a CLS row); the encoder's is {tuple(expected.shape)}")
    old_grid = (side, side)
  resampled = ""
  if tuple(old_grid) != tuple(geo.grid_hw):
    posemb = resample_posemb(posemb, geo.grid_hw, prefix, old_grid)
    resampled = (f" (resampled from its {old_grid[0]}x{old_grid[1]} grid to "
                 f"{geo.grid_hw[0]}x{geo.grid_hw[1]})")
  diff = float(np.max(np.abs(posemb[0, prefix:] - expected[0, 1:])))
  if diff > POSEMB_TOLERANCE:
    logging.warning(
        "%s: its position embedding%s differs from anatjax's fixed 2-D sin-cos table by up "
        "to %.3g (max abs). anatjax encoders use the fixed table: the file's position "
        "embedding is not loaded.", source, resampled, diff)
  cls_row = posemb[:, :1] if prefix else None
  if cls_row is not None and np.any(cls_row):
    logging.info("%s: the position embedding's CLS row is added to the CLS token.", source)
  return cls_row, None


# ------------------------------------------------------------------ export
def _normalisation(channels: int):
  from anatjax.methods.common import IMAGENET_MEAN, IMAGENET_STD
  if channels == 3:
    return list(IMAGENET_MEAN), list(IMAGENET_STD)
  return [IMAGENET_MEAN[0]] * channels, [IMAGENET_STD[0]] * channels


def _host_flat(params: Mapping, backbone: str = "vit") -> dict[str, np.ndarray]:
  """Flat float32 NumPy parameters in the per-block layout (scanned stacks unstacked)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  table = BACKBONES[backbone]
  return table.unscan(flat) if table.is_scanned(flat) else flat


def export_encoder(params: Mapping, out: str, *, image_size, format: str = "timm",
                   metadata: Mapping | None = None, backbone: str = "vit") -> dict:
  """Writes an encoder's parameters to `out` and the JSON sidecar `out + '.json'`.

  format="timm": a safetensors state dict that loads with strict=True into the timm model
  named in the returned dict ("timm_create_model"); format="npz": big_vision's layout,
  float32, for timm's `model.load_pretrained(out)`. `metadata` (method, step, config, ...)
  goes into the sidecar and, as strings, into the safetensors header. Returns the sidecar.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r}: expected one of {FORMATS}")
  table = BACKBONES[backbone]
  flat = _host_flat(params, backbone)
  geo = table.geometry({k: v.shape for k, v in flat.items()}, image_size)
  name, kwargs = table.timm_model(geo)
  mean, std = _normalisation(geo.channels)
  info = {
      "format": "anatjax-encoder",
      "format_version": FORMAT_VERSION,
      "layout": "timm-safetensors" if format == "timm" else "big_vision-npz",
      "backbone": backbone,
      "image_size": geo.image_hw[0] if geo.image_hw[0] == geo.image_hw[1] else list(geo.image_hw),
      "channels": geo.channels,
      "patch_size": geo.patch_size,
      "width": geo.width,
      "depth": geo.depth,
      "num_heads": geo.num_heads,
      "mlp_dim": geo.mlp_dim,
      "mean": mean,
      "std": std,
      "input": (f"greyscale in [0, 1] replicated to {geo.channels} channel(s), then "
                "(x - mean) / std per channel, at the image size above"),
      "positions": "fixed 2-D sin-cos (MAE), CLS row zero; written as timm's pos_embed",
      "timm_model": name,
      "timm_kwargs": kwargs,
      "timm_create_model": table.create_model_call(name, kwargs),
  }
  info.update(metadata or {})
  rows = table.table(geo.depth)
  used = {path for row in rows for path in row.jax}
  if set(flat) != used:
    raise ValueError(f"the {backbone} table does not cover these parameters: extra "
                     f"{sorted(set(flat) - used)}, missing {sorted(used - set(flat))}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if format == "timm":
    tensors = {row.torch: row.to_torch(*(flat[p] for p in row.jax)) for row in rows}
    tensors.update(table.torch_extras(geo))
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    header = {k: v if isinstance(v, str) else json.dumps(v, default=str)
              for k, v in info.items()}
    safetensors.numpy.save_file(tensors, out, metadata=header)
  else:
    arrays = dict(flat)
    arrays.update(table.npz_extras(geo))
    with open(out, "wb") as f:   # np.savez would append '.npz' to other names
      np.savez(f, **arrays)
  with open(out + ".json", "w") as f:
    json.dump(info, f, indent=2, default=str)
  return info


def export_run(workdir: str, out: str, *, step: int | None = None, which: str = "auto",
               format: str = "timm") -> dict:
  """Exports one encoder of a run's checkpoint (default: the newest step, the method's
  own choice: the EMA teacher where there is one)."""
  from anatjax import train as trainer
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"No checkpoints/ in {workdir}: pass the --workdir of a run.")
  config, method, state, step = trainer.load_checkpoint(workdir, step)
  if method.name == "ld":   # a U-Net, not a ViT: the whole network, for the reference module
    from anatjax.methods import ld  # pylint: disable=g-import-not-at-top
    if which not in ("auto", "student") or format != "timm":
      raise ValueError("LD runs export the whole U-Net as a PyTorch safetensors state dict: "
                       "use the defaults --which=auto --format=timm")
    network = ld.unet_variables(state["params"], state["method_state"])
    return unet.export_unet(
        network["params"], network["batch_stats"], out,
        metadata={"method": "ld", "step": int(step), "stage": config.ld.stage,
                  "config": json.loads(json.dumps(config.to_dict(), default=str)),
                  "workdir": os.path.abspath(workdir)})
  if method.name == "drasclr":   # a location-conditioned 3D CNN, exported with its atlas
    from anatjax.data import ct_patches, ct_prepare  # pylint: disable=g-import-not-at-top
    from anatjax.export import cnn3d  # pylint: disable=g-import-not-at-top
    if format != "timm":
      raise ValueError("DrasCLR runs export the encoder as a PyTorch safetensors state dict: "
                       "use the default --format=timm")
    return cnn3d.export_drasclr(
        method.encoder(state["params"], state["method_state"], which),
        ct_patches.read_atlas(ct_prepare.store_root(config.data)), out,
        metadata={"method": "drasclr", "which": which, "step": int(step),
                  "config": json.loads(json.dumps(config.to_dict(), default=str)),
                  "workdir": os.path.abspath(workdir)})
  if method.name == "alice":   # a 3-D Swin in MONAI's SwinUNETR.swinViT layout
    from anatjax.export import swin3d  # pylint: disable=g-import-not-at-top
    if format != "timm":
      raise ValueError("Alice runs export the Swin encoder as a MONAI safetensors state "
                       "dict: use the default --format=timm")
    return swin3d.export_swin3d(
        method.encoder(state["params"], state["method_state"], which), out,
        window_size=config.model.window_size, downsample=config.model.downsample,
        metadata={"method": "alice", "which": which, "step": int(step),
                  "input": swin3d.input_convention(config.data.spacing_mm),
                  "config": json.loads(json.dumps(config.to_dict(), default=str)),
                  "workdir": os.path.abspath(workdir)})
  if method.name == "anatomy_embedding":
    raise ValueError(f"{workdir} is an anatomy_embedding run: its network is used as "
                     "Alice's correspondence provider (python -m anatjax.evaluate."
                     "correspondence --provider=embedding --run=...), not exported")
  params = method.encoder(state["params"], state["method_state"], which)
  metadata = {
      "method": method.name,
      "which": which,
      "step": int(step),
      "variant": config.model.variant,
      "config": json.loads(json.dumps(config.to_dict(), default=str)),
      "workdir": os.path.abspath(workdir),
  }
  return export_encoder(params, out, image_size=config.data.image_size, format=format,
                        metadata=metadata)


# ------------------------------------------------------------------ reading files
def _is_npz(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith(".npy") for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def file_kind(path: str) -> str:
  """'safetensors', 'npz' or 'torch', by the name, else by the first bytes."""
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return "safetensors"
  if lower.endswith(".npz"):
    return "npz"
  if lower.endswith(TORCH_SUFFIXES):
    return "torch"
  with open(path, "rb") as f:
    head = f.read(2)
  if head == b"PK":
    return "npz" if _is_npz(path) else "torch"
  if head[:1] == b"\x80":   # a pickle protocol header: the legacy torch.save format
    return "torch"
  return "safetensors"


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, header metadata) of a .safetensors file, clear errors for bad files."""
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except FileNotFoundError:
    raise
  except (safetensors.SafetensorError, OSError, TypeError, ValueError) as e:
    raise WeightsFileError(f"{path}: not a readable .safetensors file (truncated or not "
                           f"safetensors?): {e}") from e
  return tensors, metadata


def _to_numpy(value, key: str, path: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):   # a torch tensor
    t = value.detach().cpu()
    if t.is_floating_point() and t.dtype not in _torch_numpy_floats():
      t = t.float()
    return t.numpy()
  raise WeightsFileError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")


def _torch_numpy_floats():
  import torch
  return (torch.float16, torch.float32, torch.float64)


def read_torch(path: str) -> Any:
  """torch.load(path, weights_only=True) on the CPU, with clear errors."""
  try:
    import torch
  except ImportError as e:
    raise WeightsFileError(
        f"{path}: reading a PyTorch checkpoint needs torch, which is not installed "
        "(pip install torch, or convert the file to .safetensors).") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except pickle.UnpicklingError as e:
    raise WeightsFileError(
        f"{path}: refused: not a weights-only checkpoint (anatjax loads .pth/.pt files with "
        f"torch.load(weights_only=True) and will not run the objects they pickle). torch "
        f"says: {e}") from e
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise WeightsFileError(f"{path}: not a readable PyTorch checkpoint: {e}") from e


def encoder_state_dict(obj: Any, path: str, which: str = "auto") -> tuple[dict, list]:
  """The encoder's flat {timm key: array} inside a loaded checkpoint, and skipped keys.

  Accepts a plain state dict; {"teacher"|"student": state dict} (AFiRe's and DINO's
  releases; `which` picks, 'auto' the teacher); {"state_dict"|"model"|"module": state
  dict}; keys prefixed
  'module.' (DDP); and encoder keys prefixed 'encoder.' or 'backbone.' next to other
  modules ('head.' and the like are skipped).
  """
  if not isinstance(obj, Mapping):
    raise WeightsFileError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
  for key in ("teacher" if which == "auto" else which, "state_dict", "model", "module"):
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  keys = list(obj)
  if keys and all(k.startswith("module.") for k in keys):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  skipped = []
  for prefix in ENCODER_PREFIXES:
    if any(k.startswith(prefix) for k in obj):
      inner = {}
      for k, v in obj.items():
        if k.startswith(prefix):
          inner[k[len(prefix):]] = v
        else:
          skipped.append(k)
      obj = inner
      break
  return {k: _to_numpy(v, k, path) for k, v in obj.items()}, skipped


def read_encoder_file(path: str, which: str = "auto") -> tuple[str, dict, list]:
  """(layout 'timm' | 'big_vision', flat arrays, skipped keys) of a weights file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  kind = file_kind(path)
  if kind == "safetensors":
    tensors, _ = read_safetensors(path)
    state, skipped = encoder_state_dict(tensors, path, which)
    return "timm", state, skipped
  if kind == "npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise WeightsFileError(f"{path}: not a readable .npz file: {e}") from e
    for prefix in ("params/", "opt/target/"):
      if arrays and all(k.startswith(prefix) for k in arrays):
        arrays = {k[len(prefix):]: v for k, v in arrays.items()}
    return "big_vision", arrays, []
  state, skipped = encoder_state_dict(read_torch(path), path, which)
  return "timm", state, skipped


# ------------------------------------------------------------------ import
def _describe(geo, name, kwargs, backbone) -> str:
  return (f"anatjax {backbone} encoder: width {geo.width}, depth {geo.depth}, "
          f"{geo.num_heads} heads, patch {geo.patch_size}, {geo.channels} channel(s); "
          f"in timm {vit_table.create_model_call(name, kwargs)}")


def import_encoder(path: str, target_params: Mapping, *, image_size, which: str = "auto",
                   backbone: str = "vit") -> dict:
  """Loads an encoder's weights from `path` into the structure of `target_params`.

  target_params: the freshly initialised encoder parameter tree (arrays, or anything
  with .shape and .dtype, e.g. jax.eval_shape's output); image_size: the size the
  encoder will run at (the grid of its fixed position table).
  Returns a nested dict of NumPy arrays with the target's structure, shapes and dtypes.
  Raises FileNotFoundError, or WeightsFileError naming the file: unreadable, truncated,
  not weights-only, torch missing for a .pth, or not fitting (all missing and unexpected
  keys by name, every shape mismatch with both shapes). Logs a warning when the file's
  position embedding differs from the fixed sin-cos table (which is what is used).
  """
  table = BACKBONES[backbone]
  target = flatten(target_params)
  shapes = {k: tuple(v.shape) for k, v in target.items()}
  scanned = table.is_scanned(shapes)
  if scanned:                    # ViT(scan=True): the table speaks the per-block layout
    shapes = table.unscan(shapes)
  geo = table.geometry(shapes, image_size)
  name, kwargs = table.timm_model(geo)
  layout, state, skipped = read_encoder_file(path, which)
  rows = table.table(geo.depth)
  if layout == "big_vision":     # the file's keys are anatjax's own paths
    if table.is_scanned(state):
      state = table.unscan(state)
    posemb = state.pop("pos_embedding", None)
    rows = [vit_table.Row((p,), p, vit_table._same, vit_table._same_inv) for p in shapes]
    pos_key = "pos_embedding"
  else:
    posemb = state.pop(table.POS_EMBED, None)
    pos_key = table.POS_EMBED
  ignored = [k for k in state if (k.startswith("head/") if layout == "big_vision"
                                  else table.IGNORED_TORCH.match(k))]
  skipped += ignored
  missing, mismatched, out = [], [], {}
  for row in rows:
    if row.torch not in state:
      missing.append(row.torch)
      continue
    want = [shapes[p] for p in row.jax]
    expected = row.to_torch(*(np.zeros(s, np.float32) for s in want)).shape
    got = state[row.torch]
    if tuple(got.shape) != tuple(expected):
      mismatched.append(f"{row.torch}: file {tuple(got.shape)} vs encoder {tuple(expected)}")
      continue
    for p, value in zip(row.jax, row.from_torch(np.asarray(got, np.float32), want)):
      out[p] = value
  used = {row.torch for row in rows}
  unexpected = [k for k in state if k not in used and k not in ignored]
  cls_row = None
  if posemb is not None:
    cls_row, problem = check_positions(posemb, geo, path)
    if problem:
      mismatched.append(problem.replace(table.POS_EMBED, pos_key, 1))
  if missing or unexpected or mismatched:
    lines = [f"{path} does not fit the encoder ({_describe(geo, name, kwargs, backbone)}):"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    raise WeightsFileError("\n".join(lines))
  if skipped:
    logging.info("%s: skipped the non-encoder entries %s", path, skipped)
  if cls_row is not None and "cls" in out:
    out["cls"] = out["cls"] + cls_row.reshape(out["cls"].shape)
  if scanned:
    out = table.rescan(out)
  return unflatten({k: np.asarray(out[k]).astype(target[k].dtype) for k in target})
