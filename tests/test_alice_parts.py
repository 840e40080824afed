"""Alice's decoder, head, CASA and losses (shared/methods/alice.md 1.2-1.4 and 3), each
checked against a float64 NumPy computation written here from the spec's formulas."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf, log_softmax, softmax

from anatjax import losses, optim
from anatjax.models.alice import AliceHead, CASA, ReconstructionDecoder, casa_student_and_target
from anatjax.models.swin3d import SwinViT3D

KEY = jax.random.PRNGKey(0)


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def random_params(module, *args, seed=0, scale=0.2):
  """Parameters of `module` shaped by an uncompiled init, filled with NumPy draws; LayerNorm
  scales near 1 (so the normalised values keep their size)."""
  shapes = jax.eval_shape(module.init, KEY, *args)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    values = rng.normal(size=leaf.shape) * scale
    if "norm" in name and name.endswith("scale"):
      values = 1.0 + values
    return jnp.asarray(values, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def swin_hidden_shapes(feature_size, n=2, size=64):
  """The backbone's hidden-state shapes, by abstract evaluation (nothing compiled)."""
  x = jax.ShapeDtypeStruct((n, size, size, size, 1), jnp.float32)
  hidden, _ = jax.eval_shape(SwinViT3D(feature_size=feature_size).init_with_output, KEY, x)
  return hidden


# ---------------------------------------------------------------------------- NumPy side

def np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_casa(p, queries, kv, heads, head_dim):
  """Inference-mode CASA written head by head."""
  p = f64(p)
  outs = []
  for h in range(heads):
    cols = slice(h * head_dim, (h + 1) * head_dim)
    q = queries @ p["query"]["kernel"][:, cols]
    k = kv @ p["key"]["kernel"][:, cols]
    v = kv @ p["value"]["kernel"][:, cols]
    a = softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(head_dim), axis=-1)
    outs.append(a @ v)
  o = np.concatenate(outs, -1) @ p["out"]["kernel"]
  o = np_layer_norm(o + queries, p["attn_norm"]["scale"], p["attn_norm"]["bias"], 1e-6)
  hidden = np.maximum(o @ p["ffn_in"]["kernel"] + p["ffn_in"]["bias"], 0.0)
  y = hidden @ p["ffn_out"]["kernel"] + p["ffn_out"]["bias"]
  return np_layer_norm(y + o, p["ffn_norm"]["scale"], p["ffn_norm"]["bias"], 1e-6)


def np_head(p, h4, h3, u2, teacher):
  p = f64(p)

  def dense(x, name):
    return x @ p[name]["kernel"] + p[name]["bias"]

  def mlp(x):
    x = np_gelu(dense(x, "mlp_0"))
    x = np_gelu(dense(x, "mlp_1"))
    x = dense(x, "mlp_2")
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  def unit_columns(v):
    return v / np.linalg.norm(v, axis=0, keepdims=True)

  n = h4.shape[0]
  cls = mlp(dense(h4.reshape(n, -1, h4.shape[-1]).mean(1), "cls_in"))
  enc = mlp(dense(h3.reshape(n, -1, h3.shape[-1]), "enc_in"))
  dec = mlp(dense(u2.reshape(n, -1, u2.shape[-1]), "dec_in"))
  w_cls = unit_columns(p["v_cls"])
  w_patch = w_cls if teacher else unit_columns(p["v_patch"])
  return cls @ w_cls, enc @ w_patch, dec @ w_patch


def np_distillation(student, teacher, centre, tau_s, tau_t, pairs):
  """mean over the listed (teacher view, student view) pairs of mean_rows H(p_t, p_s)."""
  terms = []
  for q, v in pairs:
    p = softmax((teacher[q] - centre) / tau_t, axis=-1)
    terms.append(np.mean(-(p * log_softmax(student[v] / tau_s, axis=-1)).sum(-1)))
  return np.mean(terms)


# ---------------------------------------------------------------------------- losses

