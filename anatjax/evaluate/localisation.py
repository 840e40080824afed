"""Protocol 2: anomaly localisation learnt from image-level labels only.

A classifier (a linear probe on the frozen encoder, or the fine-tuned network) is trained
on image-level finding labels; its maps for each finding are then compared with the
ground-truth masks and boxes, which training never saw:
- Grad-CAM on the last block's tokens A (before the final norm): channel weights = the
  gradient of the class logit averaged over the patch tokens, map = ReLU(A . weights);
- token evidence: the classifier's own linear head applied to each final patch token
  (the classifier's logit is exactly the mean of this map, so it shows where the
  classifier's evidence comes from without gradients), minus its average at that
  position over (up to `baseline_images`) training images: uncentred, the map is
  dominated by what every image has at a position (the tokens carry their position),
  so its maximum sits at the same place in every image;
- a location prior (reference, not an encoder map): the mean training mask of the
  finding, i.e. what knowing only where a finding usually sits scores.
Token maps are upsampled bilinearly to pixels and min-max normalised per image.
Scores on the test images where the finding is located (a mask, or for real collections
a box, filled): pointing game (the map's maximum inside the mask, optionally within a
tolerance), and IoU / Dice / box IoU of the map thresholded at the level with the best
mean IoU on the validation images (one per map and finding). Where only test images
have boxes (NIH), half of their patients take the validation role (`scoring_parts`),
and the prior is their mean box.
"""

from __future__ import annotations

import functools
import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatjax.evaluate import (data as data_lib, features as features_lib, metrics, probes,
                              real_data)
from anatjax.methods.common import normalize

MAPS = ("gradcam", "evidence")
THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)


@functools.lru_cache(maxsize=4)   # per encoder object: one compile for val and test
def map_function(encoder):
  """jit (params, head, images) -> logits [B, C], gradcam and evidence [B, C, g, g]."""
  last = f"encoderblock_{encoder.depth - 1}"
  final_norm = nn.LayerNorm(epsilon=1e-6, dtype=encoder.vit.dtype)

  def maps(params, head, images):
    _, state = encoder.vit.apply(
        {"params": params}, normalize(images, encoder.channels),
        capture_intermediates=lambda module, method: module.name == last,
        mutable=["intermediates"])
    blocks = state["intermediates"]["Transformer"][last]["__call__"][0]   # [B, 1+L, D]

    def head_from_blocks(a):
      tokens = final_norm.apply({"params": params["Transformer"]["encoder_norm"]}, a)
      z = (tokens[:, 1:].astype(jnp.float32) - head["mu"]) / head["sd"]
      evidence = z @ head["w"] + head["b"]           # [B, L, C]
      return jnp.mean(evidence, axis=1), evidence    # logits of the pooled classifier

    (logits, evidence), vjp = jax.vjp(head_from_blocks, blocks)
    num_classes = logits.shape[-1]
    cotangents = jnp.broadcast_to(jnp.eye(num_classes)[:, None, :],
                                  (num_classes,) + logits.shape)
    (grads,) = jax.vmap(lambda g: vjp((g, jnp.zeros_like(evidence))))(cotangents)
    patches = blocks[:, 1:].astype(jnp.float32)                  # [B, L, D]
    weights = jnp.mean(grads[:, :, 1:].astype(jnp.float32), axis=2)   # [C, B, D]
    cam = jax.nn.relu(jnp.einsum("cbd,bld->bcl", weights, patches))
    side = int(round(patches.shape[1] ** 0.5))
    grid = lambda m: m.reshape(m.shape[0], m.shape[1], side, side)
    return logits, grid(cam), grid(jnp.swapaxes(evidence, 1, 2))
  return jax.jit(maps)


def token_maps(classifier: probes.PooledClassifier, images: np.ndarray,
               batch_size: int) -> dict[str, np.ndarray]:
  fn = map_function(classifier.encoder)
  out = {"logits": [], "gradcam": [], "evidence": []}
  for start, stop in features_lib.batches(len(images), batch_size):
    batch = features_lib.pad_to(images[start:stop], batch_size)
    for key, value in zip(out, fn(classifier.params, classifier.head, batch)):
      out[key].append(np.asarray(value)[:stop - start])
  return {k: np.concatenate(v) for k, v in out.items()}


