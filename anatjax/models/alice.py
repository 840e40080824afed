"""Alice's network parts around the Swin backbone: the light reconstruction decoder, the
projection head and CASA (shared/methods/alice.md sections 1.2 to 1.4).

The backbone (models/swin3d.SwinViT3D) turns a crop [n, 64, 64, 64, 1] into the hidden
states h0..h4 (NDHWC, F 2^s channels at 32^3 / 2^s; F = 48 in the spec). Then:

- `ReconstructionDecoder`, hidden states -> (x_hat [n, 64^3, 1], u2 [n, 8, 8, 8, 4F]). From
  the coarsest level down, u_s = Blk(Up(u_{s+1}) + h_s) with u_4 = h4; Up is a 2x2x2
  transposed convolution with stride 2, Blk(C) is y = x + GELU(LN(Conv3x3x3(x))), LN over
  channels; x_hat = Up(u0), linear. u2's 512 voxels are the "decoder tokens". Channel counts
  come from the hidden states, so any feature size works.
- `AliceHead`, (h4, h3, u2) -> cls logits [n, K], encoder-token logits E [n, 64, K] and
  decoder-token logits Dt [n, 512, K] (K = 512). Each stream has its own input adapter into
  the head width (cls_in on the token mean of h4, enc_in on h3's tokens, dec_in on u2's);
  one MLP (GELU between its Dense layers) then maps every row to the bottleneck, which is
  L2-normalised and multiplied by a weight-normalised, bias-free last layer: W[:, o] =
  V[:, o] / ||V[:, o]||, the gain fixed at 1, so each logit is a cosine. The student
  (teacher=False) has V_cls for the CLS stream and V_patch for both token streams; the
  teacher (teacher=True) uses its one V_t for all three. V_t is stored under the student's
  name `v_cls`, because it is the EMA of V_cls: the teacher's tree is then the student's
  minus `v_patch`, and the EMA runs over the shared names. Tokens are flattened from
  (D, H, W) in row-major order.
- `CASA`, one post-LN cross-attention layer, (queries [B, Lq, d], keys_values [B, Lk, d_kv])
  -> [B, Lq, d]. S = CASA(student E, student Dt) and the target T = CASA(student E,
  teacher Dt) share its parameters; `casa_student_and_target` makes both calls, T under
  stop-gradient and without dropout unless asked.

Parameter trees, with the counts at the spec's sizes (F = 48; head width 384, MLP 2048,
bottleneck 256, K = 512; CASA d 512, 8 heads of 64, FFN 2048). Conv kernels are
[kd, kh, kw, in, out], Dense kernels [in, out].

  ReconstructionDecoder                          8,424,385
    up{s}/{kernel [2,2,2,C_{s+1},C_s], bias}     s = 3..0, C_s = F 2^s (C_4 = 16F)
    block{s}/conv/{kernel [3,3,3,C_s,C_s], bias}
    block{s}/norm/{scale, bias}
    out/{kernel [2,2,2,F,1], bias}
  AliceHead                                      6,288,768 (student), 6,157,696 (teacher)
    cls_in/{kernel [16F, 384], bias}             Dense on the mean of h4's tokens
    enc_in/{kernel [8F, 384], bias}              Dense on h3's tokens
    dec_in/{kernel [4F, 384], bias}              Dense on u2's tokens
    mlp_0/{kernel [384, 2048], bias}, mlp_1/{kernel [2048, 2048], bias},
    mlp_2/{kernel [2048, 256], bias}
    v_cls [256, 512]                             V_cls (student) or V_t (teacher)
    v_patch [256, 512]                           student only
  CASA                                           3,150,336
    query, key, value/kernel [512, 8 * 64]       no bias
    out/kernel [8 * 64, 512]                     no bias
    attn_norm/{scale, bias}
    ffn_in/{kernel [512, 2048], bias}, ffn_out/{kernel [2048, 512], bias}
    ffn_norm/{scale, bias}

Initialisation: the head's MLP is trunc-normal(0.02) with zero biases (the spec); the
adapters, V and all of CASA follow the reference's PyTorch defaults, U(+-1/sqrt(fan_in))
for kernels and biases, because the reference creates them after its trunc-normal pass; the
decoder (an anatjax Decision) keeps Flax's defaults.

Matmuls (convolutions, Dense layers, attention products) run in `dtype`. LayerNorms,
residual sums, softmax, the L2 normalisation and the head's last layer stay float32: the
last layer's cosines are divided by teacher temperatures near 0.01, which would magnify
bfloat16 rounding a hundredfold, so it also asks for full float32 matmul precision.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from anatjax.models.heads import l2_normalize, symmetric_uniform


def _torch_dense(features: int, fan_in: int, use_bias: bool, dtype, name: str) -> nn.Dense:
  """A Dense layer initialised like PyTorch's nn.Linear."""
  bound = fan_in ** -0.5
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=symmetric_uniform(bound), bias_init=symmetric_uniform(bound),
                  name=name)


