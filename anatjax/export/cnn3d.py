"""DrasCLR's location-conditioned 3D encoder f_q as a PyTorch state dict, NumPy + safetensors.

The released DrasCLR model is the query encoder alone (not the projection head, not the
momentum key encoder) together with the atlas whose locations it was conditioned on: a
feature is only meaningful at an atlas location, so the file carries corners, loc_norm and
neighbours as tensors and the atlas id, patch size and spacing in its metadata.

Keys are those of the reference module anatjax/export/drasclr_torch.py: the Flax path of
the encoder sub-tree with "/" -> ".", and per leaf, for each layer L of LAYERS,
  L_cond/kernel [E, 3, 3, 3, Cin, Cout]  -> L_cond.weight [E, Cout, Cin, 3, 3, 3]
  L_cond/bias [Cout]                     -> L_cond.bias
  L_cond/router/kernel [3, E], bias [E]  -> L_cond.router.weight [E, 3], .bias
  L_bn/scale, L_bn/bias                  -> L_bn.weight, L_bn.bias
  batch_stats L_bn/mean, L_bn/var        -> L_bn.running_mean, L_bn.running_var
  (and L_bn.num_batches_tracked = 0, which PyTorch's BatchNorm keeps).
Flax's NDHWC with (D, H, W) = (z, y, x) maps to PyTorch's NCDHW with the same spatial
order, so the kernels' spatial axes are only moved behind the channels, never flipped.
The atlas goes under ATLAS_PREFIX: atlas.corners [L, 3] and atlas.neighbours [L, 2] int64,
atlas.loc_norm [L, 3] float32. Every header value is JSON (a string too), so a reader
decodes all of them alike and an atlas id such as "007" stays a string.
"""

from __future__ import annotations

import numpy as np

from anatjax.export import sidecar
from anatjax.models.cnn3d import LAYERS

ATLAS_PREFIX = "atlas."
BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
INPUT = ("[N, 1, S, S, S] (z, y, x) patches cut at the atlas corners of a scan registered to "
         "the atlas and resampled to its spacing: HU clipped to [-1024, 240], then "
         "(HU + 1024) / 632 - 1; the location input is atlas.loc_norm of the patch's location")


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if hasattr(value, "items"):   # dicts and FrozenDicts
      yield from _flat(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), np.asarray(value, np.float32)


def _torch_leaf(path: tuple, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One Flax leaf -> (torch key, tensor) by the table in the module docstring; the
  caller checks the resulting key set, so only the leaf's own module decides here."""
  *module, leaf = path
  owner = module[-1] if module else ""
  name = None
  if owner == "router" or owner.endswith("_cond"):
    name = {"kernel": "weight", "bias": "bias"}.get(leaf)
    # router [3, E] -> [E, 3]; experts [E, D, H, W, Cin, Cout] -> [E, Cout, Cin, D, H, W]
    if leaf == "kernel":
      value = value.T if owner == "router" else value.transpose(0, 5, 4, 1, 2, 3)
  elif owner.endswith("_bn"):
    name = BN_LEAVES.get(leaf)
  if name is None:
    raise ValueError(f"DrasCLR export: unexpected encoder leaf {'/'.join(path)}")
  return ".".join(module + [name]), value


def expected_keys() -> set[str]:
  """The reference module's state-dict keys (strict load)."""
  keys = set()
  for layer, _, _ in LAYERS:
    keys |= {f"{layer}_cond.{k}" for k in ("weight", "bias", "router.weight", "router.bias")}
    keys |= {f"{layer}_bn.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                         "num_batches_tracked")}
  return keys


def torch_state_dict(params, batch_stats) -> dict[str, np.ndarray]:
  """The encoder's (f_q's) state dict, float32, from its params and BatchNorm statistics
  (the encoder sub-trees, as DrasCLR's `encoder_params` returns them)."""
  tensors = {}
  for path, value in list(_flat(params)) + list(_flat(batch_stats)):
    key, value = _torch_leaf(path, value)
    tensors[key] = np.ascontiguousarray(value, np.float32)
    if path[-1] == "mean":
      tensors[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
  missing, extra = sorted(expected_keys() - set(tensors)), sorted(set(tensors) - expected_keys())
  if missing or extra:   # e.g. the whole network's tree instead of its encoder sub-tree
    raise ValueError(f"DrasCLR export: not the encoder's variables: {len(missing)} missing "
                     f"keys {missing[:4]}..., {len(extra)} unexpected {extra[:4]}...")
  return tensors


def export_drasclr(network_variables, atlas, out: str, *, metadata: dict) -> dict:
  """Writes f_q and the atlas to `out` (safetensors) and the sidecar `out + '.json'`.

  network_variables: {"params", "batch_stats"} of the encoder; atlas: the run's
  anatjax.data.ct_patches.Atlas; metadata (method, step, ...) goes into both headers.
  Returns the sidecar's content.
  """
  tensors = torch_state_dict(network_variables["params"], network_variables["batch_stats"])
  num_experts = int(tensors[f"{LAYERS[0][0]}_cond.weight"].shape[0])
  tensors.update({
      ATLAS_PREFIX + "corners": np.ascontiguousarray(atlas.corners, np.int64),
      ATLAS_PREFIX + "loc_norm": np.ascontiguousarray(atlas.loc_norm, np.float32),
      ATLAS_PREFIX + "neighbours": np.ascontiguousarray(atlas.neighbours, np.int64),
  })
  info = {
      "format": "anatjax-drasclr-encoder",
      "layout": "pytorch-safetensors",
      "num_experts": num_experts,
      "features": LAYERS[-1][1],
      "atlas_id": atlas.atlas_id,
      "patch_size": int(atlas.patch_size),
      "spacing_mm": float(atlas.spacing_mm),
      "num_locations": int(len(atlas.corners)),
      "input": INPUT,
      "torch_load": "anatjax.export.drasclr_torch.load_drasclr(path) -> (encoder, atlas)",
      "torch_create_model": f"anatjax.export.drasclr_torch.DrasCLREncoder("
                            f"num_experts={num_experts})",
      **metadata,
  }
  return sidecar.save(tensors, out, info)