def test_cls_distillation_is_cross_view_and_matches_numpy():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 2, 5, 16))
  centre = rng.normal(size=16) * 0.1
  got = losses.alice_cls_distillation(jnp.float32(s), jnp.float32(t), jnp.float32(centre),
                                      0.1, 0.04)
  want = np_distillation(s, t, centre, 0.1, 0.04, pairs=[(0, 1), (1, 0)])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  within = np_distillation(s, t, centre, 0.1, 0.04, pairs=[(0, 0), (1, 1)])
  assert abs(want - within) > 1e-3   # the pairing matters for these inputs


def test_patch_distillation_matches_numpy():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(2, 2, 3, 7, 16))
  centre2 = rng.normal(size=16) * 0.1
  got = losses.alice_patch_distillation(jnp.float32(s), jnp.float32(t), jnp.float32(centre2),
                                        0.1, 0.05)
  want = np_distillation(s, t, centre2, 0.1, 0.05, pairs=[(0, 0), (1, 1)])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_reconstruction_is_five_times_the_voxel_mse():
  rng = np.random.default_rng(3)
  x_hat, x = rng.uniform(size=(2, 4, 8, 8, 8, 1))
  got = losses.alice_reconstruction(jnp.float32(x_hat), jnp.float32(x))
  np.testing.assert_allclose(float(got), 5.0 * np.mean((x_hat - x) ** 2), rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8), (2, 3, 5, 8)])
def test_updated_centre_matches_numpy(shape):
  rng = np.random.default_rng(4)
  centre, outputs = rng.normal(size=8), rng.normal(size=shape)
  got = losses.updated_centre(jnp.float32(centre), jnp.float32(outputs))
  want = 0.9 * centre + 0.1 * outputs.reshape(-1, 8).mean(0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_argmax_agreement_pairs_teacher_view0_with_student_view1():
  teacher = np.zeros((2, 4, 3), np.float32)
  student = np.zeros((2, 4, 3), np.float32)
  teacher[0, np.arange(4), [0, 1, 2, 0]] = 1.0
  student[1, np.arange(4), [0, 1, 0, 1]] = 1.0
  student[0, np.arange(4), [0, 1, 2, 0]] = 1.0   # would agree fully if paired within view
  assert float(losses.alice_argmax_agreement(teacher, student)) == pytest.approx(0.5)


def test_teacher_temperature_is_optim_linear_per_epoch():
  # The reference's per-epoch table, np.linspace over the warm-up epochs, then constant.
  steps_per_epoch, warmup_epochs = 7, 30
  table = np.concatenate([np.linspace(0.008, 0.01, warmup_epochs), np.full(10, 0.01)])
  schedule = optim.linear(0.008, 0.01, warmup_epochs - 1)
  steps = np.arange(40 * steps_per_epoch)
  got = np.asarray(jax.vmap(schedule)(steps // steps_per_epoch))
  np.testing.assert_allclose(got, table[steps // steps_per_epoch], rtol=1e-6)


def test_distillation_gradients_reach_the_student_only():
  rng = np.random.default_rng(5)
  s, t = (jnp.float32(a) for a in rng.normal(size=(2, 2, 3, 6)))
  centre = jnp.float32(rng.normal(size=6))
  grads = jax.jit(jax.grad(losses.alice_cls_distillation, argnums=(0, 1, 2)),
                  static_argnums=(3, 4))(s, t, centre, 0.1, 0.04)
  assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2]))
  # d/ds[v] = (softmax(s[v] / tau_s) - p_t[1 - v]) / (tau_s * 2B), from the formula.
  p = softmax((np.asarray(t, np.float64) - np.asarray(centre)) / 0.04, axis=-1)[::-1]
  want = (softmax(np.asarray(s, np.float64) / 0.1, axis=-1) - p) / (0.1 * 6)
  np.testing.assert_allclose(np.asarray(grads[0]), want, rtol=1e-4, atol=1e-6)
  s4, t4 = s[:, :, None], t[:, :, None]
  grads = jax.jit(jax.grad(losses.alice_patch_distillation, argnums=(0, 1, 2)),
                  static_argnums=(3, 4))(s4, t4, centre, 0.1, 0.04)
  assert np.any(np.asarray(grads[0]))
  assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2]))


