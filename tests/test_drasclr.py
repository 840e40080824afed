"""DrasCLR: the conditioned convolution, ghost BatchNorm, queue InfoNCE and queue updates
against NumPy, the location-blocked stream, the augmentation, and a short training run on a
small patch store."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from anatjax import losses, sharding
from anatjax.data import atlas as atlas_lib, ct_patches, ct_prepare, patch_views
from anatjax.methods import drasclr
from anatjax.models import cnn3d


def conv3d_reference(x, kernel, bias, stride):
  """Zero-padded 3x3x3 convolution by summing shifted windows: x [n, D, H, W, Cin]."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  out_shape = [(s + 2 - 3) // stride + 1 for s in x.shape[1:4]]
  out = np.zeros([x.shape[0], *out_shape, kernel.shape[-1]])
  for dz in range(3):
    for dy in range(3):
      for dx in range(3):
        window = padded[:, dz:dz + stride * (out_shape[0] - 1) + 1:stride,
                        dy:dy + stride * (out_shape[1] - 1) + 1:stride,
                        dx:dx + stride * (out_shape[2] - 1) + 1:stride]
        out += window @ kernel[dz, dy, dx]
  return out + bias


@pytest.mark.parametrize("stride", [1, 2])
def test_cond_conv_mixes_experts_by_location(stride):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 6, 5, 4, 2)).astype(np.float32)
  loc = rng.uniform(-1, 1, (2, 3)).astype(np.float32)
  layer = cnn3d.CondConv3D(features=3, strides=stride, num_experts=4)
  params = layer.init(jax.random.key(0), x, loc)["params"]
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.3, params)
  got = np.asarray(layer.apply({"params": params}, x, loc))
  for g in range(2):
    routing = 1 / (1 + np.exp(-(loc[g] @ params["router"]["kernel"]
                                + params["router"]["bias"])))
    kernel = np.einsum("e,e...->...", routing, np.asarray(params["kernel"], np.float64))
    want = conv3d_reference(x[g].astype(np.float64), kernel, params["bias"], stride)
    np.testing.assert_allclose(got[g], want, rtol=1e-4, atol=1e-4)


def test_ghost_batch_norm_normalises_each_group_and_moves_the_averages():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, (2, 8, 2, 2, 2, 4)).astype(np.float32)   # G=2, n=8
  norm = cnn3d.GhostBatchNorm()
  variables = norm.init(jax.random.key(0), x, True, 4)
  y, updated = norm.apply(variables, x, True, 4, mutable=["batch_stats"])
  # ghost group j = samples [4j, 4j + 4) of both location groups, all voxels
  groups = x.reshape(2, 2, 4, 8, 4).transpose(1, 0, 2, 3, 4).reshape(2, -1, 4)
  mean, var = groups.mean(1), groups.var(1)
  want = (groups - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
  got = np.asarray(y).reshape(2, 2, 4, 8, 4).transpose(1, 0, 2, 3, 4).reshape(2, -1, 4)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  count = groups.shape[1]
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * mean.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"],
                             0.9 + 0.1 * (var * count / (count - 1)).mean(0), rtol=1e-5)
  # inference uses the running averages
  y_eval = norm.apply({**variables, **updated}, x, False, 4)
  np.testing.assert_allclose(
      y_eval, (x - updated["batch_stats"]["mean"])
      / np.sqrt(updated["batch_stats"]["var"] + 1e-5), rtol=1e-4, atol=1e-4)


def test_queue_info_nce_and_top_k_against_numpy():
  rng = np.random.default_rng(2)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(rng.normal(size=(6, 8))) * 2.0          # need not be unit (the neighbour sum)
  k, queue = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(16, 8)))
  loss, logits = losses.queue_info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), 0.2)
  want_logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], 1) / 0.2
  log_softmax = want_logits - np.log(np.exp(want_logits).sum(1, keepdims=True))
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, -log_softmax[:, 0].mean(), rtol=1e-5)
  for top in (1, 5):
    hits = np.mean([0 in np.argsort(-row, kind="stable")[:top] for row in want_logits])
    np.testing.assert_allclose(losses.top_k_accuracy(logits, top), hits)


