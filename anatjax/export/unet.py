"""LD's U-Net (anatjax/models/unet.py) as a PyTorch state dict, NumPy + safetensors only.

Keys are those of the reference module anatjax/export/ld_unet_torch.py: the Flax path
with "/" -> ".", and per leaf
  conv/kernel [3, 3, Cin, Cout] -> conv.weight [Cout, Cin, 3, 3]
  conv/bias, out/kernel, out/bias -> .bias, .weight, .bias
  bn/scale, bn/bias               -> bn.weight, bn.bias
  batch_stats bn/mean, bn/var     -> bn.running_mean, bn.running_var
  (and bn.num_batches_tracked = 0, which PyTorch's BatchNorm keeps).
"""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors.numpy

LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
              "var": "running_var"}


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if hasattr(value, "items"):   # dicts and FrozenDicts
      yield from _flat(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), np.asarray(value)


def torch_state_dict(params, batch_stats) -> dict[str, np.ndarray]:
  """The whole network's state dict, float32 (see the module docstring)."""
  tensors = {}
  for path, value in list(_flat(params)) + list(_flat(batch_stats)):
    if path[-1] not in LEAF_NAMES:
      raise ValueError(f"LD export: unexpected leaf {'/'.join(path)}")
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1)
    tensors[".".join(path[:-1] + (LEAF_NAMES[path[-1]],))] = np.ascontiguousarray(
        value, np.float32)
    if path[-1] == "mean":
      tensors[".".join(path[:-1] + ("num_batches_tracked",))] = np.zeros((), np.int64)
  return tensors


def export_unet(params, batch_stats, out: str, *, metadata: dict) -> dict:
  """Writes the U-Net to `out` (safetensors) and the sidecar `out + '.json'`."""
  channels = int(np.shape(params["encoder"]["stage1_0"]["conv"]["kernel"])[2])
  num_clusters = int(np.shape(params["cluster_head"]["out"]["bias"])[0])
  embedding_dim = int(np.shape(params["embedding_head"]["out"]["bias"])[0])
  create = (f"anatjax.export.ld_unet_torch.LDUNet(in_channels={channels}, "
            f"num_clusters={num_clusters}, embedding_dim={embedding_dim})")
  info = {
      "format": "anatjax-ld-unet",
      "layout": "pytorch-safetensors",
      "channels": channels, "num_clusters": num_clusters, "embedding_dim": embedding_dim,
      "input": ("NCHW, height and width multiples of 16; radiographs (1 channel) scaled to "
                "[0, 1] then (x - 0.5) / 0.5; colour: ImageNet mean/std"),
      "torch_create_model": create,
      "transfer": "model.encoder (its forward returns the five skips f1..f5)",
      **metadata,
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  safetensors.numpy.save_file(
      torch_state_dict(params, batch_stats), out,
      metadata={k: v if isinstance(v, str) else json.dumps(v, default=str)
                for k, v in info.items()})
  with open(out + ".json", "w") as f:
    json.dump(info, f, indent=2, default=str)
  return info
