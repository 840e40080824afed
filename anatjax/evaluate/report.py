"""What an evaluation leaves in OUT: results.json, results.md and figures/*.png.

results.json holds every metric as one record {protocol, init, seed, label_fraction,
method, metric, cls, value, ...}; undefined values (e.g. the AUROC of a class with one
label value) are null, never a made-up number. results.md has the summary tables.
Figures are drawn with OpenCV (already a runtime dependency), so evaluating needs no
plotting library.
"""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np

# ------------------------------------------------------------------ results.json
def jsonable(obj):
  """NumPy scalars/arrays -> Python; NaN and inf -> None (strict JSON)."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, (np.bool_, bool)):
    return bool(obj)
  if isinstance(obj, (np.integer, int)):
    return int(obj)
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def write_results(out_dir: str, results: dict) -> str:
  path = os.path.join(out_dir, "results.json")
  with open(path, "w") as f:
    json.dump(jsonable(results), f, indent=1, allow_nan=False)
  return path


# ------------------------------------------------------------------ Markdown
def select(records, **where) -> list[dict]:
  """The records matching every key=value (`cls` stands for the records' 'class')."""
  where = {("class" if k == "cls" else k): v for k, v in where.items()}
  return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def summary(records, **where) -> str:
  """'0.812' for one seed, '0.812 ± 0.010' (std over seeds) for several, '-' for none."""
  values = [r["value"] for r in select(records, **where)]
  values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def unique(records, key) -> list:
  seen = []
  for r in records:
    if r.get(key) not in seen:
      seen.append(r.get(key))
  return seen


def fraction_tables(records, classes, metric: str, mean_title: str, per_class_title: str,
                    labels: str = "labels") -> list[str]:
  """A method x label fraction table of the metric's mean, then one row per method and
  fraction with the metric of every class."""
  fractions = sorted(unique(records, "label_fraction"))
  methods = unique(records, "method")
  return [mean_title, "",
          table(["method"] + [f"{100 * f:g}% {labels}" for f in fractions],
                [[m] + [summary(records, method=m, label_fraction=f, metric=metric,
                                cls="mean") for f in fractions] for m in methods]),
          "", per_class_title, "",
          table(["method", labels] + list(classes),
                [[m, f"{100 * f:g}%"] + [summary(records, method=m, label_fraction=f,
                                                 metric=metric, cls=c) for c in classes]
                 for m in methods for f in fractions])]


def markdown_probe(records, classes) -> list[str]:
  return fraction_tables(records, classes, "auroc",
                         "Test mean AUROC over findings (± std over seeds):",
                         "Per-finding test AUROC:")


def markdown_segmentation(records, structures) -> list[str]:
  return fraction_tables(records, structures, "dice",
                         "Test mean Dice over the structures, background excluded (± std "
                         "over seeds):", "Test Dice per structure (pixels pooled over the "
                         "test split):", labels="masks")


def markdown_transfer(records, structures) -> list[str]:
  return fraction_tables(records, structures, "dice",
                         "Test Dice (per image, averaged over the test images; mean over "
                         "the structures; ± std over seeds):", "Test Dice per structure:",
                         labels="masks")


def markdown_shape(records) -> list[str]:
  return ["Test Dice of the prior channel against the reference structure (mean ± std "
          "over the test images):", "",
          table(["prediction", "structure", "Dice"],
                [[r["method"], r["class"], f"{r['value']:.3f} ± {r['std_over_images']:.3f}"]
                 for r in records])]


def markdown_localisation(records, classes) -> list[str]:
  maps = [m for m in unique(records, "method") if not m.endswith("/classifier")]
  metric_names = ("pointing_game", "iou", "dice", "box_iou")
  out = ["Test localisation, mean over findings (prior = mean training mask, a "
         "reference):", "",
         table(["map"] + list(metric_names),
               [[m] + [summary(records, method=m, metric=k, cls="mean") for k in metric_names]
                for m in maps]), "",
         "Classifier test mean AUROC: " + ", ".join(
             f"{m.split('/')[0]} {summary(records, method=m, metric='auroc', cls='mean')}"
             for m in unique(records, "method") if m.endswith("/classifier")), "",
         "Per finding, pointing game / IoU:", "",
         table(["map"] + list(classes),
               [[m] + [f"{summary(records, method=m, metric='pointing_game', cls=c)} / "
                       f"{summary(records, method=m, metric='iou', cls=c)}" for c in classes]
                for m in maps])]
  return out


def markdown_anatomy(records, structures) -> list[str]:
  rows = [("token probe mIoU", dict(method="token_probe", metric="miou")),
          ("token probe accuracy", dict(method="token_probe", metric="token_accuracy")),
          ("k-means NMI", dict(method="kmeans", metric="nmi")),
          ("silhouette, k-means clusters", dict(method="kmeans", metric="silhouette_kmeans")),
          ("silhouette, anatomy labels", dict(method="kmeans", metric="silhouette_anatomy"))]
  return ["Anatomy in frozen patch tokens (test tokens):", "",
          table(["metric", "value"], [[name, summary(records, **w)] for name, w in rows]),
          "", "Token-probe IoU per structure:", "",
          table(list(structures), [[summary(records, method="token_probe", metric="iou",
                                            cls=s) for s in structures]])]


def markdown(results: dict) -> str:
  enc = results["encoder"]
  described = ", ".join(f"{k} {enc[k]}" for k in ("kind", "method", "variant", "depth",
                                                  "image_size", "step") if k in enc)
  data = results["data"]
  counts = " / ".join(f"{s['count']} {name}" for name, s in data["splits"].items())
  lines = [f"# {results['protocol']}: {results['init']}", "",
           f"Encoder: {described}. Evaluated at {data['image_size']} px on {counts} "
           f"{data['source']} images; seeds {results['seeds']}; "
           f"{results['seconds']['total']:.0f} s.", ""]
  body = {"cxr_probe": lambda r: markdown_probe(r, results["classes"]),
          "localisation": lambda r: markdown_localisation(r, results["classes"]),
          "anatomy": lambda r: markdown_anatomy(r, results["classes"]),
          "segmentation": lambda r: markdown_segmentation(r, results["classes"]),
          "ld_segmentation": lambda r: markdown_transfer(r, results["classes"]),
          "ld_shape": markdown_shape}
  lines += body[results["protocol"]](results["records"])
  if results["notes"]:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
  if results["figures"]:
    lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in results["figures"])]
  return "\n".join(lines) + "\n"