def test_enqueue_writes_one_location_and_wraps():
  queue = jnp.zeros((3, 8, 2))
  ptr = jnp.array([0, 6, 0], jnp.int32)
  keys = jnp.ones((2, 2))
  queue, ptr = drasclr.enqueue(queue, ptr, jnp.int32(1), keys)
  assert np.asarray(ptr).tolist() == [0, 0, 0]
  assert np.asarray(queue[1, 6:]).tolist() == [[1, 1], [1, 1]]
  assert float(jnp.abs(queue).sum()) == 4.0
  queue, ptr = drasclr.enqueue(queue, ptr, jnp.int32(1), 2 * keys)
  assert np.asarray(queue[1, :2]).tolist() == [[2, 2], [2, 2]] and int(ptr[1]) == 2


# ---------------------------------------------------------------------- the patch store

def write_store(root, data_config, num_subjects=16, grid=(1, 2, 2), seed=0):
  """A complete store of random patches: each subject has its own HU level, so its
  patches are recognisable across views (something to learn)."""
  os.makedirs(root, exist_ok=True)
  size = data_config.image_size
  rng = np.random.default_rng(seed)
  axes = [np.arange(n) * data_config.patch_stride for n in grid]
  corners = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
  ct_patches.Atlas(corners, atlas_lib.normalised_locations(corners),
                   atlas_lib.nearest_neighbours(corners), size, data_config.spacing_mm,
                   "s0").save(root)
  level = rng.permutation(np.linspace(-950, -300, num_subjects))   # well apart
  for i in range(len(corners)):
    patches = level[:, None, None, None] + rng.normal(0, 60, (num_subjects,) + (size,) * 3)
    np.save(ct_patches.location_file(root, i), patches.astype(np.int16))
  with open(os.path.join(root, ct_patches.SUBJECTS_FILE), "w") as f:
    json.dump([f"s{i}" for i in range(num_subjects)], f)
  with open(os.path.join(root, ct_patches.STORE_FILE), "w") as f:
    json.dump({"options": ct_prepare.Options.from_config(data_config).to_dict()}, f)
  return root


def tiny_config(root):
  """runlocal with 8^3 patches (the smallest the encoder takes: XLA's CPU convolution
  gradients are slow), batch 8, a queue of one batch and BatchNorm over the whole batch
  (ghost groups of 4 samples at the 1-voxel layers leave the statistics of 4 numbers)."""
  from configs import drasclr_cnn3d   # pylint: disable=g-import-not-at-top
  c = drasclr_cnn3d.get_config("runlocal")
  with c.unlocked():
    c.data.root = str(root)
    c.data.num_workers = 0
    c.data.image_size, c.data.patch_stride = 8, 6
    c.batch_size = 8
    c.drasclr.queue_size = 8
    c.drasclr.bn_mode = "global"
    c.mesh.data = 1              # 8 simulated devices make XLA's CPU 3-D convolutions crawl
  return c


def test_location_blocked_stream(tmp_path):
  config = tiny_config(tmp_path)
  write_store(tmp_path, config.data, num_subjects=19, grid=(1, 2, 3))
  source = ct_patches.LocationBlockedPatches(str(tmp_path))
  batch, steps = 4, 19 // 4
  assert source.examples_per_epoch(batch) == 6 * steps * batch
  stream = source.ordered_stream(seed=3, batch_size=batch)
  per_epoch = source.examples_per_epoch(batch)
  for epoch in range(2):
    seen = []
    for step in range(6 * steps):
      items = [stream[epoch * per_epoch + step * batch + j] for j in range(batch)]
      locations = {int(i["loc_idx"]) for i in items}
      assert len(locations) == 1                          # one location per batch
      rows = {int(np.round(i["anchor"].mean())) for i in items}
      assert len(rows) == batch                           # distinct subjects
      seen.append(locations.pop())
    assert seen == sorted(seen) and sorted(set(seen)) == list(range(6))   # sequential
  item = stream[0]
  assert item["neighbours"].shape == (2, 8, 8, 8)
  np.testing.assert_array_equal(item["neigh_loc"],
                                source.atlas.loc_norm[source.atlas.neighbours[item["loc_idx"]]])


def test_augment_identity_and_units():
  rng = np.random.default_rng(0)
  patch = rng.integers(-1100, 400, (16, 16, 16)).astype(np.int16)
  still = patch_views.PatchAugment(max_degrees=0, max_scale=0, max_shift=0, p_noise=0,
                                   p_contrast=0)
  x = still(patch, rng)
  np.testing.assert_allclose(x, np.clip(patch, -1024, 240) + 1024, atol=1e-4)
  units = patch_views.to_view_units(x)
  net = np.asarray(patch_views.to_network(units))
  np.testing.assert_allclose(net, x / 632 - 1, atol=1e-4)
  assert net.min() >= -1 and net.max() <= 1


