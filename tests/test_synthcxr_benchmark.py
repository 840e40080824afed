"""The SynthCXR benchmark end to end at its tiny size (numbers meaningless, paths real),
with one pretraining method and two protocols: the orchestration is the same for all of
them (each method's and protocol's own code has its own tests), and the suite's time
is better spent elsewhere."""

import json
import os

from anatjax.evaluate import benchmark
from configs.eval import synthcxr_benchmark

ENCODERS = ["random", "afire"]
PROTOCOLS = ["cxr_probe", "segmentation"]


def tiny_config():
  config = synthcxr_benchmark.get_config("tiny")
  with config.unlocked():
    config.methods = tuple(m for m in config.methods if m[0] in ENCODERS)
    config.protocols = tuple(p for p in config.protocols
                             if p.split("/")[1].split(":")[0] in PROTOCOLS)
  return config


def test_benchmark_pretrains_evaluates_and_compares(tmp_path):
  out = str(tmp_path)
  logged = []
  summary = benchmark.run(tiny_config(), out, log=logged.append)
  for name in ENCODERS[1:]:
    assert os.path.isdir(os.path.join(out, "pretrain", name, "checkpoints"))
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert {(r["encoder"], r["protocol"]) for r in saved["records"]} == {
      (e, p) for e in ENCODERS for p in PROTOCOLS}
  # every trained encoder is its own run's, not the random one
  assert {r["init"] for r in saved["records"] if r["encoder"] != "random"} == {
      os.path.abspath(os.path.join(out, "pretrain", n)) for n in ENCODERS[1:]}
  table = open(os.path.join(out, "results.md")).read()
  for name in ENCODERS:
    assert f"| {name} |" in table
  assert "linear AUROC 100%" in table and "seg. Dice 100%" in table
  assert sorted(summary["figures"]) == sorted([
      "figures/auroc_vs_labels_linear.png", "figures/auroc_vs_labels_finetune.png",
      "figures/segmentation_segmentation_examples.png"])
  for figure in summary["figures"]:
    assert os.path.getsize(os.path.join(out, figure)) > 1000

  # Run again: the runs are complete and every evaluation is reused, same records.
  logged.clear()
  again = benchmark.run(tiny_config(), out, log=logged.append)
  assert sum("reusing" in line for line in logged) == len(ENCODERS) * len(PROTOCOLS)
  assert again["records"] == summary["records"]