def write_markdown(out_dir: str, results: dict) -> str:
  path = os.path.join(out_dir, "results.md")
  with open(path, "w") as f:
    f.write(markdown(results))
  return path


# ------------------------------------------------------------------ drawing primitives
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, WHITE = (0, 0, 0), (170, 170, 170), (255, 255, 255)
# 12 distinct colours (BGR) for lines, anatomy structures and clusters.
PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188),
           (207, 190, 23), (120, 187, 255), (138, 223, 152)]


def colour(i: int):
  return PALETTE[i % len(PALETTE)]


def text(img, s, org, scale=0.4, colour_=BLACK, thickness=1):
  cv2.putText(img, s, (int(org[0]), int(org[1])), FONT, scale, colour_, thickness,
              cv2.LINE_AA)


def canvas(width: int, height: int) -> np.ndarray:
  return np.full((height, width, 3), 255, np.uint8)


def save(path: str, img: np.ndarray) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not cv2.imwrite(path, img):
    raise OSError(f"could not write the figure {path}")
  return path


def upscale(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
  return cv2.resize(img, (size, size),
                    interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def grey_bgr(img: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(np.asarray(img, np.uint8), cv2.COLOR_GRAY2BGR)


def label_image(labels: np.ndarray, size: int) -> np.ndarray:
  """Integer label map -> palette colours, nearest-upscaled to size x size."""
  lut = np.array([colour(i) for i in range(int(labels.max(initial=0)) + 1)], np.uint8)
  return upscale(lut[np.asarray(labels, np.int64)], size, nearest=True)


class Axes:
  """A plot area inside a canvas mapping data (x, y) to pixels."""

  def __init__(self, img, box, xlim, ylim):
    self.img, (self.x0, self.y0, self.x1, self.y1) = img, box
    self.xlim, self.ylim = xlim, ylim
    cv2.rectangle(img, (self.x0, self.y0), (self.x1, self.y1), BLACK, 1)

  def px(self, x, y):
    fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
    fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
    return (int(round(self.x0 + fx * (self.x1 - self.x0))),
            int(round(self.y1 - fy * (self.y1 - self.y0))))

  def yticks(self, values, fmt="{:.2f}"):
    for v in values:
      x, y = self.px(self.xlim[0], v)
      cv2.line(self.img, (self.x0, y), (self.x1, y), (230, 230, 230), 1)
      cv2.line(self.img, (self.x0 - 4, y), (self.x0, y), BLACK, 1)
      text(self.img, fmt.format(v), (self.x0 - 42, y + 4))

  def xticks(self, positions, labels):
    for p, s in zip(positions, labels):
      x, _ = self.px(p, self.ylim[0])
      cv2.line(self.img, (x, self.y1), (x, self.y1 + 4), BLACK, 1)
      text(self.img, s, (x - 4 * len(s), self.y1 + 18))


def legend(img, entries, org, dot=False):
  x, y = org
  for i, (name, col) in enumerate(entries):
    yy = y + 16 * i
    if dot:
      cv2.circle(img, (x + 8, yy - 4), 4, col, -1, cv2.LINE_AA)
    else:
      cv2.line(img, (x, yy - 4), (x + 18, yy - 4), col, 2, cv2.LINE_AA)
    text(img, name, (x + 24, yy))


# ------------------------------------------------------------------ figures
def auroc_curves(runs: list[dict], path: str, title: str) -> str:
  """Mean test AUROC vs label fraction (log x), one line per method, bars = seed range."""
  img = canvas(640, 440)
  fractions = sorted({r["label_fraction"] for r in runs})
  methods = unique(runs, "method")
  values = [r["mean_auroc"] for r in runs if r["mean_auroc"] is not None
            and not math.isnan(r["mean_auroc"])]
  lo = min([0.5] + values) - 0.02
  hi = min(1.0, max([0.6] + values) + 0.02)
  logs = [math.log10(f) for f in fractions]
  span = (min(logs) - 0.2, max(logs) + 0.2) if len(logs) > 1 else (logs[0] - 1, logs[0] + 1)
  ax = Axes(img, (80, 50, 460, 380), span, (lo, hi))
  step = 0.05 if hi - lo <= 0.5 else 0.1
  ax.yticks(np.arange(math.ceil(lo / step) * step, hi + 1e-9, step))
  ax.xticks(logs, [f"{100 * f:g}%" for f in fractions])
  text(img, title, (20, 25), 0.5)
  text(img, "labelled fraction of the train split", (160, 425))
  text(img, "test mean AUROC", (5, 40))
  entries = []
  for i, method in enumerate(methods):
    points = []
    for f, lf in zip(fractions, logs):
      vals = [r["mean_auroc"] for r in runs if r["method"] == method
              and r["label_fraction"] == f and r["mean_auroc"] is not None
              and not math.isnan(r["mean_auroc"])]
      if vals:
        points.append(ax.px(lf, float(np.mean(vals))))
        if len(vals) > 1:
          cv2.line(img, ax.px(lf, min(vals)), ax.px(lf, max(vals)), colour(i), 1)
    for a, b in zip(points, points[1:]):
      cv2.line(img, a, b, colour(i), 2, cv2.LINE_AA)
    for p in points:
      cv2.circle(img, p, 4, colour(i), -1, cv2.LINE_AA)
    entries.append((method, colour(i)))
  legend(img, entries, (475, 70))
  return save(path, img)


def overlay(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, size: int,
            alpha: float = 0.45) -> np.ndarray:
  """A heatmap in [0, 1] over the greyscale image, the true lesion outlined in green."""
  base = upscale(grey_bgr(image), size)
  if heatmap is not None:
    heat = cv2.applyColorMap(upscale(np.uint8(np.clip(heatmap, 0, 1) * 255), size),
                             cv2.COLORMAP_JET)
    base = cv2.addWeighted(base, 1 - alpha, heat, alpha, 0)
  outline = upscale(np.uint8(mask) * 255, size, nearest=True)
  contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(base, contours, -1, (0, 255, 0), 1, cv2.LINE_AA)
  return base


def anomaly_maps(panels: list[dict], path: str, title: str, size: int = 160) -> str:
  """Rows: a test image per finding; columns: the image and each map, lesion outlined."""
  columns = ["image"] + list(panels[0]["maps"]) if panels else ["image"]
  pad, top, left = 6, 44, 120
  img = canvas(left + len(columns) * (size + pad), top + max(1, len(panels)) * (size + pad))
  text(img, title, (8, 18), 0.5)
  for j, name in enumerate(columns):
    text(img, name, (left + j * (size + pad) + 4, top - 8))
  for i, panel in enumerate(panels):
    y = top + i * (size + pad)
    text(img, panel["finding"], (6, y + size // 2))
    text(img, panel["item"][-16:], (6, y + size // 2 + 16), 0.35, GREY)
    tiles = [overlay(panel["image"], None, panel["mask"], size)]
    tiles += [overlay(panel["image"], m, panel["mask"], size) for m in panel["maps"].values()]
    for j, tile in enumerate(tiles):
      x = left + j * (size + pad)
      img[y:y + size, x:x + size] = tile
  return save(path, img)


def embedding(points: np.ndarray, labels: np.ndarray, names, path: str, title: str) -> str:
  """2-D scatter of token features coloured by anatomy structure."""
  img = canvas(720, 520)
  pts = np.asarray(points, np.float64)
  lo, hi = pts.min(0), pts.max(0)
  margin = 0.05 * np.maximum(hi - lo, 1e-9)
  ax = Axes(img, (20, 40, 540, 500), (lo[0] - margin[0], hi[0] + margin[0]),
            (lo[1] - margin[1], hi[1] + margin[1]))
  text(img, title, (10, 25), 0.45)
  for (x, y), lab in zip(pts, np.asarray(labels)):
    cv2.circle(img, ax.px(x, y), 2, colour(int(lab)), -1, cv2.LINE_AA)
  present = sorted(set(int(v) for v in np.asarray(labels)))
  legend(img, [(names[i], colour(i)) for i in present], (555, 60), dot=True)
  return save(path, img)


def label_grid(rows: list[dict], columns, names, path: str, title: str, size: int = 144,
               alpha: float = 1.0) -> str:
  """One row per image: the greyscale image, then the label map of each (key, header) of
  `columns` drawn over it with opacity `alpha` (1: the labels alone); a legend of `names`."""
  headers = ["image"] + [header for _, header in columns]
  pad, top = 6, 40
  img = canvas(len(headers) * (size + pad) + 160, top + max(1, len(rows)) * (size + pad))
  text(img, title, (8, 18), 0.5)
  for j, header in enumerate(headers):
    text(img, header, (j * (size + pad) + 4, top - 8))
  for i, row in enumerate(rows):
    y = top + i * (size + pad)
    base = upscale(grey_bgr(row["image"]), size)
    tiles = [base] + [cv2.addWeighted(base, 1 - alpha, label_image(row[key], size), alpha, 0)
                      for key, _ in columns]
    for j, tile in enumerate(tiles):
      img[y:y + size, j * (size + pad):j * (size + pad) + size] = tile
  legend(img, [(n, colour(i)) for i, n in enumerate(names)],
         (len(headers) * (size + pad) + 4, top + 12), dot=True)
  return save(path, img)


def anatomy_examples(examples: list[dict], names, path: str) -> str:
  """Per test image: the image, the anatomy token labels, the probe's prediction and the
  k-means clusters (cluster colours are arbitrary)."""
  return label_grid(examples, (("anatomy", "anatomy (tokens)"), ("probe", "token probe"),
                               ("kmeans", "k-means (any colours)")),
                    names, path, "Anatomy on the patch grid")


def segmentation_examples(figure: dict, names, path: str, title: str) -> str:
  """Per test image: the true anatomy and each mode's prediction, over the image."""
  fraction = f"{100 * figure['label_fraction']:g}% masks"
  columns = [("truth", "true anatomy")] + [(m, f"{m}, {fraction}") for m in figure["modes"]]
  return label_grid(figure["examples"], columns, names, path, title, alpha=0.5)


def transfer_examples(figure: dict, path: str, title: str, size: int = 128) -> str:
  """Rows: test images; columns: the image (with the LD run's clustering, when there is
  one) and each structure's predicted probability with the true outline in green."""
  columns = ["image"] + (["LD clusters"] if "clusters" in figure else [])
  columns += [f"{n}, {100 * figure['label_fraction']:g}% masks" for n in figure["structures"]]
  pad, top = 6, 44
  rows = figure["examples"]
  img = canvas(len(columns) * (size + pad) + pad, top + max(1, len(rows)) * (size + pad))
  text(img, title, (8, 18), 0.5)
  for j, name in enumerate(columns):
    text(img, name, (pad + j * (size + pad), top - 8), 0.35)
  for i, example in enumerate(rows):
    y = top + i * (size + pad)
    tiles = [upscale(grey_bgr(example["image"]), size)]
    if "clusters" in figure:
      tiles.append(cv2.addWeighted(tiles[0], 0.4, label_image(figure["clusters"][i], size),
                                   0.6, 0))
    tiles += [overlay(example["image"], figure["predictions"][n][i], example["truth"][n],
                      size) for n in figure["structures"]]
    for j, tile in enumerate(tiles):
      img[y:y + size, pad + j * (size + pad):pad + j * (size + pad) + size] = tile
  return save(path, img)


def write_figures(out_dir: str, protocol: str, figures: dict, results: dict) -> list[str]:
  """The protocol's figures under OUT/figures/; returns their paths relative to OUT."""
  fig_dir = os.path.join(out_dir, "figures")
  enc = results["encoder"]
  init = enc.get("method") or enc.get("kind", "")   # afire (a run), random, file
  written = []
  if protocol == "cxr_probe" and figures.get("curves"):
    written.append(auroc_curves(figures["curves"], os.path.join(fig_dir, "auroc_vs_labels.png"),
                                f"Multi-label classification ({init} encoder)"))
  if protocol == "localisation":
    for kind, panels in figures.get("examples", {}).items():
      written.append(anomaly_maps(
          panels, os.path.join(fig_dir, f"anomaly_maps_{kind}.png"),
          f"{kind} classifier maps ({init} encoder); green = true lesion"))
  if protocol == "anatomy" and figures:
    emb = figures["embedding"]
    written.append(embedding(
        emb["points"], emb["labels"], results["classes"],
        os.path.join(fig_dir, "token_embedding.png"),
        f"Test patch tokens of the {init} encoder, {emb['method']}, coloured by structure"))
    written.append(anatomy_examples(figures["examples"], results["classes"],
                                    os.path.join(fig_dir, "anatomy_examples.png")))
  if protocol == "ld_segmentation" and figures.get("examples"):
    written.append(transfer_examples(
        figures, os.path.join(fig_dir, "transfer_examples.png"),
        f"LD segmentation transfer ({init} encoder); green = true outline"))
  if protocol == "segmentation" and figures.get("examples"):
    written.append(segmentation_examples(
        figures, results["classes"], os.path.join(fig_dir, "segmentation_examples.png"),
        f"Anatomy segmentation of test images ({init} encoder)"))
  return [os.path.relpath(p, out_dir) for p in written]
