"""Downstream evaluation (issue 4): metrics against scikit-learn and hand-made cases,
k-means, probes that can fail, and the command end to end on tiny runs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from anatjax import evaluate, train
from anatjax.evaluate import anatomy, data, features, localisation, metrics, probes, report
from configs.eval import anatomy as anatomy_config
from configs.eval import cxr_probe as cxr_probe_config
from configs.eval import localisation as localisation_config
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"cxr_probe": cxr_probe_config, "localisation": localisation_config,
           "anatomy": anatomy_config}
RECORD_KEYS = {"protocol", "init", "seed", "label_fraction", "method", "metric", "class",
               "value"}
quiet = lambda *_: None


# ------------------------------------------------------------------ metrics
def test_auroc_matches_sklearn_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(5, 200))
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)
    scores = np.round(rng.normal(size=n) + 0.7 * y, 1 if trial % 2 else 4)  # many ties
    assert metrics.auroc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)
  assert metrics.auroc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
  assert metrics.auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0


def test_multilabel_auroc_reports_undefined_classes_as_nan_and_excludes_them():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, (50, 3))
  y[:, 1] = 0                       # no positive: undefined
  s = rng.normal(size=(50, 3))
  result = metrics.multilabel_auroc(y, s, ["a", "b", "c"])
  assert math.isnan(result["per_class"]["b"]) and result["excluded"] == ["b"]
  expected = np.mean([skm.roc_auc_score(y[:, i], s[:, i]) for i in (0, 2)])
  assert result["mean"] == pytest.approx(expected)


def test_iou_dice_match_sklearn_jaccard_and_f1():
  rng = np.random.default_rng(2)
  for _ in range(10):
    a, b = rng.random((2, 17, 23)) < rng.uniform(0.05, 0.6, (2, 1, 1))
    assert metrics.iou(a, b) == pytest.approx(skm.jaccard_score(b.ravel(), a.ravel()))
    assert metrics.dice(a, b) == pytest.approx(skm.f1_score(b.ravel(), a.ravel()))
  empty = np.zeros((4, 4), bool)
  assert metrics.iou(empty, empty) == 0.0 == metrics.dice(empty, empty)


def test_mean_iou_matches_sklearn_per_class_jaccard():
  rng = np.random.default_rng(3)
  t = rng.integers(0, 5, 500)
  p = np.where(rng.random(500) < 0.6, t, rng.integers(0, 5, 500))
  per_class = metrics.per_class_iou(metrics.confusion_matrix(t, p, 6))
  np.testing.assert_allclose(per_class[:5], skm.jaccard_score(t, p, average=None,
                                                               labels=range(5)))
  assert math.isnan(per_class[5])   # class 5 neither true nor predicted: left out
  assert metrics.mean_iou(t, p, 6) == pytest.approx(
      skm.jaccard_score(t, p, average="macro", labels=range(5)))


def test_nmi_matches_sklearn():
  rng = np.random.default_rng(4)
  for k1, k2 in ((2, 2), (5, 3), (12, 12), (3, 9)):
    a, b = rng.integers(0, k1, 300), rng.integers(0, k2, 300)
    b[:150] = a[:150] % k2          # partly dependent
    assert metrics.normalized_mutual_info(a, b) == pytest.approx(
        skm.normalized_mutual_info_score(a, b), abs=1e-10)
  assert metrics.normalized_mutual_info([1, 1, 1], [0, 0, 0]) == 1.0
  assert metrics.normalized_mutual_info([0, 1, 0, 1], [0, 0, 0, 0]) == 0.0


def test_silhouette_matches_sklearn_including_singletons():
  rng = np.random.default_rng(5)
  x = np.concatenate([rng.normal(c, 1.0, (40, 6)) for c in (0, 3, 6)])
  labels = np.repeat([0, 1, 2], 40)
  labels[7] = 3                     # a singleton cluster scores 0
  assert metrics.silhouette(x, labels, chunk=32) == pytest.approx(
      skm.silhouette_score(x, labels), abs=1e-10)
  with pytest.raises(ValueError):
    metrics.silhouette(x, np.zeros(len(x)))


def test_pointing_game_by_hand():
  mask = np.zeros((8, 8), bool)
  mask[2:4, 5:7] = True
  heat = np.zeros((8, 8))
  heat[3, 6] = 1.0
  assert metrics.pointing_game(heat, mask)
  heat = np.zeros((8, 8))
  heat[3, 2] = 1.0                  # 3 pixels left of the mask
  assert not metrics.pointing_game(heat, mask)
  assert not metrics.pointing_game(heat, mask, tolerance=2.9)
  assert metrics.pointing_game(heat, mask, tolerance=3.0)
  assert not metrics.pointing_game(np.ones((8, 8)), mask)   # no evidence: top-left, a miss
  corner = np.zeros((8, 8), bool)
  corner[0, 0] = True
  assert metrics.pointing_game(np.ones((8, 8)), corner)


def test_boxes_by_hand():
  mask = np.zeros((10, 10), bool)
  mask[2:5, 3:8] = True
  np.testing.assert_array_equal(metrics.mask_box(mask), [3, 2, 5, 3])
  assert metrics.box_iou((0, 0, 4, 4), (2, 2, 4, 4)) == pytest.approx(4 / 28)
  assert metrics.box_iou((0, 0, 2, 2), (5, 5, 2, 2)) == 0.0
  # Threshold sweep: a map equal to the mask is perfect at every threshold.
  scores = localisation.threshold_scores(mask.astype(np.float32), mask, (3, 2, 5, 3))
  np.testing.assert_allclose(scores["iou"], 1.0)
  np.testing.assert_allclose(scores["box_iou"], 1.0)


# ------------------------------------------------------------------ building blocks
def test_kmeans_recovers_separated_blobs_deterministically():
  rng = np.random.default_rng(6)
  centres = rng.normal(0, 20, (5, 8))
  truth = rng.integers(0, 5, 600)
  x = centres[truth] + rng.normal(0, 0.5, (600, 8))
  labels, found, inertia = anatomy.kmeans(x, 5, seed=0, n_init=2)
  assert metrics.normalized_mutual_info(truth, labels) == pytest.approx(1.0)
  assert inertia == pytest.approx(((x - found[labels]) ** 2).sum())
  again = anatomy.kmeans(x, 5, seed=0, n_init=2)
  np.testing.assert_array_equal(labels, again[0])


def test_token_labels_take_the_patch_majority():
  ana = np.zeros((1, 4, 4), np.uint8)
  ana[0, :2, :2] = [[3, 3], [3, 1]]     # majority 3
  ana[0, :2, 2:] = [[1, 2], [2, 1]]     # tie 1 / 2: the lower label
  ana[0, 2:, :] = 5
  np.testing.assert_array_equal(anatomy.token_labels(ana, 2, 12), [[3, 1, 5, 5]])


def test_linear_probe_finds_a_label_that_is_there_and_not_one_that_is_not():
  rng = np.random.default_rng(7)
  n, dim = 600, 32
  y = (rng.random((n, 3)) < 0.3).astype(np.uint8)
  noise = rng.normal(size=(n, dim))
  informative = noise + 1.5 * y @ rng.normal(size=(3, dim))
  cfg = cxr_probe_config.get_config("tiny").linear
  train_rows, val, test = np.arange(300), slice(300, 400), slice(400, n)
  names = ["a", "b", "c"]
  for x, check in ((informative, lambda v: v > 0.95), (noise, lambda v: abs(v - 0.5) < 0.15)):
    head = probes.fit_linear(x[:300], y[:300], train_rows, x[val], y[val],
                             stats=probes.norm_stats(x[:300]), cfg=cfg, seed=0)
    auc = metrics.multilabel_auroc(y[test], head.logits(x[test]), names)["mean"]
    assert check(auc), auc


def test_splits_are_disjoint_and_subsets_nested_and_seeded(tmp_path):
  ranges = data.split_ranges(50, 20, 30)
  assert not set(ranges["train"]) & set(ranges["val"]) and ranges["test"].start == 70
  small, big = data.label_subset(200, 0.01, 3), data.label_subset(200, 0.1, 3)
  assert len(small) == 2 and len(big) == 20 and set(small) <= set(big)
  np.testing.assert_array_equal(big, data.label_subset(200, 0.1, 3))
  assert not np.array_equal(big, data.label_subset(200, 0.1, 4))
  path = str(tmp_path / "split.txt")
  data.write_split_file(path, ["x/1", "x/2"], [[0, 1, 0], [1, 1, 0]])
  names, labels = data.read_split_file(path, 3)
  assert names == ["x/1", "x/2"] and labels.tolist() == [[0, 1, 0], [1, 1, 0]]


def tiny(protocol, arg="tiny"):
  return CONFIGS[protocol].get_config(arg)


def test_token_evidence_averages_to_the_classifier_logits():
  config = tiny("localisation")
  encoder = features.load_encoder("random", config)
  images = data.load_splits(config.data, 32, names=("val",))["val"].images[:8]
  rng = np.random.default_rng(8)
  head = {"w": rng.normal(size=(encoder.width, 5)).astype(np.float32),
          "b": rng.normal(size=5).astype(np.float32),
          "mu": rng.normal(size=encoder.width).astype(np.float32),
          "sd": rng.uniform(0.5, 2, encoder.width).astype(np.float32)}
  classifier = probes.PooledClassifier(encoder, encoder.params, head)
  maps = localisation.token_maps(classifier, images, 8)
  np.testing.assert_allclose(maps["evidence"].mean((2, 3)), maps["logits"], atol=1e-4)
  np.testing.assert_allclose(classifier.logits(images, 8), maps["logits"], atol=1e-4)
  assert maps["gradcam"].shape == (8, 5, 4, 4) and (maps["gradcam"] >= 0).all()


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("afire_run"))
  train.train(tiny_config(duration="4st"), workdir)
  return workdir


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  return tmp_path_factory.mktemp("eval")


def check_results(out_dir, protocol, init, figures):
  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)
  assert results["protocol"] == protocol and results["init"] == init
  assert results["records"]
  for record in results["records"]:
    assert RECORD_KEYS <= set(record), record
    assert record["protocol"] == protocol and record["init"] == init
    assert record["value"] is None or isinstance(record["value"], float)
  assert sorted(results["figures"]) == sorted(f"figures/{f}" for f in figures)
  for f in results["figures"]:
    assert os.path.getsize(os.path.join(out_dir, f)) > 1000
  assert os.path.exists(os.path.join(out_dir, "results.md"))
  return results


def values(results, **where):
  return {(r["method"], r["metric"], r["class"], r["label_fraction"], r["seed"]): r["value"]
          for r in results["records"] if all(r[k] == v for k, v in where.items())}


FIGURES = {"cxr_probe": ["auroc_vs_labels.png"],
           "localisation": ["anomaly_maps_linear.png"],
           "anatomy": ["token_embedding.png", "anatomy_examples.png"]}


def test_cxr_probe_on_a_trained_run(tiny_run, outputs):
  out = str(outputs / "probe_run")
  evaluate.evaluate(tiny("cxr_probe"), tiny_run, out, log=quiet)
  results = check_results(out, "cxr_probe", os.path.abspath(tiny_run), FIGURES["cxr_probe"])
  assert results["encoder"]["kind"] == "run" and results["encoder"]["step"] == 4
  means = values(results, metric="auroc", **{"class": "mean"})
  assert {(m, f) for m, _, _, f, _ in means} == {
      (m, f) for m in ("linear", "finetune") for f in (0.01, 0.1, 1.0)}
  # 1 % of 96 images is one image: no class has both labels, which the notes say.
  assert any("1% labels (1 image)" in n for n in results["notes"])
  assert sorted(os.listdir(os.path.join(out, "splits"))) == [
      "train_100pct_seed0.txt", "train_10pct_seed0.txt", "train_1pct_seed0.txt"]


@pytest.fixture(scope="module")
def random_probe(outputs):
  out = str(outputs / "probe_random")
  evaluate.evaluate(tiny("cxr_probe", "tiny,linear_only"), "random", out, log=quiet)
  return out, check_results(out, "cxr_probe", "random", FIGURES["cxr_probe"])


def test_command_line_is_deterministic_across_processes(random_probe, tmp_path):
  """The command in a fresh process gives the same numbers as the in-process run."""
  out = str(tmp_path / "cli")
  proc = subprocess.run(
      [sys.executable, "-m", "anatjax.evaluate",
       "--config=configs/eval/cxr_probe.py:tiny,linear_only", "--init=random",
       f"--workdir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| linear |" in proc.stdout and os.path.exists(os.path.join(out, "results.md"))
  cli = check_results(out, "cxr_probe", "random", FIGURES["cxr_probe"])
  assert values(cli) == values(random_probe[1])


def test_a_bad_init_is_one_clear_error(tmp_path):
  with pytest.raises(evaluate.SetupError, match="expected 'random', a run directory or a "
                     "weights file"):
    evaluate.evaluate(tiny("anatomy"), str(tmp_path / "nothing_here"), str(tmp_path / "o"))
  with pytest.raises(evaluate.SetupError, match="not a training run"):
    evaluate.evaluate(tiny("anatomy"), str(tmp_path), str(tmp_path / "o"))
  assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("protocol", ["localisation", "anatomy"])
def test_protocol_on_a_trained_run_and_random_init(protocol, tiny_run, outputs):
  results = {}
  for init in (tiny_run, "random"):
    out = str(outputs / f"{protocol}_{os.path.basename(init)}")
    evaluate.evaluate(tiny(protocol), init, out, log=quiet)
    name = "random" if init == "random" else os.path.abspath(init)
    results[init] = check_results(out, protocol, name, FIGURES[protocol])
  records = values(results["random"])
  if protocol == "localisation":
    methods = {m for m, *_ in records}
    assert methods == {"prior", "linear/classifier", "linear/gradcam", "linear/evidence"}
    iou = [r for r in results["random"]["records"] if r["metric"] == "iou" and r["class"] != "mean"]
    assert all(r["threshold"] in localisation.THRESHOLDS for r in iou)
  else:
    metric_names = {m for _, m, *_ in records}
    assert {"miou", "token_accuracy", "iou", "nmi", "silhouette_kmeans",
            "silhouette_anatomy"} == metric_names
    assert 0 <= records[("kmeans", "nmi", "all", None, 0)] <= 1


def test_weights_file_init_gives_the_same_numbers_as_the_same_weights(outputs, tmp_path):
  export = pytest.importorskip("anatjax.export")
  if not hasattr(export, "export_encoder"):
    pytest.skip("anatjax.export has no export_encoder yet")
  config = tiny("anatomy")
  encoder = features.load_encoder("random", config)
  path = str(tmp_path / "random_encoder.npz")
  export.export_encoder(encoder.params, path, image_size=32, format="npz")
  runs = {}
  for init, name in (("random", "out_random"), (path, "out_file")):
    runs[init] = report.jsonable(evaluate.evaluate(config, init, str(tmp_path / name),
                                                   log=quiet))   # NaN -> None, comparable
  assert runs[path]["encoder"]["kind"] == "file"
  assert values(runs[path]) == values(runs["random"])
