"""Alice end to end: the volume store, the in-batch pairing stream, mined batches through
the Grain pipeline, the device-side masks, one train step's bookkeeping (frozen last
layers, teacher EMA, centres), and a short run whose teacher encoder is exported into
MONAI's SwinUNETR with the same hidden states."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatjax.data import alice_pairs, ct_volumes, pipeline
from anatjax.methods import alice

NUM_SUBJECTS = 4


def tiny_config(root):
  """runlocal on a 4-volume store at 8 mm: 32^3 crops, Swin feature size 12 with 4^3
  windows, batch 4 (one step per epoch), one device."""
  from configs import alice_swin3d   # pylint: disable=g-import-not-at-top
  c = alice_swin3d.get_config("runlocal")
  with c.unlocked():
    c.data.root = str(root)
    c.data.num_examples = NUM_SUBJECTS
    c.data.synthetic_size = 40
    c.data.spacing_mm = (8.0, 8.0, 8.0)
    c.data.registration_iterations = 20
    c.data.num_workers = 0
    c.batch_size = 4
    c.mesh.data = 1
  return c


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp("alice") / "store"
  ct_volumes.ensure_store(tiny_config(root).data, say=lambda _: None)
  return root


def test_store_holds_volumes_masks_and_maps(store):
  config = tiny_config(store)
  with open(os.path.join(store, ct_volumes.SUBJECTS_FILE)) as f:
    subjects = json.load(f)
  atlas = ct_volumes.read_options(store)["atlas"]
  assert len(subjects) == NUM_SUBJECTS
  for row, subject in enumerate(subjects):
    image, body = ct_volumes.load_volume(str(store), row, subject)
    assert image.array.dtype == np.int16 and body.dtype == bool
    assert body.shape == image.shape and image.spacing == (8.0, 8.0, 8.0)
    assert 0.1 < body.mean() < 0.9 and image.array[body].mean() > -300
    if subject["id"] == atlas:
      np.testing.assert_allclose(subject["matrix"], np.eye(3))
  said = []
  assert ct_volumes.ensure_store(config.data, say=said.append) == str(store) and not said
  with config.unlocked():
    config.data.registration_iterations = 21
  with pytest.raises(ValueError, match="registration_iterations"):
    ct_volumes.ensure_store(config.data)


def test_pairs_are_distinct_volumes_with_the_next_one_of_their_block(store):
  source = ct_volumes.VolumePairs(str(store))
  batch = 2
  assert source.examples_per_epoch(batch) == 4
  orders = []
  for epoch in range(3):
    pairs = [source.pair(epoch * 4 + i, 0, batch) for i in range(4)]
    a, b = np.array(pairs).T
    assert sorted(a) == list(range(NUM_SUBJECTS))          # each volume once as A
    for block in range(2):
      rows = a[block * batch:(block + 1) * batch]
      np.testing.assert_array_equal(b[block * batch:(block + 1) * batch], np.roll(rows, -1))
    orders.append(tuple(a))
  assert len(set(orders)) > 1                                  # reshuffled per epoch
  with pytest.raises(ValueError, match="at least 2"):
    source.examples_per_epoch(1)
  with pytest.raises(ValueError, match="needs at least that many volumes"):
    source.examples_per_epoch(8)


def batches(source, method, count, batch_size, **kwargs):
  ds = iter(pipeline.make_dataset(source, method.host_transforms, batch_size=batch_size,
                                  seed=0, **kwargs))
  return [next(ds) for _ in range(count)]


def test_mined_batches_are_deterministic_and_split_over_processes(store):
  from anatjax import config as config_lib   # pylint: disable=g-import-not-at-top
  config = tiny_config(store)
  with config.unlocked():
    config.alice.mask_fraction = 0.75    # the spec's masks (runlocal hides fewer)
  source = ct_volumes.VolumePairs(str(store))
  method = alice.make(config, config_lib.Schedule(4, 1, 10))
  first, again = (batches(source, method, 2, 4) for _ in range(2))
  for x, y in zip(first, again):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  batch = first[0]
  assert batch["crops"].shape == (4, 2, 32, 32, 32) and batch["crops"].dtype == np.int16
  assert batch["mask_cells"].shape == (4, 2, 4, 4)
  assert np.all(batch["mask_cells"].sum((2, 3)) == 12)
  assert batch["crops"].min() >= -125 and batch["crops"].max() <= 225
  assert np.all(batch["pair_score"][~batch["weak"]] > 0.7)
  # Two processes, each with half of the global batch of 4: the same examples, whose
  # partners are still taken from the whole global block.
  halves = [batches(source, method, 2, 2, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(2):
    merged = np.empty_like(first[step]["crops"])
    merged[0::2], merged[1::2] = halves[0][step]["crops"], halves[1][step]["crops"]
    np.testing.assert_array_equal(merged, first[step]["crops"])


def test_ablations_mask_fraction_and_self_partner(store):
  """alice.mask_fraction hides ceil(16 f) columns; alice.partner='self' crops A twice at
  the same point (views differ by their masks only); bad values stop the build."""
  from anatjax import config as config_lib   # pylint: disable=g-import-not-at-top
  config = tiny_config(store)
  with config.unlocked():
    config.alice.mask_fraction = 0.5
    config.alice.partner = "self"
  source = ct_volumes.VolumePairs(str(store))
  method = alice.make(config, config_lib.Schedule(4, 1, 10))
  batch = batches(source, method, 1, 4)[0]
  assert np.all(batch["mask_cells"].sum((2, 3)) == 8)
  np.testing.assert_array_equal(batch["crops"][:, 0], batch["crops"][:, 1])
  np.testing.assert_array_equal(batch["points"][:, 0], batch["points"][:, 1])
  assert not batch["weak"].any()
  assert not alice_pairs.student_mask(np.random.default_rng(0), "columns", 0.0).any()
  for key, value, match in (("mask_fraction", 1.0, "mask_fraction"),
                            ("partner", "other", "alice.partner")):
    with config.unlocked():
      config.alice[key] = value
    with pytest.raises(ValueError, match=match):
      alice.make(config, config_lib.Schedule(4, 1, 10))
    with config.unlocked():
      config.alice.mask_fraction, config.alice.partner = 0.5, "self"


@pytest.mark.parametrize("mode", ["columns", "blocks3d"])
def test_device_masks_expand_like_numpy(mode):
  rng = np.random.default_rng(0)
  cells = np.stack([alice_pairs.student_mask(rng, mode) for _ in range(3)])
  got = np.asarray(alice.voxel_mask(jnp.asarray(cells), 16))[..., 0]
  want = np.stack([alice_pairs.expand_mask(c, 16) for c in cells])
  np.testing.assert_array_equal(got, want.astype(np.float32))


def test_one_step_freezes_last_layers_moves_teacher_and_centres(store):
  from anatjax import config as config_lib, train   # pylint: disable=g-import-not-at-top
  config = tiny_config(store)
  with config.unlocked():
    config.optim.warmup, config.optim.base_lr = "0st", 0.05   # visible first updates
  schedule = config_lib.Schedule(4, 1, 10)
  method = alice.make(config, schedule)
  source = ct_volumes.VolumePairs(str(store))
  batch = jax.tree.map(jnp.asarray, batches(source, method, 1, 4)[0])
  # Random values for the initial parameters (compiling the init costs more), at step 1
  # (the last layers' first update is held all the same: the hold counts updates).
  rng = np.random.default_rng(0)
  params, method_state = jax.tree.map(
      lambda leaf: (rng.normal(size=leaf.shape) * 0.05).astype(np.float32),
      jax.eval_shape(method.init, jax.random.key(0)))
  method_state = dict(method_state, centre=np.zeros_like(method_state["centre"]),
                      centre2=np.zeros_like(method_state["centre2"]))
  state = {"step": jnp.int32(1), "params": params,
           "opt_state": method.optimizer.init(params), "method_state": method_state}
  _, context, _ = jax.jit(method.prepare)(state["params"], state["method_state"], batch, 1)
  step = jax.jit(train.make_train_step(method, jax.random.key(1)))
  new, metrics = step(state, batch)
  params, new_params = state["params"], new["params"]
  for name in ("v_cls", "v_patch"):      # frozen in epoch 0: no step, no weight decay
    np.testing.assert_array_equal(new_params["head"][name], params["head"][name])
  assert not np.allclose(new_params["head"]["mlp_0"]["kernel"],
                         params["head"]["mlp_0"]["kernel"])
  assert not np.allclose(new_params["casa"]["query"]["kernel"],
                         params["casa"]["query"]["kernel"])
  m = float(method.schedules["teacher_momentum"](1))
  assert 0.996 <= m < 1.0
  kernel = lambda p: np.asarray(p["encoder"]["patch_embed"]["proj"]["kernel"])
  np.testing.assert_allclose(kernel(new["method_state"]["teacher"]),
                             m * kernel(method_state["teacher"]) + (1 - m) * kernel(new_params),
                             rtol=1e-5,
                             atol=1e-7)
  assert "v_patch" not in new["method_state"]["teacher"]["head"]
  teacher_cls = np.asarray(context["per_example"]["teacher_cls"])
  np.testing.assert_allclose(new["method_state"]["centre"],
                             0.1 * teacher_cls.mean((0, 1)), rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(new["method_state"]["centre2"])).sum() > 0
  for key in ("loss", "loss_cls", "loss_patch", "loss_rec", "agreement", "weak_pairs"):
    assert np.isfinite(float(metrics[key])), key
  np.testing.assert_allclose(
      float(metrics["loss"]),
      float(metrics["loss_cls"] + metrics["loss_patch"] + metrics["loss_rec"]), rtol=1e-5)


def test_alice_trains_and_its_teacher_loads_into_monai(store, tmp_path):
  from anatjax import export, train   # pylint: disable=g-import-not-at-top
  config = tiny_config(store)
  with config.unlocked():
    config.duration = "20st"
    config.log_every = 1
    config.checkpoint.every = "20st"
  result = train.train(config, str(tmp_path / "run"))
  assert result["step"] == 20
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  rec = np.array([r["loss_rec"] for r in records if "loss_rec" in r])
  assert np.all(np.isfinite(rec)) and rec[-5:].mean() < 0.8 * rec[:5].mean()

  out = str(tmp_path / "alice.safetensors")
  info = export.export_run(str(tmp_path / "run"), out)
  assert info["method"] == "alice" and info["input"]["axcodes"] == "SPL"
  teacher = result["state"]["method_state"]["teacher"]["encoder"]
  x = np.random.default_rng(0).uniform(0, 1, (1, 32, 32, 32, 1)).astype(np.float32)
  ours = alice.swin_from_config(config.model).apply({"params": teacher}, x)
  torch = pytest.importorskip("torch")
  monai_nets = pytest.importorskip("monai.networks.nets")
  tensors, _ = export.read_safetensors(out)
  net = monai_nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12,
                             depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4,
                             downsample="mergingv2", use_v2=False)
  net.swinViT.load_state_dict({k.removeprefix("swinViT."): torch.from_numpy(v.copy())
                               for k, v in tensors.items()}, strict=True)
  with torch.no_grad():
    theirs = net.swinViT(torch.from_numpy(x).permute(0, 4, 1, 2, 3), normalize=True)
  for h_ours, h_theirs in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(h_ours),
                               h_theirs.permute(0, 2, 3, 4, 1).numpy(), atol=1e-4)
