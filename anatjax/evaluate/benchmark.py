"""The SynthCXR benchmark: pretrain every method on the synthetic normal radiographs with
one small encoder, evaluate every protocol on each of them and on a random encoder, and
write one table and side-by-side figures (configs/eval/synthcxr_benchmark.py).

OUT/pretrain/<method>/     the training runs (train.train: resumable, so a rerun of an
                           interrupted benchmark continues where it stopped)
OUT/<protocol>/<encoder>/  each evaluation's own results.json, results.md and figures
                           (reused when its config and encoder are unchanged)
OUT/results.json, OUT/results.md, OUT/figures/   the comparison
"""

from __future__ import annotations

import importlib
import json
import os
import time

import cv2
import ml_collections
import numpy as np

from anatjax import train
from anatjax.evaluate import report

# The table's columns: (protocol, header, records to summarise).
HEADLINES = (
    [("cxr_probe", f"linear AUROC {100 * f:g}%",
      dict(method="linear", metric="auroc", cls="mean", label_fraction=f))
     for f in (0.01, 0.1, 1.0)]
    + [("cxr_probe", f"fine-tune AUROC {100 * f:g}%",
        dict(method="finetune", metric="auroc", cls="mean", label_fraction=f))
       for f in (0.01, 0.1, 1.0)]
    + [("localisation", "evidence pointing", dict(method="linear/evidence",
                                                  metric="pointing_game", cls="mean")),
       ("localisation", "evidence Dice", dict(method="linear/evidence", metric="dice",
                                              cls="mean")),
       ("localisation", "Grad-CAM pointing", dict(method="linear/gradcam",
                                                  metric="pointing_game", cls="mean")),
       ("anatomy", "token probe mIoU", dict(method="token_probe", metric="miou")),
       ("anatomy", "k-means NMI", dict(method="kmeans", metric="nmi")),
       ("anatomy", "silhouette (anatomy)", dict(method="kmeans",
                                                metric="silhouette_anatomy"))]
    + [("segmentation", f"seg. Dice {100 * f:g}%",
        dict(method="finetune", metric="dice", cls="mean", label_fraction=f))
       for f in (0.1, 1.0)]
)


def load_config(ref: str) -> ml_collections.ConfigDict:
  """'afire_vitb:runlocal' or 'eval/anatomy:tiny' -> configs/<name>.py's get_config(arg),
  unlocked (run from the repository's root, like every config)."""
  name, _, arg = ref.partition(":")
  module = importlib.import_module("configs." + name.replace("/", "."))
  config = module.get_config(arg or None)
  config.unlock()
  return config


def pretraining_config(config, recipe: str) -> ml_collections.ConfigDict:
  """A method's recipe at the benchmark's encoder, image size, batch and length."""
  c = load_config(recipe)
  c.model.variant, c.model.depth = config.model.variant, config.model.depth
  c.data.image_size = config.model.image_size
  c.data.num_examples = config.pretrain.num_examples
  c.data.num_workers = config.pretrain.num_workers
  c.batch_size = config.pretrain.batch_size
  c.duration = config.pretrain.duration
  c.checkpoint.every = config.pretrain.duration
  _update(c, config.pretrain.overrides.get(c.method, {}))
  c.lock()
  return c


def _update(target, overrides):
  """Sets the (nested) fields of `overrides` in `target`, refusing unknown ones."""
  for key, value in overrides.items():
    if key not in target:
      raise ValueError(f"benchmark pretrain.overrides: {key!r} is not a field of the "
                       f"recipe (fields: {sorted(target)})")
    if isinstance(target[key], ml_collections.ConfigDict):
      _update(target[key], value)
    else:
      target[key] = value


def evaluation_config(config, ref: str) -> ml_collections.ConfigDict:
  """A protocol's config with the benchmark's encoder (for the random init) and seeds."""
  c = load_config(ref)
  c.model.variant, c.model.depth = config.model.variant, config.model.depth
  c.model.image_size = config.model.image_size
  c.seeds = tuple(config.seeds)
  c.lock()
  return c


