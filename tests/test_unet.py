"""LD's U-Net (shared/methods/ld.md section 1): layout, heads, BatchNorm, global statistics
on a sharded batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from anatjax.models import unet

MODEL = unet.LDUNet()  # K = 16, D = 32, float32


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _init_shapes(images, model=MODEL):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


@pytest.fixture(scope="module")
def variables():
  """The model's variables, with random values drawn by NumPy: a jitted `init` compiles
  a random-number kernel per layer, which is slow on a small CPU. The initialisers
  themselves are tested on their own below."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("kernel", "bias"):
      return rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(fill, _init_shapes(jnp.zeros((1, 16, 16, 1))))


@pytest.fixture(scope="module")
def images():
  # Very different images across the batch, so that statistics over a part of the batch
  # (one device's shard) would differ from those of the whole batch.
  scales = np.arange(1.0, 9.0, dtype=np.float32)[:, None, None, None]
  noise = np.random.default_rng(1).normal(size=(8, 16, 16, 1)).astype(np.float32)
  return noise * scales + scales


def _forward(variables, images, train):
  if train:
    return MODEL.apply(variables, images, train=True, mutable=("batch_stats",))
  return MODEL.apply(variables, images, train=False), variables


forward = jax.jit(_forward, static_argnames="train")


@pytest.fixture(scope="module")
def train_outputs(variables, images):
  """((embeddings, assignments), new variables) of one training-mode pass, one device."""
  return forward(variables, images, train=True)


def test_layout_and_sizes_match_the_spec():
  shapes = _init_shapes(jnp.zeros((1, 448, 448, 3)))
  params = shapes["params"]
  assert set(params) == {"encoder", "decoder", "embedding_head", "cluster_head"}
  assert set(params["encoder"]) == {f"stage{s}_{i}" for s, n in
                                    zip(range(1, 6), (2, 2, 3, 3, 3)) for i in range(n)}
  assert params["encoder"]["stage1_0"]["conv"]["kernel"].shape == (3, 3, 3, 16)
  # Each decoder step reads up(deeper) + skip: 128 + 128, 64 + 64, 32 + 32 channels.
  decoder = params["decoder"]
  for name, cin, cout in (("up4_0", 256, 128), ("up3_0", 128, 64), ("up2_0", 64, 32),
                          ("up2_1", 32, 16)):
    assert decoder[name]["conv"]["kernel"].shape == (3, 3, cin, cout)
  assert params["embedding_head"]["out"]["kernel"].shape == (3, 3, 32, 32)
  assert params["cluster_head"]["cbr"]["conv"]["kernel"].shape == (3, 3, 32, 16)
  assert params["cluster_head"]["out"]["kernel"].shape == (3, 3, 16, 16)
  # The spec: encoder ~0.92 M, decoder + heads ~0.51 M, whole network ~1.4 M.
  encoder = _count(params["encoder"])
  assert abs(encoder - 0.92e6) < 0.01e6
  assert abs(_count(params) - encoder - 0.51e6) < 0.01e6
  assert abs(_count(params) - 1.4e6) < 0.05e6
  # Every BatchNorm has running statistics at the same path.
  stats = shapes["batch_stats"]
  assert jax.tree.map(lambda a: a.shape, stats["decoder"]["up4_1"]) == {
      "bn": {"mean": (64,), "var": (64,)}}
  bn_channels = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                    if [k.key for k in path[-2:]] == ["bn", "scale"])
  assert _count(stats) == 2 * bn_channels


def test_image_size_not_a_multiple_of_16_fails_clearly():
  with pytest.raises(ValueError, match="40x48 pixels.*multiples of 16"):
    _init_shapes(jnp.zeros((1, 40, 48, 1)))


def test_bfloat16_convolutions_give_float32_outputs():
  model = unet.LDUNet(num_clusters=8, dtype=jnp.bfloat16)
  images = jnp.zeros((2, 32, 32, 3))
  variables = _init_shapes(images, model)
  embeddings, assignments = jax.eval_shape(
      lambda v: model.apply(v, images, train=False), variables)
  assert (embeddings.dtype, assignments.dtype) == (jnp.float32, jnp.float32)
  assert assignments.shape == (2, 32, 32, 8)
  assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_initialisers_follow_the_spec():
  encoder_kernel, encoder_bias = unet.kaiming_fan_out_inits(9 * 64)  # N(0, 2 / fan_out)
  decoder_kernel, decoder_bias = unet.torch_default_inits(9 * 256)   # U(+-1/sqrt(fan_in))

  @jax.jit
  def draw(key):
    return (encoder_kernel(key, (3, 3, 64, 128)), encoder_bias(key, (128,)),
            decoder_kernel(key, (3, 3, 256, 128)), decoder_bias(key, (128,)))

  kernel, bias, *uniform = draw(jax.random.key(0))
  assert np.std(kernel) == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.03)
  assert not np.asarray(bias).any()
  bound = 1 / (9 * 256) ** 0.5
  for leaf in uniform:
    assert 0.9 * bound < np.abs(leaf).max() <= bound


