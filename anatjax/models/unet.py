"""LD's small VGG-BN U-Net: pixel embeddings and soft cluster assignments (NHWC).

Specification: shared/methods/ld.md section 1. images [N, H, W, C] -> (v, A):
- v [N, H, W, D]: per-pixel embeddings, D = 32, on the unit sphere: x / (||x|| + 1e-10);
- A [N, H, W, K]: per-pixel soft assignments to K regions (16 for LD pretraining, 8 for the
  shape-guided variant), sigmoid then L1-normalised over K, (s + 1e-9) / sum_k (s_k + 1e-9).
The output has the input's resolution. H and W must be multiples of 16: four 2x2 max-pools,
and each x2 upsampled map is concatenated with its skip, so no size is rounded (the spec's
448 and the evaluation's 512 both are). The number of input channels (1 radiograph, 3 fundus)
is that of the images the model is initialised with.

Parameter tree (top level = the units the spec moves around: stage 2 copies `encoder`,
`decoder` and `embedding_head` from stage 1 by name and re-initialises `cluster_head`;
transfer keeps `encoder` alone):

  encoder/stage{s}_{i}/{conv,bn}     s = 1..5, i = 0..(1 | 2): the VGG16-BN-tiny stages
  decoder/up{4,3,2}_{i}/{conv,bn}    i = 0, 1: the two CBRs after each upsample + concat
  embedding_head/cbr/{conv,bn}, embedding_head/out
  cluster_head/cbr/{conv,bn}, cluster_head/out

Intended PyTorch export (a reference module with the same attribute names), per leaf:
  .../conv/kernel [3, 3, Cin, Cout] -> .../conv.weight [Cout, Cin, 3, 3]  (transpose 3, 2, 0, 1)
  .../conv/bias                     -> .../conv.bias
  .../bn/scale, .../bn/bias         -> .../bn.weight, .../bn.bias
  batch_stats .../bn/mean, /var     -> .../bn.running_mean, .../bn.running_var
  (path separator "/" -> "."; `num_batches_tracked` has no counterpart: export writes 0.)
Concatenations put the upsampled map first and the skip second, [up, skip], so the input
channels of each decoder block's first conv are ordered that way in both frameworks.

BatchNorm: eps 1e-5, Flax momentum 0.9 (PyTorch 0.1). The running statistics live in the
`batch_stats` collection: call with train=True and mutable=["batch_stats"] to normalise
with the batch statistics and update them, train=False to use them. One deviation from
PyTorch, too small to matter at these sizes: Flax updates the running variance with the
biased batch variance, PyTorch with the unbiased one (a factor n/(n-1), n >= 28*28*N pixels).
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from anatjax.models.heads import symmetric_uniform

# Output channels of the convolutions of each encoder stage (spec 1.1). Stage s keeps its
# last output as skip f_s; stages 1-4 are followed by a 2x2 max-pool (the reference's pool
# after stage 5 is unused, so it is left out).
ENCODER_STAGES = ((16, 16), (32, 32), (64, 64, 64), (128, 128, 128), (128, 128, 128))
# Output channels of the two CBRs of decoder steps d4, d3, d2 (spec 1.2).
DECODER_STEPS = {"up4": (128, 64), "up3": (64, 32), "up2": (32, 16)}
SIZE_MULTIPLE = 2 ** (len(ENCODER_STAGES) - 1)
# Width of each head's CBR: the channels of g, up(d2) + f1 = 16 + 16 (spec 1.3).
HEAD_WIDTH = 32

BN_MOMENTUM = 0.9   # PyTorch momentum 0.1
BN_EPSILON = 1e-5


def kaiming_fan_out_inits(fan_in: int):
  """Encoder convs (spec 1.1): kernel N(0, 2 / (9 * Cout)) (Kaiming, fan_out, ReLU), bias 0."""
  del fan_in
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.zeros


def torch_default_inits(fan_in: int):
  """Decoder and head convs (spec 1.3): PyTorch's default, kernel and bias U(+-1/sqrt(fan_in))."""
  uniform = symmetric_uniform(1.0 / math.sqrt(fan_in))
  return uniform, uniform


def conv3x3(features: int, in_features: int, inits, dtype, name: str) -> nn.Conv:
  """3x3, stride 1, 'same' padding, with bias; inits(fan_in) -> (kernel_init, bias_init)."""
  kernel_init, bias_init = inits(9 * in_features)
  return nn.Conv(features, (3, 3), padding="SAME", dtype=dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name=name)