# ---------------------------------------------------------------------------- CASA

TINY_CASA = dict(num_heads=2, head_dim=8, ffn_dim=24)


def tiny_casa_inputs(seed=6):
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(3, 5, 16))
  student_kv, teacher_kv = rng.normal(size=(2, 3, 9, 12))
  return queries, student_kv, teacher_kv


def test_casa_matches_numpy_in_inference_mode():
  casa = CASA(**TINY_CASA)
  queries, kv, _ = tiny_casa_inputs()
  params = random_params(casa, jnp.float32(queries), jnp.float32(kv))
  got = jax.jit(lambda p, q, k: casa.apply({"params": p}, q, k))(
      params, jnp.float32(queries), jnp.float32(kv))
  want = np_casa(params, queries, kv, heads=2, head_dim=8)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_casa_full_size_shapes_and_parameters():
  e = jax.ShapeDtypeStruct((4, 64, 512), jnp.float32)
  dt = jax.ShapeDtypeStruct((4, 512, 512), jnp.float32)
  out, variables = jax.eval_shape(CASA().init_with_output, KEY, e, dt)
  assert out.shape == (4, 64, 512) and out.dtype == jnp.float32
  params = variables["params"]
  assert count(params) == 3_150_336
  for name in ("query", "key", "value", "out"):   # bias-free projections
    assert set(params[name]) == {"kernel"} and params[name]["kernel"].shape == (512, 512)
  out, _ = jax.eval_shape(CASA(dtype=jnp.bfloat16).init_with_output, KEY, e, dt)
  assert out.dtype == jnp.float32


def test_casa_target_is_deterministic_and_stops_gradients():
  casa = CASA(**TINY_CASA)
  queries, student_kv, teacher_kv = (jnp.float32(a) for a in tiny_casa_inputs())
  params = random_params(casa, queries, student_kv)
  # An RBG key: Flax's dropout then compiles in a fraction of threefry's time.
  rng = jax.random.key(1, impl="rbg")
  w_s, w_t = (jnp.float32(a) for a in np.random.default_rng(7).normal(size=(2, 3, 5, 16)))

  def objective(p, q, skv, tkv):
    s, t = casa_student_and_target(casa, p, q, skv, tkv, train=True, rng=rng)
    return jnp.sum(s * w_s) + jnp.sum(t * w_t)

  def student_only(p, q, skv):
    s, _ = casa_student_and_target(casa, p, q, skv, teacher_kv, train=True, rng=rng)
    return jnp.sum(s * w_s)

  @jax.jit
  def everything(p, q, skv, tkv):   # one compilation for all the calls
    pair = functools.partial(casa_student_and_target, casa, p, q, skv, tkv)
    return (pair(), pair(train=True, rng=rng), pair(train=True, rng=rng, teacher_dropout=True),
            jax.grad(objective, argnums=(0, 1, 2, 3))(p, q, skv, tkv),
            jax.grad(student_only, argnums=(0, 1, 2))(p, q, skv))

  (s_eval, t_eval), (s_train, t_train), (_, t_drop), grads, want = everything(
      params, queries, student_kv, teacher_kv)
  assert not np.allclose(s_train, s_eval)                 # dropout acts on S
  np.testing.assert_allclose(np.asarray(t_train), np.asarray(t_eval), rtol=1e-6, atol=1e-6)
  assert not np.allclose(t_drop, t_eval)                  # ... and on T only if asked
  assert not np.any(np.asarray(grads[3]))                # nothing reaches teacher tokens
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads[:3]), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-5,
                               atol=1e-6)
  assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(grads[0]))


# ---------------------------------------------------------------------------- decoder, head

