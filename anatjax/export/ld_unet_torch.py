"""A PyTorch module with the layout of LD's U-Net (anatjax/models/unet.py), to load the
weights `python -m anatjax.export` writes for an LD run.

No published PyTorch model (MONAI, segmentation_models_pytorch) has this exact layout
(VGG16-BN-tiny widths 16-32-64-128-128, a decoder concatenating [upsampled, skip], two
heads), so this small module is the reference: its attribute names are the export's keys.

  from anatjax.export.ld_unet_torch import LDUNet
  model = LDUNet(in_channels=1, num_clusters=16)
  model.load_state_dict(safetensors.torch.load_file("ld.safetensors"))
  model.eval(); embeddings, assignments = model(images)   # NCHW in, NCHW out
  # transfer: model.encoder alone (its forward returns the five skips)

Needs torch (not a core requirement of anatjax).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from anatjax.models.unet import (BN_EPSILON, DECODER_STEPS, ENCODER_STAGES, HEAD_WIDTH)


class CBR(nn.Module):
  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPSILON, momentum=0.1)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Encoder(nn.Module):
  """images [N, C, H, W] -> the five skips f1..f5."""

  def __init__(self, in_channels: int):
    super().__init__()
    channels = in_channels
    for s, widths in enumerate(ENCODER_STAGES, start=1):
      for i, width in enumerate(widths):
        self.add_module(f"stage{s}_{i}", CBR(channels, width))
        channels = width

  def forward(self, x):
    skips = []
    for s, widths in enumerate(ENCODER_STAGES, start=1):
      if s > 1:
        x = F.max_pool2d(x, 2)
      for i in range(len(widths)):
        x = getattr(self, f"stage{s}_{i}")(x)
      skips.append(x)
    return skips


class Decoder(nn.Module):
  def __init__(self):
    super().__init__()
    channels = ENCODER_STAGES[-1][-1]
    skip_widths = [stage[-1] for stage in ENCODER_STAGES[:-1]][::-1]
    for (name, widths), skip in zip(DECODER_STEPS.items(), skip_widths):
      channels += skip
      for i, width in enumerate(widths):
        self.add_module(f"{name}_{i}", CBR(channels, width))
        channels = width

  def forward(self, skips):
    *shallower, x = skips
    for (name, widths), skip in zip(DECODER_STEPS.items(), reversed(shallower)):
      x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)
      for i in range(len(widths)):
        x = getattr(self, f"{name}_{i}")(x)
    return torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), shallower[0]], dim=1)


class Head(nn.Module):
  def __init__(self, in_channels: int, hidden: int, out_channels: int):
    super().__init__()
    self.cbr = CBR(in_channels, hidden)
    self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

  def forward(self, x):
    return self.out(self.cbr(x))


class LDUNet(nn.Module):
  """images [N, C, H, W] -> (unit embeddings [N, D, H, W], assignments [N, K, H, W])."""

  def __init__(self, in_channels: int = 1, num_clusters: int = 16, embedding_dim: int = 32):
    super().__init__()
    g_channels = DECODER_STEPS["up2"][-1] + ENCODER_STAGES[0][-1]
    self.encoder = Encoder(in_channels)
    self.decoder = Decoder()
    self.embedding_head = Head(g_channels, HEAD_WIDTH, embedding_dim)
    self.cluster_head = Head(g_channels, num_clusters, num_clusters)

  def forward(self, x):
    g = self.decoder(self.encoder(x))
    v = self.embedding_head(g)
    v = v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + 1e-10)
    s = torch.sigmoid(self.cluster_head(g)) + 1e-9
    return v, s / s.sum(dim=1, keepdim=True)