class ConvBNReLU(nn.Module):
  """Conv 3x3 -> BatchNorm -> ReLU ("CBR")."""
  features: int
  inits: Callable = torch_default_inits
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv3x3(self.features, x.shape[-1], self.inits, self.dtype, "conv")(x)
    # No axis_name: inside jit, with the batch sharded over a mesh axis, the mean and
    # variance over (N, H, W) are reductions over the global batch (the partitioner adds
    # the all-reduce), which is the spec's synchronised statistics (decision D7).
    # use_fast_variance=False: E[(x - mean)^2] rather than E[x^2] - mean^2, which loses
    # precision in float32 when activations are far from zero-mean.
    x = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, use_fast_variance=False,
                     dtype=self.dtype, name="bn")(x, use_running_average=not train)
    return nn.relu(x)


def check_image_size(images):
  height, width = images.shape[1:3]
  if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
    raise ValueError(
        f"LD U-Net input of {height}x{width} pixels: height and width must be multiples of "
        f"{SIZE_MULTIPLE} (four 2x2 max-pools, and every upsampled map is concatenated with "
        f"the skip of the same size). Resize or crop the images, e.g. to 448x448.")


class VGGEncoder(nn.Module):
  """images [N, H, W, C] -> skips (f1, ..., f5), f_s [N, H / 2^(s-1), W / 2^(s-1), ch_s]."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    check_image_size(images)
    x = images.astype(self.dtype)
    skips = []
    for s, widths in enumerate(ENCODER_STAGES, start=1):
      if s > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, features in enumerate(widths):
        x = ConvBNReLU(features, kaiming_fan_out_inits, self.dtype, name=f"stage{s}_{i}")(
            x, train)
      skips.append(x)
    return tuple(skips)


def upsample_nearest(x):
  """x2 nearest-neighbour upsampling in H and W."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNetDecoder(nn.Module):
  """Skips (f1, ..., f5) -> g [N, H, W, 32] = up(d2) concatenated with f1 (no conv there)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, skips, train: bool):
    *shallower, x = skips
    for (name, widths), skip in zip(DECODER_STEPS.items(), reversed(shallower)):
      x = jnp.concatenate([upsample_nearest(x), skip], axis=-1)
      for i, features in enumerate(widths):
        x = ConvBNReLU(features, dtype=self.dtype, name=f"{name}_{i}")(x, train)
    return jnp.concatenate([upsample_nearest(x), shallower[0]], axis=-1)


class EmbeddingHead(nn.Module):
  """g -> CBR 32 -> Conv D (no activation) -> per-pixel unit vectors, float32."""
  embedding_dim: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, g, train: bool):
    x = ConvBNReLU(HEAD_WIDTH, dtype=self.dtype, name="cbr")(g, train)
    x = conv3x3(self.embedding_dim, x.shape[-1], torch_default_inits, self.dtype, "out")(x)
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)


class ClusterHead(nn.Module):
  """g -> CBR K -> Conv K -> sigmoid -> L1-normalised over K, float32."""
  num_clusters: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, g, train: bool):
    x = ConvBNReLU(self.num_clusters, dtype=self.dtype, name="cbr")(g, train)
    x = conv3x3(self.num_clusters, x.shape[-1], torch_default_inits, self.dtype, "out")(x)
    s = nn.sigmoid(x.astype(jnp.float32)) + 1e-9
    return s / jnp.sum(s, axis=-1, keepdims=True)


class LDUNet(nn.Module):
  """images [N, H, W, C] -> (embeddings [N, H, W, D], assignments [N, H, W, K]), float32.

  `dtype` is the convolutions' compute dtype (bfloat16 in the accelerator recipes); the
  batch statistics, normalisations and sigmoid are computed in float32 regardless.
  Stage 1 computes the cluster head too and ignores it, so both stages share one tree.
  """
  num_clusters: int = 16
  embedding_dim: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    skips = VGGEncoder(self.dtype, name="encoder")(images, train)
    g = UNetDecoder(self.dtype, name="decoder")(skips, train)
    embeddings = EmbeddingHead(self.embedding_dim, self.dtype, name="embedding_head")(
        g, train)
    assignments = ClusterHead(self.num_clusters, self.dtype, name="cluster_head")(g, train)
    return embeddings, assignments
