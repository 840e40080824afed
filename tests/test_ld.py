"""LD on the shared trainer (issue 8): host views and their orientation convention, the
5B-image network input, loss assembly, BatchNorm running statistics through gradient
accumulation, and both stages end to end (stage 2 warm-started from stage 1 by name)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatjax import dihedral, losses, methods, train
from anatjax.config import Schedule
from anatjax.data.ld_views import ColourJitter, LDViews, rotate
from anatjax.methods import ld
from configs import ld_unet


def tiny_ld(stage=1, **overrides):
  c = ld_unet.get_config(f"runlocal,stage={stage}")
  c.unlock()
  c.update(batch_size=8, duration="6st", log_every=1, mesh=dict(data=1, fsdp=1))
  c.data.update(image_size=40, num_examples=32, num_workers=0)
  c.ld.crop_size = 32
  c.checkpoint.every = "3st"
  for key, value in overrides.items():
    c[key] = value
  c.lock()
  return c


def phantom(size=40, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, size)).astype(np.uint8)}


# ------------------------------------------------------------------ host views
def test_view2_is_view1_in_the_orientation_it_carries():
  """Without jitter, undoing the carried orientation on view 2 gives view 1 exactly:
  the convention the device relies on (dihedral.undo_batch on the patch grid)."""
  still = LDViews(32, 1, view_rotation=0.0, jitter=ColourJitter(0, 0, 0, 0))
  seen = set()
  for seed in range(24):
    out = still.random_map(phantom(seed=seed), np.random.default_rng(seed))
    assert out["view1"].shape == (32, 32, 1) and out["view1"].dtype == np.float32
    assert 0.0 <= out["view1"].min() and out["view1"].max() <= 1.0
    np.testing.assert_array_equal(
        dihedral.undo(out["view2"], int(out["mirror"]), int(out["turns"])), out["view1"])
    assert 0.2 <= out["lam"] <= 0.8
    seen.add((int(out["mirror"]), int(out["turns"])))
  assert len(seen) >= 6   # the whole group is drawn
  rot4 = LDViews(32, 1, view2_ops="rot4")
  assert all(rot4.random_map(phantom(), np.random.default_rng(s))["mirror"] == 0
             for s in range(12))
  views = LDViews(32, 1)
  a, b = (views.random_map(phantom(), np.random.default_rng(7)) for _ in range(2))
  assert all(np.array_equal(a[k], b[k]) for k in a)   # a function of the generator
  with pytest.raises(ValueError, match="view2_ops"):
    LDViews(32, 1, view2_ops="d8")


def test_rotation_and_colour_jitter_follow_their_definitions():
  image = np.zeros((9, 9), np.uint8)
  image[1, 4] = 200                      # above the centre
  turned = rotate(image, 90.0)           # counter-clockwise: to the left of the centre
  assert turned[4, 1] == 200 and turned.sum() == 200
  x = np.random.default_rng(0).uniform(0.2, 0.8, (6, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(ColourJitter(0, 0, 0, 0)(x, np.random.default_rng(0)), x,
                             atol=1e-6)
  grey = x[..., :1]
  rng = np.random.default_rng(3)
  out = ColourJitter(0.4, 0.4, 0.4, 0.02)(grey, rng)   # a radiograph: brightness, contrast
  assert out.shape == grey.shape and 0 <= out.min() and out.max() <= 1
  rgb_views = LDViews(16, 3)
  rgb = rgb_views.random_map({"image": np.random.default_rng(1).integers(
      0, 256, (20, 20, 3)).astype(np.uint8)}, np.random.default_rng(0))
  assert rgb["view1"].shape == (16, 16, 3)


# ------------------------------------------------------------------ device side
def test_network_input_orders_views_and_mixes_pairs():
  rng = np.random.default_rng(0)
  batch = {"view1": rng.random((4, 8, 8, 1), np.float32),
           "view2": rng.random((4, 8, 8, 1), np.float32),
           "lam": np.float32([0.3, 0.6, 0.9, 0.1])}
  images, lam = ld.network_input(batch, 1)
  v1, v2 = batch["view1"], batch["view2"]
  mix = np.stack([0.3 * v1[0] + 0.7 * v1[2], 0.6 * v1[1] + 0.4 * v1[3]])
  np.testing.assert_allclose(images, (np.concatenate([v1, v2, mix]) - 0.5) / 0.5, atol=1e-6)
  np.testing.assert_allclose(lam, [0.3, 0.6])


def test_losses_see_view2_patches_in_view1_frame():
  """Embeddings of view 2 that are exactly view 1's, turned by the carried orientation:
  after the undo, patch discrimination is that of identical grids."""
  cfg = tiny_ld(stage=2).ld
  rng = np.random.default_rng(1)
  v1 = losses._unit(jnp.asarray(rng.normal(size=(4, 32, 32, 8)), jnp.float32))
  mirror, turns = np.int8([1, 0, 1, 0]), np.int8([1, 2, 3, 0])
  v2 = jnp.stack([dihedral.apply(v1[i], int(mirror[i]), int(turns[i])) for i in range(4)])
  mix = losses._unit(jnp.asarray(rng.normal(size=(2, 32, 32, 8)), jnp.float32))
  embeddings = jnp.concatenate([v1, v2, mix])
  assignments = jax.nn.softmax(jnp.asarray(rng.normal(size=(10, 32, 32, 4))), -1)
  batch = {"mirror": mirror, "turns": turns}
  lam = jnp.float32([0.4, 0.7])
  terms = ld.ld_losses(embeddings, assignments, batch, lam, cfg)
  p1 = losses.pool_patch_embeddings(v1, cfg.grid)
  assert float(terms["pd"]) == pytest.approx(float(losses.patch_discrimination(p1, p1)),
                                             rel=1e-5)
  pm = losses.pool_patch_embeddings(mix, cfg.grid)
  assert float(terms["mix"]) == pytest.approx(
      float(losses.hypersphere_mixup(pm, p1[:2], p1[2:], lam)), rel=1e-5)
  assert float(terms["rd"]) == pytest.approx(float(losses.region_discrimination(
      embeddings[:8], assignments[:8], 0.2)), rel=1e-5)
  assert set(ld.ld_losses(embeddings, assignments, batch, lam, tiny_ld(1).ld)) == {"pd", "mix"}


def test_running_statistics_are_averaged_over_micro_batches():
  """With 2 micro-batches the new BatchNorm running averages are the mean of the two
  training-mode passes' (what one pass over the averaged statistics gives), as
  computed directly with the model."""
  config = tiny_ld(grad_accum_steps=2)
  method = methods.make(config, Schedule.from_config(config, 32))
  abstract = jax.eval_shape(train.state_initializer(method), jax.random.key(0))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.0, a.shape), a.dtype)
                       if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype),
                       abstract)
  batch = {"view1": rng.random((8, 32, 32, 1), np.float32),
           "view2": rng.random((8, 32, 32, 1), np.float32),
           "lam": rng.uniform(0.2, 0.8, 8).astype(np.float32),
           "mirror": rng.integers(0, 2, 8).astype(np.int8),
           "turns": rng.integers(0, 4, 8).astype(np.int8)}
  step = jax.jit(train.make_train_step(method, jax.random.key(1), accumulate=2))
  new_state, metrics = step(state, batch)
  assert "method_state" not in metrics and np.isfinite(float(metrics["loss"]))
  model = ld.LDUNet(num_clusters=config.ld.num_clusters)
  expected = []
  for i in range(2):   # micro-batch i = examples i, i + 2, ... (train.split_micro_batches)
    micro = jax.tree.map(lambda x: x[i::2], batch)
    _, updated = model.apply({"params": state["params"], **state["method_state"]},
                             ld.network_input(micro, 1)[0], train=True,
                             mutable=["batch_stats"])
    expected.append(updated["batch_stats"])
  want = jax.tree.map(lambda a, b: (a + b) / 2, *expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new_state["method_state"]["batch_stats"], want)


# ------------------------------------------------------------------ both stages
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ld_stage1"))
  return workdir, train.train(tiny_ld(stage=1), workdir)


def test_stage1_trains_and_its_loss_falls(stage1):
  _, summary = stage1
  loss = [v for _, v in summary["losses"]]
  assert len(loss) == 6 and all(np.isfinite(loss)) and np.mean(loss[-2:]) < np.mean(loss[:2])


def test_stage2_starts_from_stage1_by_name_and_uses_several_clusters(stage1, tmp_path,
                                                                      capsys):
  stage1_dir, first = stage1
  config = tiny_ld(stage=2)
  config.unlock()
  config.ld.init_from_run = stage1_dir
  config.duration = "1st"
  summary = train.train(config, str(tmp_path))
  assert "cluster_head, optimiser and schedule new" in capsys.readouterr().out
  # The copy itself, before any step: by name, the cluster head as initialised.
  method = methods.make(config, Schedule.from_config(config, 32))
  params, method_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                      jax.eval_shape(method.init, jax.random.key(0)))
  copied, copied_state, _ = method.warm_start(params, method_state)
  trained = first["state"]
  for name in ld.TRANSFERRED:
    jax.tree.map(np.testing.assert_array_equal, copied[name],
                 jax.device_get(trained["params"][name]))
    jax.tree.map(np.testing.assert_array_equal, copied_state["batch_stats"][name],
                 jax.device_get(trained["method_state"]["batch_stats"][name]))
  jax.tree.map(np.testing.assert_array_equal, copied["cluster_head"],
               jax.device_get(params["cluster_head"]))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert {"loss_pd", "loss_mix", "loss_rd", "loss_ent", "clusters_used"} <= set(logged[-1])
  assert logged[-1]["clusters_used"] > 1 and np.isfinite(summary["losses"][-1][1])


def test_bad_ld_settings_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="must be even"):
    methods.make(tiny_ld(batch_size=6, grad_accum_steps=2), Schedule.from_config(tiny_ld(), 32))
  with pytest.raises(ValueError, match="multiple of 16"):
    config = tiny_ld()
    config.unlock()
    config.ld.crop_size = 24
    methods.make(config, Schedule.from_config(config, 32))
  config = tiny_ld(stage=2)
  config.unlock()
  config.ld.init_from_run = str(tmp_path / "nothing")
  method = methods.make(config, Schedule.from_config(config, 32))
  with pytest.raises(FileNotFoundError, match="workdir of the stage-1 run"):
    method.warm_start({}, {"batch_stats": {}})


def test_export_writes_the_whole_unet_of_a_run(stage1, tmp_path):
  from anatjax import export  # pylint: disable=g-import-not-at-top
  stage1_dir, first = stage1
  out = str(tmp_path / "ld.safetensors")
  info = export.export_run(stage1_dir, out)
  assert info["format"] == "anatjax-ld-unet" and info["step"] == 6 and info["stage"] == 1
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = safetensors.numpy.load_file(out)
  kernel = jax.device_get(first["state"]["params"]["encoder"]["stage1_0"]["conv"]["kernel"])
  np.testing.assert_array_equal(tensors["encoder.stage1_0.conv.weight"],
                                kernel.transpose(3, 2, 0, 1))
  running = jax.device_get(first["state"]["method_state"]["batch_stats"]["decoder"]["up4_0"]
                           ["bn"]["var"])
  np.testing.assert_array_equal(tensors["decoder.up4_0.bn.running_var"], running)
  with pytest.raises(ValueError, match="whole U-Net"):
    export.export_run(stage1_dir, out, format="npz")


def test_landmarks_after_a_short_stage1_beat_the_untrained_network(stage1, tmp_path):
  """Six stage-1 steps at 32 px already give fields that find the phantom landmarks
  better than an untrained network: mean radial error (at 512 px scale) 95.6 measured,
  vs 120.5 for a random U-Net on the same queries and supports (not recomputed here)."""
  from anatjax.evaluate import landmarks  # pylint: disable=g-import-not-at-top
  results = landmarks.run(stage1[0], str(tmp_path), num_queries=16, num_supports=2,
                          log=lambda *_: None)
  assert results["size"] == 32
  assert results["synthetic"]["ld"]["mean_radial_error"] < 110.0


def test_transfer_dice_loss_and_structures():
  from anatjax.evaluate import unet_transfer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  p, g = rng.random((2, 5, 5)), (rng.random((2, 5, 5)) < 0.4).astype(np.float32)
  want = -2 * (p * g).sum() / (g.sum() + p.sum() + 1)
  assert float(unet_transfer.soft_dice_loss(p, g)) == pytest.approx(want, rel=1e-5)
  empty = np.zeros_like(g)   # no foreground: both inverted
  want = -2 * ((1 - p) * 1).sum() / (np.ones_like(g).sum() + (1 - p).sum() + 1)
  assert float(unet_transfer.soft_dice_loss(p, empty)) == pytest.approx(want, rel=1e-5)
  from anatjax.data.synthetic_cxr import ANATOMY_NAMES  # pylint: disable=g-import-not-at-top
  label = ANATOMY_NAMES.index
  anatomy = np.zeros((12, 12), np.uint8)
  anatomy[2:10, 1:5] = label("right_lung")
  anatomy[5, 0:6] = label("ribs")            # a rib across the lung and beyond it
  anatomy[2:10, 7:11] = label("left_lung")
  anatomy[4:7, 7:9] = label("heart")         # the heart over the left lung's corner
  lungs = unet_transfer.structure_mask(anatomy, "lungs")
  want = np.zeros((12, 12), np.uint8)
  want[2:10, 1:5] = 1                        # the rib behind the lung is lung field
  want[2:10, 7:11] = 1
  want[4:7, 7:9] = 0                         # the heart is not
  np.testing.assert_array_equal(lungs, want)
  np.testing.assert_array_equal(unet_transfer.structure_mask(anatomy[None], "heart")[0],
                                anatomy == label("heart"))
  np.testing.assert_array_equal(unet_transfer.image_dice(
      np.float32([[[0.9, 0.2]], [[0.1, 0.1]]]), np.uint8([[[1, 1]], [[0, 0]]])), [2 / 3, 1.0])


def test_segmentation_transfer_of_an_ld_run(stage1, tmp_path):
  """The protocol end to end on the stage-1 run's encoder: records per structure and
  fraction, the figure with the run's clustering."""
  from anatjax import evaluate  # pylint: disable=g-import-not-at-top
  from configs.eval import ld_segmentation  # pylint: disable=g-import-not-at-top
  results = evaluate.evaluate(ld_segmentation.get_config("tiny"), stage1[0], str(tmp_path),
                              log=lambda *_: None)
  assert results["classes"] == ["heart", "lungs"] and results["encoder"]["method"] == "ld"
  dice = {(r["class"], r["label_fraction"]): r["value"] for r in results["records"]}
  assert set(dice) == {(c, 1.0) for c in ("heart", "lungs", "mean")}
  assert all(0.0 <= v <= 1.0 for v in dice.values())
  assert results["figures"] == ["figures/transfer_examples.png"]
  assert "| transfer |" in open(tmp_path / "results.md").read()
