"""Segmentation transfer (issue 4, protocol 4): Dice against scikit-learn and by hand, the
decoder's shapes, and the protocol end to end at the tiny size, twice for determinism."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from anatjax import evaluate
from anatjax.evaluate import data, metrics, segmentation
from configs.eval import segmentation as segmentation_config

STRUCTURES = list(data.ANATOMY_NAMES)


# ------------------------------------------------------------------ Dice
def test_per_class_dice_is_sklearn_f1_on_flattened_labels():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 6, (3, 20, 20))
  pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 6, truth.shape))
  dice = metrics.per_class_dice(metrics.confusion_matrix(truth, pred, 8))
  expected = skm.f1_score(truth.ravel(), pred.ravel(), labels=range(8), average=None,
                          zero_division=np.nan)
  np.testing.assert_allclose(dice, expected, rtol=1e-12)
  assert np.isnan(dice[6:]).all()   # neither true nor predicted: undefined, not 0 or 1


def test_dice_by_hand_and_the_mean_skips_background_and_undefined_structures():
  truth = np.array([[0, 0, 1], [1, 2, 2]])
  pred = np.array([[0, 1, 1], [1, 2, 0]])
  # class 0: 1 shared pixel of 2 + 2; class 1: 2 of 2 + 3; class 2: 1 of 2 + 1.
  dice = metrics.per_class_dice(metrics.confusion_matrix(truth, pred, 4))
  np.testing.assert_allclose(dice[:3], [2 / 4, 4 / 5, 2 / 3])
  assert math.isnan(dice[3])
  result = segmentation.dice_result(metrics.confusion_matrix(truth, pred, len(STRUCTURES)))
  assert result["per_class"]["background"] == pytest.approx(0.5)
  assert result["mean"] == pytest.approx((4 / 5 + 2 / 3) / 2)   # structures 1 and 2 only
  assert result["excluded"] == STRUCTURES[3:]


def test_loss_is_near_zero_for_a_confident_correct_prediction():
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 4, (2, 8, 8)))
  right = 30.0 * jax.nn.one_hot(labels, 4)
  assert float(segmentation.segmentation_loss(right, labels, 1.0)) < 1e-6
  wrong = 30.0 * jax.nn.one_hot((labels + 1) % 4, 4)
  assert float(segmentation.segmentation_loss(wrong, labels, 1.0)) > 10


@pytest.mark.parametrize("patch,image_size", [(8, 32), (7, 28), (16, 64)])
def test_decoder_upsamples_the_token_grid_to_the_image(patch, image_size):
  grid = image_size // patch
  decoder = segmentation.ProgressiveUpsampling(12, image_size, channels=16)
  tokens = jnp.zeros((2, grid * grid, 24))
  params = jax.eval_shape(decoder.init, jax.random.key(0), tokens)
  logits = jax.eval_shape(decoder.apply, params, tokens)
  assert logits.shape == (2, image_size, image_size, 12)


# ------------------------------------------------------------------ end to end
def run(workdir) -> dict:
  config = segmentation_config.get_config("tiny")
  evaluate.evaluate(config, "random", str(workdir), log=lambda *_: None)
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("segmentation")
  return out, run(out)


def test_protocol_writes_dice_per_structure_for_each_mode_and_fraction(tiny_results):
  out, results = tiny_results
  assert results["protocol"] == "segmentation" and results["classes"] == STRUCTURES
  keys = {(r["method"], r["label_fraction"], r["seed"], r["metric"], r["class"])
          for r in results["records"]}
  assert keys == {(m, f, 0, "dice", c) for m in ("finetune", "frozen") for f in (0.1, 1.0)
                  for c in STRUCTURES + ["mean"]}
  for r in results["records"]:
    assert r["protocol"] == "segmentation" and r["init"] == "random"
    assert r["value"] is None or 0.0 <= r["value"] <= 1.0
    assert r["num_labelled"] == (9 if r["label_fraction"] == 0.1 else 96)
    assert 1 <= r["best_step"] <= r["steps"]
  assert results["figures"] == ["figures/segmentation_examples.png"]
  assert os.path.getsize(out / "figures" / "segmentation_examples.png") > 1000
  assert sorted(os.listdir(out / "splits")) == ["train_100pct_seed0.txt",
                                                "train_10pct_seed0.txt"]
  assert "| finetune |" in (out / "results.md").read_text()


def test_same_seeds_give_the_same_numbers(tiny_results, tmp_path):
  again = run(tmp_path)
  numbers = lambda res: [(r["method"], r["label_fraction"], r["class"], r["value"])
                         for r in res["records"]]
  assert numbers(again) == numbers(tiny_results[1])
