"""The MAE and DINO baselines: their pieces against NumPy, and both through the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatjax import export, train
from anatjax.data import views
from anatjax.evaluate import features
from anatjax.methods import mae
from anatjax.models import decoders
from anatjax.models.vit import ViT
from tiny import tiny_config


def test_random_masking_hides_a_fresh_subset_per_image():
  keep, hidden = mae.random_masking(jax.random.key(0), 64, 16, 4)
  keep, hidden = np.asarray(keep), np.asarray(hidden)
  assert keep.shape == (64, 4) and hidden.shape == (64, 16)
  assert (np.diff(keep, axis=1) > 0).all()                       # sorted, no repeats
  for k, h in zip(keep, hidden):
    np.testing.assert_array_equal(np.flatnonzero(~h), k)
  assert len({tuple(k) for k in keep}) > 50                       # not one shared mask
  # every patch is hidden about 3/4 of the time
  np.testing.assert_allclose(hidden.mean(axis=0), 0.75, atol=0.2)


def test_vit_with_every_patch_kept_is_the_plain_vit():
  vit = ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = jax.jit(vit.init)(jax.random.key(2), images)
  full = vit.apply(params, images)
  keep = jnp.broadcast_to(jnp.arange(16), (2, 16))
  np.testing.assert_allclose(vit.apply(params, images, keep=keep), full, atol=1e-5)
  part = vit.apply(params, images, keep=keep[:, [3, 9]])
  assert part.shape == (2, 3, 32)


def test_scatter_visible_puts_tokens_back_in_place():
  tokens = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1
  keep = jnp.array([[0, 5], [2, 3]])
  out = np.asarray(mae.scatter_visible(tokens, keep, 6))
  assert out.shape == (2, 7, 2)
  np.testing.assert_array_equal(out[:, 0], tokens[:, 0])
  np.testing.assert_array_equal(out[0, [1, 6]], tokens[0, 1:])
  np.testing.assert_array_equal(out[1, [3, 4]], tokens[1, 1:])
  assert not out[0, [2, 3, 4, 5]].any() and not out[1, [1, 2, 5, 6]].any()


def test_patch_targets_against_numpy():
  images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  patches = np.asarray(decoders.patchify(jnp.asarray(images), 4))
  assert patches.shape == (2, 6, 48)
  # patch (row 1, col 2) of image 1, ordered p_row, p_col, channel
  np.testing.assert_array_equal(patches[1, 1 * 3 + 2], images[1, 4:8, 8:12].reshape(-1))
  np.testing.assert_array_equal(decoders.unpatchify(jnp.asarray(patches), 2, 3, 4), images)
  want = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
      patches.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(mae.normalized_patch_targets(jnp.asarray(images), 4), want,
                             atol=1e-5)


def test_random_resized_crop_of_the_full_area_is_a_resize():
  image = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
  crop = views.random_resized_crop(image, np.random.default_rng(1), 20, (1.0, 1.0),
                                   ratio=(1.0, 1.0))
  import cv2  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(crop, cv2.resize(image, (20, 20),
                                                 interpolation=cv2.INTER_CUBIC))


def test_multicrop_views_are_uint8_and_deterministic_per_generator():
  image = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
  crops = views.MultiCrop(32, 16, 3)
  a = crops.random_map({"image": image}, np.random.default_rng(5))
  b = crops.random_map({"image": image}, np.random.default_rng(5))
  c = crops.random_map({"image": image}, np.random.default_rng(6))
  assert a["global"].shape == (2, 32, 32) and a["local"].shape == (3, 16, 16)
  assert a["global"].dtype == np.uint8 and a["local"].dtype == np.uint8
  np.testing.assert_array_equal(a["global"], b["global"])
  assert not np.array_equal(a["local"], c["local"])


def test_dino_loss_against_numpy():
  config = tiny_config("dino")
  _, schedule, method = train.build(config)
  params, state = jax.jit(method.init)(jax.random.key(0))
  # a student that differs from the teacher, and a centre that is not zero
  params = jax.tree.map(lambda p: p * 1.1, params)
  state = dict(state, center=jnp.linspace(-0.2, 0.2, config.model.out_dim))
  rng = np.random.default_rng(0)
  batch = {"global": rng.integers(0, 256, (4, 2, 32, 32), dtype=np.uint8),
           "local": rng.integers(0, 256, (4, 2, 16, 16), dtype=np.uint8)}
  step = 3
  new_state, context, _ = method.prepare(params, state, batch, step)
  loss, _ = method.loss(params, new_state, context, {**batch, **context["per_example"]},
                        None, step)

  def logits(p, views_):  # the modules' own outputs; the loss arithmetic is redone here
    return np.asarray(jax.vmap(lambda v: _cls_logits(config, p, v), in_axes=1,
                               out_axes=1)(jnp.asarray(views_)))
  teacher = logits(state["teacher"], batch["global"])
  student = np.concatenate([logits(params, batch["global"]), logits(params, batch["local"])],
                           axis=1)
  temp = float(method.schedules["teacher_temp"](step))
  t = teacher - np.asarray(state["center"])
  t = np.exp(t / temp - (t / temp).max(-1, keepdims=True))
  t /= t.sum(-1, keepdims=True)
  s = student / config.dino.student_temp
  log_s = s - s.max(-1, keepdims=True)
  log_s -= np.log(np.exp(log_s).sum(-1, keepdims=True))
  terms = [-(t[:, i] * log_s[:, v]).sum(-1).mean()
           for i in range(2) for v in range(4) if v != i]
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
  want_center = 0.9 * np.asarray(state["center"]) + 0.1 * teacher.mean(axis=(0, 1))
  np.testing.assert_allclose(new_state["center"], want_center, rtol=1e-5, atol=1e-6)


def _cls_logits(config, params, images_uint8):
  from anatjax.methods.common import normalize  # pylint: disable=g-import-not-at-top
  from anatjax.models.heads import PositionPrototypeHead  # pylint: disable=g-import-not-at-top
  vit = ViT(width=32, depth=1, mlp_dim=128, num_heads=2, patch_size=8)
  head = PositionPrototypeHead(1, config.model.out_dim, config.model.head_hidden_dim,
                               config.model.head_bottleneck_dim)
  tokens = vit.apply({"params": params["encoder"]}, normalize(images_uint8, 3))
  return head.apply({"params": params["head"]}, tokens[:, :1])[:, 0]


def test_dino_gradient_accumulation_equals_the_large_batch_step(tmp_path):
  # DINO's per-example teacher targets travel through context["per_example"] and must be
  # split with the batch.
  whole = train.train(tiny_config("dino", duration="2st"), str(tmp_path / "whole"))
  micro = train.train(tiny_config("dino", duration="2st", grad_accum_steps=4),
                      str(tmp_path / "micro"))
  for a, b in zip(jax.tree.leaves(whole["state"]["params"]),
                  jax.tree.leaves(micro["state"]["params"])):
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_baseline_trains_exports_and_evaluates(tmp_path, method):
  workdir = str(tmp_path / method)
  result = train.train(tiny_config(method), workdir)
  losses = [loss for _, loss in result["losses"]]
  assert np.isfinite(losses).all()
  if method == "mae":   # reconstruction improves within a few steps
    assert np.mean(losses[-3:]) < losses[0]
  encoder = features.run_encoder(workdir)              # which='auto'
  assert encoder.info["method"] == method
  info = export.export_run(workdir, str(tmp_path / "enc.safetensors"))
  assert info["method"] == method
  if method == "mae":
    with pytest.raises(ValueError, match="no EMA teacher"):
      features.run_encoder(workdir, which="teacher")
