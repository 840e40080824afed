"""The CT organ-segmentation protocol (anatjax/evaluate/ct_organs.py): Dice and the
Gaussian sliding-window blend against direct NumPy computations, the crops, a MONAI-layout
safetensors export read back into the same encoder, the loss falling on a fixed batch,
and the whole command on the tiny config with a random encoder."""

import dataclasses
import json
import math
import os

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.signal import windows

from anatjax.evaluate import ct_organs
from anatjax.export import swin3d as swin_export
from anatjax.models.swin3d import SwinViT3D
from configs.eval.ct_organs import get_config

quiet = lambda *_: None


def tiny_functions(config):
  return ct_organs.compiled(ct_organs.load_encoder("random", config).geometry,
                            config.model.dtype, float(config.train.lr),
                            float(config.train.weight_decay))


def test_classes_and_mirror():
  lut = ct_organs.class_lut()
  names = ("background",) + ct_organs.ORGAN_NAMES
  from anatjax.data.synthetic_ct import LABEL_NAMES  # pylint: disable=g-import-not-at-top
  assert names[lut[LABEL_NAMES.index("lung_left")]] == "lungs"
  assert names[lut[LABEL_NAMES.index("liver")]] == "liver"
  assert lut[LABEL_NAMES.index("ribs")] == 0
  mirror = ct_organs.mirror_lut()
  right, left = (names.index(n) for n in ("kidney_right", "kidney_left"))
  assert mirror[right] == left and mirror[left] == right
  assert all(mirror[k] == k for k in range(len(names)) if k not in (right, left))


def test_dice_against_numpy():
  rng = np.random.default_rng(0)
  k = ct_organs.NUM_CLASSES
  truth = rng.integers(0, k - 2, (9, 7, 8))            # the last two organs never true
  noise = rng.integers(0, k - 1, truth.shape)          # the second last organ predicted
  prediction = np.where(rng.random(truth.shape) < 0.7, truth, noise)
  dice = ct_organs.organ_dice(prediction.astype(np.uint8), truth.astype(np.uint8))
  for organ in range(1, k):
    a, b = prediction == organ, truth == organ
    if a.sum() + b.sum() == 0:
      assert math.isnan(dice[organ - 1])
    else:
      assert dice[organ - 1] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
  assert dice[k - 3] == 0.0              # predicted, never true
  assert math.isnan(dice[k - 2])         # neither
  assert ct_organs.mean_dice(dice) == pytest.approx(np.mean(dice[:k - 2]))


@pytest.mark.parametrize("roi, overlap", [(4, 0.5), (5, 0.25), (4, 0.0)])
def test_window_starts_cover_the_axis(roi, overlap):
  for size in range(roi, 23):
    starts = ct_organs.window_starts(size, roi, overlap)
    covered = np.zeros(size, bool)
    for s in starts:
      covered[s:s + roi] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == size - roi
    assert np.all(np.diff(starts) <= max(1, int(roi * (1 - overlap))))


def test_sliding_window_blend_against_numpy():
  rng = np.random.default_rng(1)
  image = rng.random((11, 3, 9)).astype(np.float32)     # axis 1 shorter than the window
  roi, overlap, sigma_scale = 4, 0.5, 0.125

  def predict(x):    # [n, r, r, r, 1] -> a window-wide value and a voxelwise one
    mean = np.broadcast_to(x.mean((1, 2, 3, 4))[:, None, None, None], x.shape[:4])
    return np.stack([mean, 2.0 * x[..., 0]], -1)

  got = ct_organs.sliding_window(predict, image, roi, overlap, sigma_scale, batch_size=3)
  # Directly: every window start (stride 2, the last flush with the border), a Gaussian
  # from SciPy, the weighted mean per voxel.
  padded = np.pad(image, [(0, 0), (0, 1), (0, 0)])
  axis_starts = [sorted({min(s, n - roi) for s in range(0, n - roi + 2, 2)})
                 for n in padded.shape]
  g = windows.gaussian(roi, sigma_scale * roi)
  weight = np.einsum("i,j,k->ijk", g, g, g)
  total, norm = np.zeros(padded.shape), np.zeros(padded.shape)
  for z in axis_starts[0]:
    for y in axis_starts[1]:
      for x in axis_starts[2]:
        block = (slice(z, z + roi), slice(y, y + roi), slice(x, x + roi))
        total[block] += weight * padded[block].mean()
        norm[block] += weight
  want = (total / norm)[:, :3]
  np.testing.assert_allclose(got[..., 0], want, rtol=1e-5)
  np.testing.assert_allclose(got[..., 1], 2.0 * image, rtol=1e-5)   # weights sum to one