def _tokens(x):
  """[n, ..., C] -> [n, L, C], the spatial axes flattened in row-major order."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


# ----------------------------------------------------------------------------------------
# 1.2 Light reconstruction decoder

class ResidualConvBlock(nn.Module):
  """Blk(C): y = x + GELU(LN(Conv3x3x3(x))) on [n, D, H, W, C], LN over channels."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(x.shape[-1], (3, 3, 3), padding="SAME", dtype=self.dtype, name="conv")(x)
    # Two-pass variance: the convolution's output need not be centred.
    y = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32,
                     name="norm")(y.astype(jnp.float32))
    return x + nn.gelu(y, approximate=False)


class ReconstructionDecoder(nn.Module):
  """hidden states [h0, ..., h4] -> (x_hat [n, 2D0, 2H0, 2W0, out_channels], u2 tokens).

  h_s is [n, D0 / 2^s, H0 / 2^s, W0 / 2^s, C_s]; u_s = Blk(Up(u_{s+1}) + h_s) has h_s's
  shape, and the state at `token_level` (u2) is returned with the reconstruction.
  """
  out_channels: int = 1
  token_level: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Sequence[jax.Array]):
    if not 0 <= self.token_level < len(hidden) - 1:
      raise ValueError(f"token_level={self.token_level} needs a decoder level below the "
                       f"deepest of {len(hidden)} hidden states")
    u, tokens = hidden[-1].astype(jnp.float32), None
    for s in reversed(range(len(hidden) - 1)):
      skip = hidden[s].astype(jnp.float32)
      up = nn.ConvTranspose(skip.shape[-1], (2, 2, 2), (2, 2, 2), padding="VALID",
                            dtype=self.dtype, name=f"up{s}")(u)
      if up.shape != skip.shape:
        raise ValueError(f"level {s}: upsampled {up.shape} does not match h{s} {skip.shape}")
      u = ResidualConvBlock(self.dtype, name=f"block{s}")(up.astype(jnp.float32) + skip)
      if s == self.token_level:
        tokens = u
    x_hat = nn.ConvTranspose(self.out_channels, (2, 2, 2), (2, 2, 2), padding="VALID",
                             dtype=self.dtype, name="out")(u)
    return x_hat.astype(jnp.float32), tokens


# ----------------------------------------------------------------------------------------
# 1.3 Projection head

class AliceHead(nn.Module):
  """(h4, h3, u2) -> (cls [n, K], E [n, L3, K], Dt [n, L2, K]); see the module docstring.

  teacher=False builds the student's two last layers (v_cls, v_patch); teacher=True the
  teacher's single one (v_cls, i.e. V_t), used for every stream.
  """
  out_dim: int = 512
  width: int = 384
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  teacher: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h4, h3, u2):
    def adapter(x, name):
      return _torch_dense(self.width, x.shape[-1], True, self.dtype, name)(x)

    cls = adapter(jnp.mean(_tokens(h4).astype(jnp.float32), axis=1), "cls_in")
    enc = adapter(_tokens(h3), "enc_in")
    dec = adapter(_tokens(u2), "dec_in")
    num_enc = enc.shape[1]
    # One MLP pass over all rows: [n, 1 + L3 + L2, width].
    x = jnp.concatenate([cls[:, None], enc, dec], axis=1)
    init = nn.initializers.truncated_normal(0.02)
    for i, features in enumerate((self.hidden_dim, self.hidden_dim, self.bottleneck_dim)):
      x = nn.Dense(features, dtype=self.dtype, kernel_init=init, name=f"mlp_{i}")(x)
      if i < 2:
        x = nn.gelu(x, approximate=False)
    u = l2_normalize(x.astype(jnp.float32))

    def last_layer(name):
      v = self.param(name, symmetric_uniform(self.bottleneck_dim ** -0.5),
                     (self.bottleneck_dim, self.out_dim))
      return l2_normalize(v, axis=0)   # unit columns: weight norm with the gain fixed at 1

    def project(rows, w):
      return jnp.einsum("nld,dk->nlk", rows, w, precision=jax.lax.Precision.HIGHEST)

    w_cls = last_layer("v_cls")
    w_patch = w_cls if self.teacher else last_layer("v_patch")
    cls_logits = project(u[:, :1], w_cls)[:, 0]
    enc_logits = project(u[:, 1:1 + num_enc], w_patch)
    dec_logits = project(u[:, 1 + num_enc:], w_patch)
    return cls_logits, enc_logits, dec_logits