def to_pixels(token_map: np.ndarray, size: int) -> np.ndarray:
  """[g, g] -> [size, size] bilinear (pixel-centre aligned), min-max scaled to [0, 1]."""
  m = cv2.resize(np.asarray(token_map, np.float32), (size, size),
                 interpolation=cv2.INTER_LINEAR)
  lo, hi = float(m.min()), float(m.max())
  return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def threshold_scores(heatmap, mask, box, thresholds=THRESHOLDS) -> dict[str, np.ndarray]:
  """IoU, Dice and box IoU of `heatmap >= t` for every t: each [T]."""
  gt = np.asarray(mask, bool)
  pred = heatmap[None] >= thresholds[:, None, None]             # [T, S, S]
  inter = (pred & gt[None]).sum((1, 2)).astype(np.float64)
  total = pred.sum((1, 2)) + gt.sum()
  union = total - inter
  iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
  dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 0.0)
  rows, cols = pred.any(2), pred.any(1)                           # [T, S]
  box_iou = np.zeros(len(thresholds))
  for t in range(len(thresholds)):
    ys, xs = np.flatnonzero(rows[t]), np.flatnonzero(cols[t])
    if len(ys):
      pred_box = (xs[0], ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)
      box_iou[t] = metrics.box_iou(pred_box, box)
  return {"iou": iou, "dice": dice, "box_iou": box_iou}


def score_split(split, pixel_map, tolerance: float) -> dict:
  """{finding c: {"pointing": [n], "iou"/"dice"/"box_iou": [n, T]}} over the images
  where finding c is located (has a mask or box); pixel_map(i, c) -> [S, S] in [0, 1]."""
  out = {}
  for c in range(split.findings.shape[1]):
    rows = np.flatnonzero(split.located[:, c])
    scores = {"pointing": [], "iou": [], "dice": [], "box_iou": []}
    for i in rows:
      heatmap, mask = pixel_map(i, c), split.finding_mask(i, c)
      scores["pointing"].append(metrics.pointing_game(heatmap, mask, tolerance))
      for key, value in threshold_scores(heatmap, mask, split.boxes[i, c]).items():
        scores[key].append(value)
    out[c] = {k: np.asarray(v, np.float64).reshape(
        (len(rows),) if k == "pointing" else (len(rows), len(THRESHOLDS)))
              for k, v in scores.items()}
  return out


def choose_thresholds(val_scores: dict, names) -> tuple[dict, list[str]]:
  """The threshold with the best mean validation IoU, per finding (the pooled choice for
  a finding without validation positives)."""
  pooled = np.concatenate([s["iou"] for s in val_scores.values() if len(s["iou"])] or
                          [np.zeros((1, len(THRESHOLDS)))])
  fallback = int(np.argmax(pooled.mean(0)))
  chosen, notes = {}, []
  for c, s in val_scores.items():
    if len(s["iou"]):
      chosen[c] = int(np.argmax(s["iou"].mean(0)))
    else:
      chosen[c] = fallback
      notes.append(f"{names[c]}: no validation image has it located; the "
                   "threshold pooled over findings is used")
  return chosen, notes


def summarise(test_scores: dict, thresholds: dict, names, **fields) -> list[dict]:
  """Records per finding and their mean over findings with located test positives."""
  records, per_metric = [], {"pointing_game": [], "iou": [], "dice": [], "box_iou": []}
  for c, s in test_scores.items():
    n = len(s["pointing"])
    t = thresholds[c]
    values = {"pointing_game": s["pointing"].mean() if n else np.nan,
              "iou": s["iou"][:, t].mean() if n else np.nan,
              "dice": s["dice"][:, t].mean() if n else np.nan,
              "box_iou": s["box_iou"][:, t].mean() if n else np.nan}
    for metric, value in values.items():
      extra = {} if metric == "pointing_game" else {"threshold": float(THRESHOLDS[t])}
      records.append(dict(fields, metric=metric, cls=names[c], value=float(value),
                          num_positives=n, **extra))
      if n:
        per_metric[metric].append(value)
  for metric, values in per_metric.items():
    records.append(dict(fields, metric=metric, cls="mean",
                        value=float(np.mean(values)) if values else np.nan))
  return records


def location_prior(split) -> np.ndarray:
  """[C, S, S]: the mean mask (or box) of each finding over the split's images where it
  is located, min-max scaled."""
  size = split.images.shape[-1]
  priors = []
  for c in range(split.findings.shape[1]):
    mean = np.zeros((size, size))
    rows = np.flatnonzero(split.located[:, c])
    for i in rows:
      mean += split.finding_mask(i, c)
    mean /= max(1, len(rows))
    lo, hi = float(mean.min()), float(mean.max())
    priors.append((mean - lo) / (hi - lo) if hi > lo else np.zeros_like(mean))
  return np.asarray(priors, np.float32)


def scoring_parts(val, test, seed: int) -> tuple[np.ndarray | None, np.ndarray, list[str]]:
  """(positions of test images that choose thresholds or None: val does, positions of
  the test images scored, notes). Collections with boxes only on test images (NIH) split
  those images in half by patient: one half chooses, the other is scored."""
  everything = np.arange(len(test))
  if val.located.any():
    return None, everything, []
  located = np.flatnonzero(test.located.any(1))
  parts = real_data.carve_by_patient([test.names[i] for i in located], {"val": 0.5}, seed)
  choose = located[parts["val"]]
  note = (f"no validation image has a box or mask: the thresholds and the location prior "
          f"come from {len(choose)} of the {len(located)} test images that do (half their "
          f"patients), and localisation is scored on the other {len(located) - len(choose)}")
  return choose, np.setdiff1d(everything, choose), [note]