def test_crops_flips_and_organ_centres():
  labels = np.zeros((40, 30, 20), np.uint8)
  labels[30:34, 3:6, 15:18] = 3                          # kidney_right, small and off-centre
  labels[5:8, 20:24, 2:5] = 4                            # kidney_left
  image = np.random.default_rng(2).random(labels.shape).astype(np.float32)
  case = ct_organs.Case(0, image, labels)
  train = ml_collections.ConfigDict(get_config("tiny").train.to_dict()
                                    | {"crop_size": 16, "crops_per_volume": 4})

  def batch(flip_prob):
    train.flip_prob = flip_prob
    return ct_organs.sample_batch(np.random.default_rng(3), [case], train)

  x, y = batch(0.0)
  assert x.shape == (4, 16, 16, 16, 1) and y.shape == (4, 16, 16, 16) and y.dtype == np.int32
  assert all(y[i].any() for i in (0, 2))                 # organ-centred crops hold an organ
  fx, fy = batch(1.0)                                    # the same crops, flipped 3 times
  np.testing.assert_array_equal(fx, x[:, ::-1, ::-1, ::-1])
  np.testing.assert_array_equal(fy, ct_organs.mirror_lut()[y[:, ::-1, ::-1, ::-1]])
  small = ct_organs.take_crop(labels[:10], (0, 5, 5), 16)   # shorter than the crop: padded
  assert small.shape == (16, 16, 16) and not small[10:].any()


def random_swin_params(geometry):
  """Encoder parameters filled in NumPy (no compilation)."""
  shapes = jax.eval_shape(SwinViT3D(**dataclasses.asdict(geometry)).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 32, 1)))["params"]
  rng = np.random.default_rng(4)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_safetensors_round_trip(tmp_path):
  config = get_config("tiny")
  geometry = ct_organs.load_encoder("random", config).geometry
  params = random_swin_params(geometry)
  path = str(tmp_path / "swin.safetensors")
  swin_export.export_swin3d(params, path, window_size=geometry.window_size,
                            metadata={"method": "alice", "step": 7})
  encoder = ct_organs.load_encoder(path, config)
  assert encoder.geometry == geometry
  assert encoder.info["method"] == "alice" and encoder.info["step"] == 7
  jax.tree.map(np.testing.assert_array_equal, encoder.params, params)
  # ... and they are the encoder the fine-tuning starts from.
  start = ct_organs.initial_params(tiny_functions(config), encoder, config.train.crop_size,
                                   seed=0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(start["encoder"]), params)


def test_clear_errors(tmp_path):
  config = get_config("tiny")
  encoder = ct_organs.load_encoder("random", config)
  with config.unlocked():
    config.train.crop_size = 40
  with pytest.raises(ValueError, match="train.crop_size=40"):
    ct_organs.check_config(config, encoder)
  coarse = dataclasses.replace(encoder, geometry=dataclasses.replace(encoder.geometry,
                                                                     patch_size=4))
  with pytest.raises(ValueError, match="model.patch_size"):
    ct_organs.check_config(config, coarse)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    ct_organs.load_encoder(str(tmp_path), config)


def test_loss_falls_on_a_fixed_batch():
  config = get_config("tiny")
  functions = tiny_functions(config)
  encoder = ct_organs.load_encoder("random", config)
  size = config.train.crop_size
  params = ct_organs.initial_params(functions, encoder, size, seed=0)
  opt_state = functions.optimizer.init(params)
  rng = np.random.default_rng(5)
  labels = np.zeros((2, size, size, size), np.int32)
  labels[:, 2:9, 3:12, 1:8] = 1
  labels[:, 10:14, 2:6, 9:15] = 8
  x = (0.2 + 0.5 * (labels == 1) + 0.2 * (labels == 8)
       + 0.05 * rng.normal(size=labels.shape)).astype(np.float32)[..., None]
  losses = []
  for _ in range(8):
    params, opt_state, m = functions.step(params, opt_state, x, labels)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.9 * losses[0], losses


def test_protocol_end_to_end_on_the_tiny_config(tmp_path):
  config = get_config("tiny")
  out = str(tmp_path / "out")
  ct_organs.run(config, "random", out, log=quiet)

  results = json.load(open(os.path.join(out, "results.json")))
  assert results["complete"] and results["protocol"] == "ct_organs"
  records = results["records"]
  assert len(records) == 2 * (len(ct_organs.ORGANS) + 1)
  assert {(r["label_fraction"], r["num_train_volumes"]) for r in records} == {(0.5, 1),
                                                                              (1.0, 2)}
  for r in records:
    assert r["init"] == "random" and r["metric"] == "dice" and len(r["per_volume"]) == 1
    assert r["value"] is None or 0.0 <= r["value"] <= 1.0, r
    assert 1 <= r["best_step"] <= config.train.steps
  assert any(r["value"] is not None for r in records if r["class"] == "mean")
  for run in results["runs"]:
    assert run["history"]["step"] == [2, 4] and len(run["history"]["loss"]) == 2
  table = open(os.path.join(out, "results.md")).read()
  assert "| training volumes | liver | spleen |" in table and "| 2 (100 %) |" in table
  image = cv2.imread(os.path.join(out, results["figures"][0]))
  assert image is not None and image.shape[2] == 3

  # The cohort is cached: a second build renders nothing.
  cache = os.path.join(out, "cohort")
  before = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
  assert len(before) == 4
  again = ct_organs.build_cohort(config.data, cache, log=quiet)
  assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == before
  assert [c.index for c in again["test"]] == results["cohort"]["indices"]["test"]