# ----------------------------------------------------------------------------------------
# 1.4 CASA

class CASA(nn.Module):
  """Post-LN cross-attention: queries [B, Lq, d], keys_values [B, Lk, d_kv] -> [B, Lq, d].

    a = dropout(softmax(Q K^T / sqrt(head_dim))),  Q, K, V bias-free projections per head,
    o = LN(dropout(concat_heads(a V) W_o) + queries),          W_o bias-free,
    out = LN(dropout(W_2 ReLU(W_1 o + b_1) + b_2) + o),
  both LayerNorms with eps 1e-6. Dropout acts only with train=True ("dropout" rng).
  """
  num_heads: int = 8
  head_dim: int = 64
  ffn_dim: int = 2048
  dropout_rate: float = 0.1
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys_values, train: bool = False):
    queries = queries.astype(jnp.float32)
    batch, num_queries, d_model = queries.shape
    num_keys, d_kv = keys_values.shape[1:]
    inner = self.num_heads * self.head_dim

    def dropout(x):
      return nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    def layer_norm(x, name):
      return nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, name=name)(x)

    def heads(x, length):
      return x.reshape(batch, length, self.num_heads, self.head_dim)

    q = heads(_torch_dense(inner, d_model, False, self.dtype, "query")(queries), num_queries)
    k = heads(_torch_dense(inner, d_kv, False, self.dtype, "key")(keys_values), num_keys)
    v = heads(_torch_dense(inner, d_kv, False, self.dtype, "value")(keys_values), num_keys)
    q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)   # the reference scales q
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    probs = dropout(jax.nn.softmax(logits, axis=-1)).astype(self.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, num_queries, inner)
    o = _torch_dense(d_model, inner, False, self.dtype, "out")(o).astype(jnp.float32)
    o = layer_norm(dropout(o) + queries, "attn_norm")
    y = _torch_dense(self.ffn_dim, d_model, True, self.dtype, "ffn_in")(o)
    y = _torch_dense(d_model, self.ffn_dim, True, self.dtype, "ffn_out")(nn.relu(y))
    y = y.astype(jnp.float32)
    return layer_norm(dropout(y) + o, "ffn_norm")


def casa_student_and_target(casa: CASA, params, queries, student_kv, teacher_kv, *,
                            train: bool = False, rng=None, teacher_dropout: bool = False):
  """(S, T) = (CASA(queries, student_kv), sg(CASA(queries, teacher_kv))), shared params.

  queries are the student's encoder-token logits E, the keys/values the student's and the
  teacher's decoder-token logits Dt. T is a distillation target, so no gradient leaves it
  (CASA learns through S only). With train=True, S uses dropout drawn from `rng`; T only
  if teacher_dropout (the reference's behaviour; off by default for a deterministic target).
  """
  if train and rng is None:
    raise ValueError("casa_student_and_target(train=True) needs a dropout rng")
  rng_s, rng_t = jax.random.split(rng) if train else (None, None)
  variables = {"params": params}
  student = casa.apply(variables, queries, student_kv, train=train,
                       rngs={"dropout": rng_s} if train else None)
  target_train = train and teacher_dropout
  target = casa.apply(variables, queries, teacher_kv, train=target_train,
                      rngs={"dropout": rng_t} if target_train else None)
  return student, jax.lax.stop_gradient(target)
