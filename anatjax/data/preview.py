"""Write a PNG grid of ``synthetic_cxr`` samples with anatomy / finding overlays.

Usage:
 python -m anatjax.data.preview --out=/tmp/preview.png [--split=pretrain|labelled]
   [--n=8] [--image_size=224] [--seed=0] [--start=0] [--pairs_per_row=2]

Each sample is shown as a pair: the radiograph, and the radiograph with a
semi-transparent colour overlay of the anatomy labels (one fixed colour per
structure). For the labelled split the finding masks are outlined and their boxes
drawn in one colour per finding, with the finding names written next to them.
A legend strip at the bottom lists the structure (and finding) colours.
The drawing functions (``overlay_sample``, ``legend_strip``, ``render_grid``) can
be used without the command line.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from anatjax.data.synthetic_cxr import ANATOMY_NAMES, FINDING_NAMES, SyntheticCXR

# BGR colours (cv2 convention); index = anatomy label.
ANATOMY_COLORS: np.ndarray = np.array([
  (0, 0, 0),          # background
  (150, 120, 90),     # soft_tissue
  (60, 120, 200),     # abdomen
  (230, 160, 30),     # right_lung
  (240, 220, 60),     # left_lung
  (170, 80, 190),     # mediastinum
  (60, 60, 235),      # heart
  (200, 255, 200),    # trachea
  (40, 220, 255),     # spine
  (60, 210, 60),      # ribs
  (255, 80, 255),     # clavicles
  (200, 200, 255),    # humeri
], np.uint8)
assert len(ANATOMY_COLORS) == len(ANATOMY_NAMES)

FINDING_COLORS: tuple[tuple[int, int, int], ...] = (
  (0, 255, 255),    # nodule: yellow
  (0, 140, 255),    # consolidation: orange
  (255, 255, 0),    # pleural_effusion: cyan
  (80, 80, 255),    # cardiomegaly: red
  (255, 0, 255),    # pneumothorax: magenta
)
assert len(FINDING_COLORS) == len(FINDING_NAMES)

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _font_scale(width: int) -> float:
  return max(0.3, min(0.6, width / 520.0))


def overlay_sample(item: dict[str, np.ndarray], alpha: float = 0.4) -> np.ndarray:
  """Image with a colour overlay of the anatomy labels (and findings): uint8 [S, S, 3] BGR."""
  img = cv2.cvtColor(item["image"], cv2.COLOR_GRAY2BGR)
  colors = ANATOMY_COLORS[item["anatomy"]]
  over = cv2.addWeighted(img, 1.0 - alpha, colors, alpha, 0.0)
  bg = item["anatomy"] == 0
  over[bg] = img[bg]
  if "finding_masks" in item:
    S = img.shape[0]
    fs = _font_scale(S) * 0.8
    fm = item["finding_masks"]
    boxes = item["boxes"]
    text_y = 0
    for f, name in enumerate(FINDING_NAMES):
      if not item["findings"][f]:
        continue
      m = ((fm >> f) & 1).astype(np.uint8)
      contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
      cv2.drawContours(over, contours, -1, FINDING_COLORS[f], 1, cv2.LINE_AA)
      x, y, w, h = (int(round(v)) for v in boxes[f])
      cv2.rectangle(over, (x, y), (x + w - 1, y + h - 1), FINDING_COLORS[f], 1)
      (tw, th), _ = cv2.getTextSize(name, _FONT, fs, 1)
      text_y += th + 4
      cv2.putText(over, name, (S - tw - 3, text_y), _FONT, fs, (0, 0, 0), 3, cv2.LINE_AA)
      cv2.putText(over, name, (S - tw - 3, text_y), _FONT, fs, FINDING_COLORS[f], 1, cv2.LINE_AA)
  return over


def legend_strip(width: int, labelled: bool) -> np.ndarray:
  """Legend of structure (and finding) colours: uint8 [H, width, 3] BGR."""
  fs = _font_scale(width / 2)
  (_, th), _ = cv2.getTextSize("Ag", _FONT, fs, 1)
  sw = th + 4
  entries: list[tuple[str, tuple[int, int, int], bool]] = [
    (n, tuple(int(c) for c in ANATOMY_COLORS[i]), True) for i, n in enumerate(ANATOMY_NAMES)]
  if labelled:
    entries += [(n, FINDING_COLORS[f], False) for f, n in enumerate(FINDING_NAMES)]
  # flow layout
  rows: list[list[tuple[int, str, tuple[int, int, int], bool]]] = [[]]
  x = 6
  for name, col, filled in entries:
    (tw, _), _ = cv2.getTextSize(name, _FONT, fs, 1)
    w = sw + 4 + tw + 14
    if x + w > width and rows[-1]:
      rows.append([])
      x = 6
    rows[-1].append((x, name, col, filled))
    x += w
  row_h = sw + 8
  strip = np.full((row_h * len(rows) + 6, width, 3), 32, np.uint8)
  for r, row in enumerate(rows):
    y0 = 4 + r * row_h
    for x, name, col, filled in row:
      cv2.rectangle(strip, (x, y0), (x + sw, y0 + sw), col, -1 if filled else 2)
      cv2.putText(strip, name, (x + sw + 4, y0 + sw - 2), _FONT, fs, (235, 235, 235), 1, cv2.LINE_AA)
  return strip


def render_grid(source: Any, indices: Iterable[int], pairs_per_row: int = 2,
        alpha: float = 0.4) -> np.ndarray:
  """Render samples of ``source`` as a grid of (image, overlay) pairs plus a legend.

  Returns a uint8 [H, W, 3] BGR image with W = pairs_per_row * 2 * S (+ 2 px gaps)
  and H = rows * (S + 2) + legend height.
  """
  items = [source[int(i)] for i in indices]
  if not items:
    raise ValueError("render_grid needs at least one index")
  S = items[0]["image"].shape[0]
  gap = 2
  cols = max(1, min(pairs_per_row, len(items)))
  rows = -(-len(items) // cols)
  W = cols * (2 * S + gap)
  grid = np.full((rows * (S + gap), W, 3), 16, np.uint8)
  fs = _font_scale(S) * 0.8
  for k, item in enumerate(items):
    r, c = divmod(k, cols)
    y, x = r * (S + gap), c * (2 * S + gap)
    img = cv2.cvtColor(item["image"], cv2.COLOR_GRAY2BGR)
    cv2.putText(img, f"#{int(item['index'])}", (3, int(14 * fs / 0.4)), _FONT, fs, (0, 255, 0), 1,
          cv2.LINE_AA)
    grid[y:y + S, x:x + S] = img
    grid[y:y + S, x + S:x + 2 * S] = overlay_sample(item, alpha)
  labelled = "finding_masks" in items[0]
  return np.concatenate([grid, legend_strip(W, labelled)], axis=0)


def main(argv: Sequence[str]) -> None:
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  F = flags.FLAGS
  source = SyntheticCXR(split=F.split, image_size=F.image_size, seed=F.seed)
  indices = range(F.start, F.start + F.n)
  grid = render_grid(source, indices, pairs_per_row=F.pairs_per_row)
  if not cv2.imwrite(F.out, grid):
    raise RuntimeError(f"could not write {F.out}")
  print(F.out)


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("out", None, "Output PNG path.", required=True)
  flags.DEFINE_enum("split", "pretrain", ["pretrain", "labelled"], "Data split.")
  flags.DEFINE_integer("n", 8, "Number of samples.", lower_bound=1)
  flags.DEFINE_integer("image_size", 224, "Image side in pixels.", lower_bound=32)
  flags.DEFINE_integer("seed", 0, "Source seed.", lower_bound=0)
  flags.DEFINE_integer("start", 0, "First index.", lower_bound=0)
  flags.DEFINE_integer("pairs_per_row", 2, "Samples (image + overlay pairs) per row.", lower_bound=1)


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
