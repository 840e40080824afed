"""A random-access source of image files with labels: what every file collection becomes.

A collection parser (anatjax/data/radiographs.py) turns a dataset's own index files into
an `ImageIndex` (paths plus findings and boxes, in a fixed order); `ImageSource` checks at
start-up that the listed files exist and reads item i on demand:

  image           uint8 [S, S]   decoded, intensity-normalised, fitted (anatjax/data/decode)
  index           int64          position in the source
  findings        uint8 [C]      1 = present, in `class_names` order (labelled collections)
  findings_known  bool [C]       False where the label is ignored (uncertain, by policy)
  boxes           float32 [K, 4] (x, y, w, h) in output pixels, K = the most boxes any
  box_classes     int32 [K]      item has; class index into `class_names`, -1 = padding
                                 (collections with boxes)

Files missing at start-up leave the index and are listed in `scan_failures`; files that
fail to decode later raise `decode.BadImageError` (see anatjax/data/bad_files.py for how
a run skips, counts and reports both).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from anatjax.data import decode


@dataclasses.dataclass
class ImageIndex:
  """What a collection lists: absolute file paths and their labels, row i = item i."""
  paths: list[str]
  class_names: tuple[str, ...] = ()
  findings: np.ndarray | None = None     # uint8 [N, C]
  known: np.ndarray | None = None        # bool [N, C]
  boxes: list[np.ndarray] | None = None  # per item float32 [k, 5]: class, x, y, w, h

  def __len__(self) -> int:
    return len(self.paths)

  def take(self, keep: np.ndarray) -> ImageIndex:
    """The rows where the boolean array `keep` is True."""
    positions = np.flatnonzero(keep)
    return ImageIndex(
        paths=[self.paths[p] for p in positions], class_names=self.class_names,
        findings=None if self.findings is None else self.findings[positions],
        known=None if self.known is None else self.known[positions],
        boxes=None if self.boxes is None else [self.boxes[p] for p in positions])


class ImageSource:
  """Grain random-access source over an `ImageIndex` (see the module docstring)."""

  def __init__(self, index: ImageIndex, options: decode.DecodeOptions, description: str):
    exists = np.array([os.path.isfile(p) for p in index.paths], bool)
    self.scan_failures = [(p, "missing") for p, ok in zip(index.paths, exists) if not ok]
    self.num_listed = len(index)
    self.index = index.take(exists)
    self.options = options
    self.description = description
    self.class_names = index.class_names
    self._max_boxes = max((len(b) for b in self.index.boxes or ()), default=0)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, position):
    position = int(position)
    image, placement = self.options.load(self.index.paths[position])
    item = {"image": image, "index": np.int64(position)}
    if self.index.findings is not None:
      item["findings"] = self.index.findings[position]
      item["findings_known"] = self.index.known[position]
    if self.index.boxes is not None:
      boxes = self.index.boxes[position]
      item["boxes"] = np.zeros((self._max_boxes, 4), np.float32)
      item["box_classes"] = np.full((self._max_boxes,), -1, np.int32)
      item["boxes"][:len(boxes)] = placement.boxes(boxes[:, 1:], self.options.size)
      item["box_classes"][:len(boxes)] = boxes[:, 0]
    return item

  def __repr__(self) -> str:
    return f"ImageSource({self.description}, {len(self)} files)"