def run(config, workdir: str, log=print) -> dict:
  from anatjax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  seconds = {}
  encoders = {"random": "random"}
  for name, recipe in config.methods:
    tick = time.perf_counter()
    run_dir = os.path.join(workdir, "pretrain", name)
    log(f"== pretraining {name} ({recipe}) in {run_dir}")
    train.train(pretraining_config(config, recipe), run_dir)
    encoders[name] = run_dir
    seconds[f"pretrain/{name}"] = time.perf_counter() - tick

  records, per_run = [], {}
  for ref in config.protocols:
    protocol_config = evaluation_config(config, ref)
    protocol = protocol_config.protocol
    for name, init in encoders.items():
      tick = time.perf_counter()
      out = os.path.join(workdir, protocol, name)
      results = _read_results(out)
      if _same_evaluation(results, protocol_config, init):
        log(f"== {protocol}: {name} (reusing {out}/results.json)")
      else:
        log(f"== {protocol}: {name}")
        evaluate_lib.evaluate(protocol_config, init, out, log=log)
        results = _read_results(out)   # as saved (NaN as null), like reused results
      per_run[(protocol, name)] = results
      records += [dict(r, encoder=name) for r in results["records"]]
      seconds[f"{protocol}/{name}"] = time.perf_counter() - tick
  seconds["total"] = time.perf_counter() - start

  names = list(encoders)
  summary = {"benchmark": "synthcxr", "encoders": {n: os.path.abspath(p) if p != "random"
                                                   else p for n, p in encoders.items()},
             "config": config.to_dict(), "records": records, "seconds": seconds}
  summary["figures"] = write_figures(workdir, names, per_run, records)
  report.write_results(workdir, summary)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(summary, names, per_run))
  return summary


def _read_results(out: str) -> dict | None:
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _same_evaluation(results: dict | None, protocol_config, init: str) -> bool:
  """Whether saved `results` came from this config and encoder."""
  if results is None:
    return False
  same_init = results["init"] == (init if init == "random" else os.path.abspath(init))
  same_config = results["config"] == json.loads(json.dumps(
      report.jsonable(protocol_config.to_dict())))
  return same_init and same_config


def headline_table(records, names) -> str:
  protocols = {r["protocol"] for r in records}
  columns = [(header, protocol, where) for protocol, header, where in HEADLINES
             if protocol in protocols]
  return report.table(["encoder"] + [c[0] for c in columns],
                      [[name] + [report.summary(records, encoder=name, protocol=protocol,
                                                **where) for _, protocol, where in columns]
                       for name in names])


def markdown(summary, names, per_run) -> str:
  cfg = summary["config"]
  depth = cfg["model"]["depth"] or "of the variant"
  lines = ["# SynthCXR benchmark", "",
           f"Encoder ViT {cfg['model']['variant']} (depth {depth}) at "
           f"{cfg['model']['image_size']} px; each method pretrained for "
           f"{cfg['pretrain']['duration']} at batch {cfg['pretrain']['batch_size']} on "
           f"{cfg['pretrain']['num_examples']} synthetic normal radiographs; seeds "
           f"{list(cfg['seeds'])}; {summary['seconds']['total'] / 60:.1f} min in total.", "",
           headline_table(summary["records"], names), "",
           "Per protocol and encoder (full tables, notes and figures):", ""]
  for (protocol, name) in per_run:
    lines.append(f"- [{protocol} / {name}]({protocol}/{name}/results.md)")
  if summary["figures"]:
    lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in summary["figures"])]
  return "\n".join(lines) + "\n"


def write_figures(workdir: str, names, per_run, records) -> list[str]:
  """Probe AUROC vs label fraction for every encoder in one plot per probe; each
  encoder's token embedding and anomaly maps side by side."""
  fig_dir = os.path.join(workdir, "figures")
  written = []
  for mode in ("linear", "finetune"):
    runs = [{"method": r["encoder"], "seed": r["seed"], "label_fraction": r["label_fraction"],
             "mean_auroc": r["value"]}
            for r in report.select(records, protocol="cxr_probe", method=mode,
                                   metric="auroc", cls="mean")]
    if runs:
      written.append(report.auroc_curves(
          runs, os.path.join(fig_dir, f"auroc_vs_labels_{mode}.png"),
          f"Findings, {'linear probe' if mode == 'linear' else 'fine-tuning'}: "
          "test mean AUROC"))
  for protocol, figure, columns in (("anatomy", "token_embedding.png", 2),
                                    ("localisation", "anomaly_maps_linear.png", 1),
                                    ("segmentation", "segmentation_examples.png", 2)):
    paths = [os.path.join(workdir, protocol, n, "figures", figure) for n in names
             if (protocol, n) in per_run]
    paths = [p for p in paths if os.path.exists(p)]
    if paths:
      written.append(tile(paths, columns, os.path.join(fig_dir, f"{protocol}_{figure}")))
  return [os.path.relpath(p, workdir) for p in written]


def tile(paths, columns: int, out: str) -> str:
  """PNG figures (each titled by its encoder) in a grid, row by row."""
  images = [cv2.imread(p) for p in paths]
  height = max(i.shape[0] for i in images)
  width = max(i.shape[1] for i in images)
  rows = -(-len(images) // columns)
  grid = np.full((rows * height, columns * width, 3), 255, np.uint8)
  for k, image in enumerate(images):
    y, x = (k // columns) * height, (k % columns) * width
    grid[y:y + image.shape[0], x:x + image.shape[1]] = image
  return report.save(out, grid)