def test_full_size_decoder_and_head_shapes_and_parameter_counts():
  hidden = swin_hidden_shapes(48)
  assert [h.shape[1:] for h in hidden] == [(32,) * 3 + (48,), (16,) * 3 + (96,),
                                           (8,) * 3 + (192,), (4,) * 3 + (384,),
                                           (2,) * 3 + (768,)]
  (x_hat, u2), variables = jax.eval_shape(ReconstructionDecoder().init_with_output, KEY,
                                          hidden)
  assert x_hat.shape == (2, 64, 64, 64, 1) and u2.shape == (2, 8, 8, 8, 192)
  assert count(variables) == 8_424_385   # the spec's "about 8.4 M"
  for teacher, expected in ((False, 6_288_768), (True, 6_157_696)):
    (cls, enc, dec), variables = jax.eval_shape(
        AliceHead(teacher=teacher).init_with_output, KEY, hidden[4], hidden[3], u2)
    assert (cls.shape, enc.shape, dec.shape) == ((2, 512), (2, 64, 512), (2, 512, 512))
    assert count(variables) == expected
  (cls, _, _), _ = jax.eval_shape(AliceHead(dtype=jnp.bfloat16).init_with_output, KEY,
                                  hidden[4], hidden[3], u2)
  assert cls.dtype == jnp.float32


def test_tiny_decoder_and_head_shapes():
  rng = np.random.default_rng(8)
  hidden = [jnp.float32(rng.normal(size=h.shape)) for h in swin_hidden_shapes(12, size=32)]
  decoder = ReconstructionDecoder()
  params = random_params(decoder, hidden, scale=0.05)
  x_hat, u2 = jax.jit(lambda p, h: decoder.apply({"params": p}, h))(params, hidden)
  assert x_hat.shape == (2, 32, 32, 32, 1) and u2.shape == (2, 4, 4, 4, 48)
  assert np.isfinite(np.asarray(x_hat)).all()
  head = AliceHead(out_dim=24, width=16, hidden_dim=32, bottleneck_dim=8)
  head_params = random_params(head, hidden[4], hidden[3], u2)
  cls, enc, dec = jax.jit(lambda p, *h: head.apply({"params": p}, *h))(
      head_params, hidden[4], hidden[3], u2)
  assert (cls.shape, enc.shape, dec.shape) == ((2, 24), (2, 8, 24), (2, 64, 24))


@pytest.mark.parametrize("teacher", [False, True])
def test_head_matches_numpy_with_a_unit_column_last_layer(teacher):
  rng = np.random.default_rng(9)
  h4, h3, u2 = (rng.normal(size=(3, s, s, s, c)) for s, c in ((1, 20), (2, 10), (4, 6)))
  head = AliceHead(out_dim=12, width=16, hidden_dim=32, bottleneck_dim=8, teacher=teacher)
  inputs = [jnp.float32(a) for a in (h4, h3, u2)]
  params = random_params(head, *inputs)
  # The last layers are bare [bottleneck, K] matrices: no bias, no gain parameter.
  last = {"v_cls"} if teacher else {"v_cls", "v_patch"}
  assert {k for k in params if k.startswith("v_")} == last
  assert all(params[k].shape == (8, 12) for k in last)
  apply = jax.jit(lambda p, *h: head.apply({"params": p}, *h))
  got = apply(params, *inputs)
  want = np_head(params, h4, h3, u2, teacher)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5)
  # Cosine logits: the columns act as unit vectors, whatever V's column lengths are.
  assert max(float(jnp.max(jnp.abs(g))) for g in got) <= 1.0 + 1e-6
  rescaled = dict(params)
  for k in last:
    rescaled[k] = params[k] * jnp.float32(rng.uniform(0.5, 3.0, size=(1, 12)))
  for g, r in zip(got, apply(rescaled, *inputs)):
    np.testing.assert_allclose(np.asarray(r), np.asarray(g), rtol=1e-5, atol=1e-6)
  if not teacher:
    # v_patch drives the token streams only; the CLS stream ignores it.
    swapped = dict(params, v_patch=params["v_cls"])
    cls, enc, _ = apply(swapped, *inputs)
    np.testing.assert_allclose(np.asarray(cls), np.asarray(got[0]), rtol=1e-6)
    assert not np.allclose(np.asarray(enc), np.asarray(got[1]))