def test_drasclr_trains_on_a_patch_store(tmp_path):
  from anatjax import train   # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / "store")
  write_store(tmp_path / "store", config.data, num_subjects=32, grid=(1, 1, 2))
  with config.unlocked():
    config.batch_size = config.drasclr.queue_size = 16
    config.duration = "16ep"     # 2 locations x 2 steps per epoch
    config.log_every = 8
    config.checkpoint.every = "16ep"   # one save: the state is ~100 MB
  result = train.train(config, str(tmp_path / "run"))
  losses_ = np.array([loss for _, loss in result["losses"]])
  assert result["step"] == 64 and np.all(np.isfinite(losses_))
  assert losses_[-16:].mean() < losses_[:16].mean() - 0.3
  state = result["state"]["method_state"]
  assert np.asarray(state["ptr"]).tolist() == [0, 0]        # every batch fills K = 16
  queue = np.asarray(state["queue"])
  np.testing.assert_allclose(np.linalg.norm(queue, axis=-1), 1.0, atol=1e-5)


def filled(tree, rng):
  """Random NumPy values for every leaf of an abstract tree (BatchNorm variances > 0):
  faster than compiling the model's init."""
  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return (rng.normal(size=leaf.shape) * 0.2).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, tree)


def test_prepare_moves_the_key_encoder_unshuffles_keys_and_enqueues(tmp_path):
  from anatjax import config as config_lib   # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  write_store(tmp_path, config.data, num_subjects=8, grid=(1, 1, 3))
  with config.unlocked():
    config.drasclr.queue_size = 16
  schedule = config_lib.Schedule(8, 3, 30)
  method = drasclr.make(config, schedule)
  rng = np.random.default_rng(0)
  params_abstract, state_abstract = jax.eval_shape(method.init, jax.random.key(0))
  params = filled(params_abstract, rng)
  state = filled(state_abstract, rng)
  state["ptr"] = np.array([0, 8, 0], np.int32)
  batch = {"view2": rng.integers(0, 20000, (8, 8, 8, 8)).astype(np.int16),
           "loc": np.tile(np.float32([[0.5, -0.5, 1.0]]), (8, 1)),
           "loc_idx": np.full(8, 1, np.int32)}
  new_state, context, _ = jax.jit(method.prepare)(params, state, batch, 3)
  m = config.drasclr.momentum
  key_params = jax.tree.map(lambda k, q: m * k + (1 - m) * q, state["key"]["params"], params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new_state["key"]["params"], key_params)
  # BatchNorm over the whole batch: the shuffle cannot change a key, so the keys equal a
  # pass in batch order
  network = cnn3d.DrasCLRNetwork()
  apply = jax.jit(lambda v, x, loc: network.apply(v, x, loc, train=True,
                                                  mutable=["batch_stats"]))
  (_, z), _ = apply({"params": key_params, "batch_stats": state["key"]["batch_stats"]},
                    np.asarray(patch_views.to_network(batch["view2"]))[None, ..., None],
                    batch["loc"][:1])
  want = np.asarray(z[0]) / np.linalg.norm(np.asarray(z[0]), axis=-1, keepdims=True)
  keys = np.asarray(context["per_example"]["key"])
  np.testing.assert_allclose(keys, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(context["negatives"], state["queue"][1])   # read before
  # the same step with the batch sharded over the 8 simulated devices (the trainer's
  # layout) gives the same keys and queue: the enqueue sees the whole global batch
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  sharded_state, sharded_context, _ = jax.jit(method.prepare)(
      params, state, sharding.global_batch(batch, mesh), 3)
  np.testing.assert_allclose(sharded_context["per_example"]["key"], keys, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(sharded_state["queue"], new_state["queue"], rtol=1e-4,
                             atol=1e-5)
  queue = np.asarray(new_state["queue"])
  np.testing.assert_allclose(queue[1, 8:16], keys, rtol=1e-6)
  np.testing.assert_allclose(queue[1, :8], state["queue"][1, :8])
  np.testing.assert_allclose(queue[[0, 2]], state["queue"][[0, 2]])
  assert np.asarray(new_state["ptr"]).tolist() == [0, 0, 0]