def run_protocol(config, encoder, splits, out_dir: str, log=print) -> dict:
  del out_dir
  cfg = config.localisation
  train, val, test = splits["train"], splits["val"], splits["test"]
  size = train.images.shape[-1]
  names = list(test.class_names)
  bs = config.batch_size
  tolerance = cfg.pointing_tolerance
  choose_rows, score_rows, notes = scoring_parts(val, test, config.data.split_seed)
  choose = val if choose_rows is None else test.take(choose_rows, "val")
  scored = test.take(score_rows)
  records, examples = [], {}

  prior = location_prior(train if train.located.any() else choose)
  prior_thresholds, _ = choose_thresholds(
      score_split(choose, lambda i, c: prior[c], tolerance), names)
  records += summarise(score_split(scored, lambda i, c: prior[c], tolerance),
                       prior_thresholds, names, method="prior", seed=None,
                       label_fraction=float(cfg.label_fraction))

  feats = {s.name: features_lib.extract(encoder, s.images, bs)["mean"] for s in (train, val)}
  stats = probes.norm_stats(feats["train"])
  for seed in config.seeds:
    positions = data_lib.label_subset(len(train), cfg.label_fraction, int(seed))
    head = probes.fit_linear(feats["train"], train.findings, positions, feats["val"],
                             val.findings, stats=stats, cfg=config.linear, seed=int(seed))
    for kind in cfg.classifiers:
      if kind == "linear":
        classifier = probes.linear_classifier(encoder, head)
      elif kind == "finetune":
        init = head if probes.probe_init(config.finetune) else None
        classifier, _ = probes.finetune(encoder, train.images[positions],
                                        train.findings[positions], val.images,
                                        val.findings, cfg=config.finetune, seed=int(seed),
                                        eval_batch_size=bs, stats=stats, init_head=init)
      else:
        raise ValueError(f"config localisation.classifiers: unknown {kind!r}; use "
                         "'linear', 'finetune'")
      test_maps = token_maps(classifier, test.images, bs)
      baseline = token_maps(classifier, train.images[:cfg.baseline_images], bs)["evidence"]
      test_maps["evidence"] = test_maps["evidence"] - baseline.mean(0)
      maps = {"scored": {k: v[score_rows] for k, v in test_maps.items()}}
      if choose_rows is None:
        maps["choose"] = token_maps(classifier, val.images, bs)
        maps["choose"]["evidence"] = maps["choose"]["evidence"] - baseline.mean(0)
      else:
        maps["choose"] = {k: v[choose_rows] for k, v in test_maps.items()}
      common = dict(seed=int(seed), label_fraction=float(cfg.label_fraction))
      auc = metrics.multilabel_auroc(test.findings, test_maps["logits"], names)
      records += probes.auroc_records(auc, method=f"{kind}/classifier", **common)
      for name in MAPS:
        def pixel_map(part, name=name):
          return lambda i, c: to_pixels(maps[part][name][i, c], size)
        thresholds, more_notes = choose_thresholds(
            score_split(choose, pixel_map("choose"), tolerance), names)
        notes += [n for n in more_notes if n not in notes]
        method_records = summarise(score_split(scored, pixel_map("scored"), tolerance),
                                   thresholds, names, method=f"{kind}/{name}", **common)
        records += method_records
        means = {r["metric"]: r["value"] for r in method_records if r["cls"] == "mean"}
        log(f"  {kind}/{name:8s} seed {seed}: pointing {means['pointing_game']:.3f} "
            f"IoU {means['iou']:.3f} Dice {means['dice']:.3f} (classifier test AUROC "
            f"{auc['mean']:.3f})")
      if seed == config.seeds[0]:
        examples[kind] = example_panels(scored, maps["scored"], prior, size)
  return {"records": records, "notes": notes, "figures": {"examples": examples}}


def example_panels(test, maps: dict, prior: np.ndarray, size: int) -> list[dict]:
  """The first test image where each finding is located, its true mask (or box) and
  every map (pixels)."""
  panels = []
  for c, name in enumerate(test.class_names):
    rows = np.flatnonzero(test.located[:, c])
    if not len(rows):
      continue
    i = int(rows[0])
    panels.append({"finding": name, "item": os.path.basename(test.names[i]),
                   "image": test.images[i], "mask": test.finding_mask(i, c),
                   "maps": {**{m: to_pixels(maps[m][i, c], size) for m in MAPS},
                            "prior": prior[c]}})
  return panels
