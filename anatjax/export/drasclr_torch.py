"""A PyTorch module with the layout of DrasCLR's location-conditioned 3D encoder
(anatjax/models/cnn3d.py), to load what `python -m anatjax.export` writes for a DrasCLR
run (anatjax/export/cnn3d.py): the query encoder f_q and the atlas it was trained on.

The encoder's convolutions are conditioned on the patch's atlas location, a layout no
published PyTorch model has, so this small module is the reference: its attribute names
are the export's keys.

  from anatjax.export.drasclr_torch import load_drasclr
  encoder, atlas = load_drasclr("drasclr.safetensors")      # eval mode, strict load
  # patches [N, 1, S, S, S] (z, y, x), S = atlas["patch_size"], cut at atlas["corners"]
  # of a scan registered to atlas["atlas_id"] at atlas["spacing_mm"]; HU clipped to
  # [-1024, 240], then (HU + 1024) / 632 - 1.
  with torch.no_grad():
    h = encoder(patches, atlas["loc_norm"][l])     # N patches at location l -> [N, 128]
    h = encoder(patches, atlas["loc_norm"][idx])   # patch i at location idx[i] -> [N, 128]
  # one feature vector per location of a scan: encoder(its L patches, atlas["loc_norm"])

Needs torch (not a core requirement of anatjax).
"""

from __future__ import annotations

import json

import safetensors
import torch
from torch import nn
from torch.nn import functional as F

from anatjax.export.cnn3d import ATLAS_PREFIX
from anatjax.models.cnn3d import BN_EPSILON, LAYERS


class CondConv3d(nn.Module):
  """E expert 3x3x3 kernels mixed by sigmoid(router(location)), padding 1, one bias."""

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
               num_experts: int = 8):
    super().__init__()
    self.stride = stride
    self.weight = nn.Parameter(torch.zeros(num_experts, out_channels, in_channels, 3, 3, 3))
    self.bias = nn.Parameter(torch.zeros(out_channels))
    self.router = nn.Linear(3, num_experts)

  def forward(self, x, loc):
    """x [N, Cin, D, H, W], loc [3] (one location for all) or [N, 3] (one per sample)."""
    if loc.dim() == 1 or bool((loc == loc[:1]).all()):
      # The routing sees only the location: one location means one kernel for the batch.
      routing = torch.sigmoid(self.router(loc.reshape(-1, 3)[0]))
      kernel = torch.einsum("e,eoidhw->oidhw", routing, self.weight)
      return F.conv3d(x, kernel, self.bias, self.stride, padding=1)
    # One kernel per sample, applied at once: the batch becomes the channel groups.
    n, cin = x.shape[:2]
    routing = torch.sigmoid(self.router(loc))
    kernels = torch.einsum("ne,eoidhw->noidhw", routing, self.weight)
    y = F.conv3d(x.reshape(1, n * cin, *x.shape[2:]), kernels.flatten(0, 1),
                 self.bias.repeat(n), self.stride, padding=1, groups=n)
    return y.reshape(n, -1, *y.shape[2:])


class DrasCLREncoder(nn.Module):
  """f(x; l): 13 CondConv3d + BatchNorm3d + ELU layers, [N, 1, S, S, S] -> h [N, 128]
  (S = 32, 16 or 8: the five stride-2 layers take the patch to one voxel)."""

  def __init__(self, num_experts: int = 8):
    super().__init__()
    channels = 1
    for name, features, stride in LAYERS:
      self.add_module(f"{name}_cond", CondConv3d(channels, features, stride, num_experts))
      self.add_module(f"{name}_bn", nn.BatchNorm3d(features, eps=BN_EPSILON, momentum=0.1))
      channels = features

  def forward(self, x, loc):
    for name, _, _ in LAYERS:
      x = getattr(self, f"{name}_cond")(x, loc)
      x = F.elu(getattr(self, f"{name}_bn")(x))
    if x.shape[2:] != (1, 1, 1):
      raise ValueError(f"patches of {tuple(x.shape[2:])} after the encoder: it takes 32^3, "
                       "16^3 or 8^3 patches")
    return x.flatten(1)


def load_drasclr(path: str) -> tuple[DrasCLREncoder, dict]:
  """(encoder in eval mode, atlas) of an export: the atlas dict holds the tensors corners
  [L, 3], loc_norm [L, 3], neighbours [L, 2] and atlas_id, patch_size, spacing_mm."""
  with safetensors.safe_open(path, framework="pt") as f:
    header = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  atlas = {k[len(ATLAS_PREFIX):]: v for k, v in tensors.items() if k.startswith(ATLAS_PREFIX)}
  atlas.update({k: header[k] for k in ("atlas_id", "patch_size", "spacing_mm")})
  state = {k: v for k, v in tensors.items() if not k.startswith(ATLAS_PREFIX)}
  encoder = DrasCLREncoder(num_experts=state[f"{LAYERS[0][0]}_cond.weight"].shape[0])
  encoder.load_state_dict(state, strict=True)
  return encoder.eval(), atlas
