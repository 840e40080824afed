"""Downstream evaluation of a pretrained encoder, on the embedded synthetic radiographs or
a real labelled collection (data.source; anatjax/evaluate/real_data.py).

`evaluate(config, init, workdir)` runs one protocol (configs/eval/<protocol>.py) on the
encoder named by `init` ('random', a training run's directory, or a weights file) and
writes WORKDIR/results.json, results.md, splits/ and figures/. The command line is
`python -m anatjax.evaluate` (anatjax/evaluate/__main__.py).

Protocols (one module each):
  cxr_probe     multi-label finding classification from 1 / 10 / 100 % of the labels:
                linear probe on frozen features and full fine-tuning   (probes.py)
  localisation  finding maps (Grad-CAM, token evidence) of a classifier trained on
                image-level labels, against the true masks and boxes     (localisation.py)
  anatomy       anatomy in frozen patch tokens: token probe mIoU, k-means NMI and
                silhouette                                               (anatomy.py)
  segmentation  anatomy segmentation from 10 / 100 % of the masks: a light decoder on
                the fine-tuned or frozen encoder, Dice per structure (segmentation.py)
  ld_segmentation  LD's transfer protocol: an LD run's U-Net encoder under a new U-Net
                decoder, one structure at a time, frozen then fine-tuned (unet_transfer.py)
  ld_shape      a shape-guided LD run's prior channel against the reference structure,
                without labels (shape_prior.py)
The anatomy protocols need anatomy label maps, which only the synthetic data has; real
localisation is scored against boxes (NIH BBox_List_2017.csv, RSNA). Everything is a
function of the config's seeds: the same command gives the same numbers.
The SynthCXR benchmark (benchmark.py, configs/eval/synthcxr_benchmark.py) pretrains every
method and runs every protocol on each trained encoder and a random one.
"""

from __future__ import annotations

import os
import time
from typing import Callable, NamedTuple

from anatjax.evaluate import (anatomy, data, features, localisation, probes, report,
                              segmentation, shape_prior, unet_transfer)

def finding_classes(config, splits, encoder):
  del config, encoder
  return splits["test"].class_names


def anatomy_classes(config, splits, encoder):
  del config, splits, encoder
  return data.ANATOMY_NAMES


class Protocol(NamedTuple):
  run: Callable          # (config, encoder, splits, out_dir, log) -> records, notes, figures
  classes: Callable      # (config, splits, encoder) -> the class names it scores
  synthetic_only: bool   # scores the synthetic anatomy (real collections have none)
  load_encoder: Callable = features.load_encoder   # (init, config, step) -> encoder
  splits: tuple = data.SPLITS                      # the evaluation splits it reads


PROTOCOLS = {
    "cxr_probe": Protocol(probes.run_protocol, finding_classes, False),
    "localisation": Protocol(localisation.run_protocol, finding_classes, False),
    "anatomy": Protocol(anatomy.run_protocol, anatomy_classes, True),
    "segmentation": Protocol(segmentation.run_protocol, anatomy_classes, True),
    "ld_segmentation": Protocol(unet_transfer.run_protocol,
                                lambda config, splits, encoder: config.transfer.structures,
                                True, unet_transfer.load_encoder, ("train", "test")),
    "ld_shape": Protocol(shape_prior.run_protocol,
                         lambda config, splits, encoder: [encoder.info["shape"]["structure"]],
                         True, shape_prior.load_encoder, ("test",)),
}


class SetupError(ValueError):
  """A bad --init, protocol, image size or data source: reported in one line."""


def evaluate(config, init: str, workdir: str, step: int | None = None, log=print) -> dict:
  """Runs config.protocol on the `init` encoder; writes and returns the results."""
  if config.protocol not in PROTOCOLS:
    raise SetupError(f"config protocol={config.protocol!r}: use one of {sorted(PROTOCOLS)}")
  protocol = PROTOCOLS[config.protocol]
  if protocol.synthetic_only and config.data.source != "synthetic_cxr":
    raise SetupError(f"protocol {config.protocol} scores anatomy label maps, which only the "
                     f"synthetic data has; data.source={config.data.source} has none (real "
                     "collections: cxr_probe and localisation)")
  seconds = {}
  start = time.perf_counter()
  try:
    encoder = protocol.load_encoder(init, config, step)
    size = features.eval_image_size(encoder, config)
  except (ValueError, FileNotFoundError) as e:
    raise SetupError(str(e)) from e
  seconds["encoder"] = time.perf_counter() - start
  os.makedirs(workdir, exist_ok=True)
  log(f"{config.protocol}: {encoder.info['kind']} encoder ({encoder.info['variant']}, depth "
      f"{encoder.depth}) at {size} px")
  if size != encoder.image_size:
    log(f"  note: the encoder was trained at {encoder.image_size} px, evaluated at {size} px")
  tick = time.perf_counter()
  try:
    splits = data.load_splits(config.data, size, protocol.splits, workdir=workdir, log=log)
  except (ValueError, FileNotFoundError) as e:
    raise SetupError(str(e)) from e
  if config.protocol == "localisation" and not splits["test"].located.any():
    raise SetupError(f"localisation: no test image of {splits['test'].origin} has a box or "
                     "mask of a finding (NIH: put BBox_List_2017.csv in data.root)")
  seconds["data"] = time.perf_counter() - tick
  tick = time.perf_counter()
  out = protocol.run(config, encoder, splits, workdir, log=log)
  seconds["protocol"] = time.perf_counter() - tick
  seconds["total"] = time.perf_counter() - start
  init_name = "random" if init == "random" else os.path.abspath(init)
  records = [{"protocol": config.protocol, "init": init_name, **r} for r in out["records"]]
  for r in records:   # 'cls' inside the code; 'class' in the file
    r["class"] = r.pop("cls")
  results = {
      "protocol": config.protocol,
      "init": init_name,
      "encoder": encoder.info,
      "seeds": [int(s) for s in config.seeds],
      "classes": list(protocol.classes(config, splits, encoder)),
      "data": {"source": config.data.source, "image_size": size,
               "splits": {s.name: {"count": len(s), "from": s.origin}
                          for s in splits.values()}},
      "config": config.to_dict(),
      "records": records,
      "notes": [n for s in splits.values() for n in s.notes] + out["notes"],
      "seconds": seconds,
  }
  results["figures"] = report.write_figures(workdir, config.protocol, out["figures"],
                                            results)
  report.write_results(workdir, results)
  report.write_markdown(workdir, results)
  return results