def test_heads_give_unit_embeddings_and_assignment_distributions(variables, images):
  (embeddings, assignments), _ = forward(variables, images, train=False)
  assert embeddings.shape == (8, 16, 16, 32) and assignments.shape == (8, 16, 16, 16)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.sum(assignments, axis=-1), 1.0, atol=1e-5)
  assert (np.asarray(assignments) > 0).all()


def _same_conv(x, kernel, bias):
  """NumPy 3x3 'same' cross-correlation, NHWC."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  height, width = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(padded[:, dy:dy + height, dx:dx + width] @ kernel[dy, dx]
            for dy in range(3) for dx in range(3))
  return out + np.asarray(bias)


def test_batchnorm_train_mode_uses_batch_statistics_and_updates_running_ones(
    variables, images, train_outputs):
  (eval_embeddings, _), _ = forward(variables, images, train=False)
  (train_embeddings, _), updates = train_outputs
  assert not np.allclose(train_embeddings, eval_embeddings, atol=1e-3)
  # Running statistics of the first BatchNorm after one step from (mean 0, var 1):
  # momentum 0.9 keeps 90% of the old value (PyTorch momentum 0.1), the biased variance.
  conv = variables["params"]["encoder"]["stage1_0"]["conv"]
  features = _same_conv(images, conv["kernel"], conv["bias"])
  stats = updates["batch_stats"]["encoder"]["stage1_0"]["bn"]
  np.testing.assert_allclose(stats["mean"], 0.1 * features.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * features.var(axis=(0, 1, 2)),
                             rtol=1e-4)
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                      jax.tree.leaves(updates["batch_stats"])):
    assert not np.allclose(old, new)


def test_sharded_batch_gives_global_batch_statistics(variables, images, train_outputs):
  """Inside jit, a batch sharded over the 'data' axis of 8 CPU devices is normalised with
  the statistics of the whole batch, exactly as on one device."""
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  (got_v, got_a), got = forward(replicated, sharded, train=True)
  assert len(got_v.sharding.device_set) == 8
  (want_v, want_a), want = train_outputs
  np.testing.assert_allclose(got_v, want_v, atol=2e-5)
  np.testing.assert_allclose(got_a, want_a, atol=2e-5)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got["batch_stats"]),
                                 jax.tree.leaves(want["batch_stats"])):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-5)


def test_pytorch_reference_module_matches_the_export(variables, tmp_path):
  """The exported state dict loads strictly into anatjax/export/ld_unet_torch.py, and the
  PyTorch module (inference mode, running statistics) gives the Flax outputs."""
  torch = pytest.importorskip("torch")
  # pylint: disable=g-import-not-at-top  (torch only where it is installed)
  import safetensors.torch
  from anatjax.export import ld_unet_torch, unet as unet_export
  rng = np.random.default_rng(5)
  stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                       variables["batch_stats"])
  trained = {"params": variables["params"], "batch_stats": stats}
  info = unet_export.export_unet(trained["params"], stats, str(tmp_path / "ld.safetensors"),
                                 metadata={"method": "ld"})
  assert info["torch_create_model"].endswith("(in_channels=1, num_clusters=16, embedding_dim=32)")
  model = ld_unet_torch.LDUNet(in_channels=1, num_clusters=16)
  model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "ld.safetensors")),
                        strict=True)
  model.eval()
  images = rng.normal(size=(2, 32, 32, 1)).astype(np.float32)
  v, a = MODEL.apply(trained, images, train=False)
  with torch.no_grad():
    tv, ta = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(tv.numpy().transpose(0, 2, 3, 1), v, atol=1e-4)
  np.testing.assert_allclose(ta.numpy().transpose(0, 2, 3, 1), a, atol=1e-4)
