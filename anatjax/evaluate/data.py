"""The evaluation sets: disjoint train / val / test splits, label subsets, split files.

Synthetic data: every split renders items of ONE `SyntheticCXR("labelled", seed=...)`
source from its own index range (train [0, n_train), val next, test after), so the splits
never overlap and each item is the same in every run and process. Pretraining reads the
"pretrain" split, so no evaluation image was seen in pretraining either. Real collections
(data.source a reader of anatjax/data/radiographs.py): see anatjax/evaluate/real_data.py.

Label subsets (1 %, 10 %, ...) are prefixes of one seeded permutation of the train split,
so the subsets are nested (1 % is inside 10 %) and a seed gives the same subsets in every
run. They are written to OUT/splits/ in the usual `file_name l0 ... lN` split-file format,
and `data.subsets_dir` reads such files back (or the literature's) instead.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from anatjax.data.radiographs import read_split_file
from anatjax.data.synthetic_cxr import ANATOMY_NAMES, FINDING_NAMES, SyntheticCXR
from anatjax.evaluate import real_data

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Split:
  """One evaluation split as arrays (N items, S x S pixels, C findings)."""
  name: str
  names: list[str]           # item names as split files list them
  class_names: tuple[str, ...]
  images: np.ndarray         # uint8 [N, S, S]
  findings: np.ndarray       # uint8 [N, C] multi-hot over class_names
  boxes: np.ndarray          # float32 [N, C, 4] (x, y, w, h) pixels around each finding
  located: np.ndarray        # bool [N, C]: where the finding is is known (mask or box)
  finding_masks: np.ndarray | None = None  # uint8 [N, S, S], bit c = finding c (synthetic)
  anatomy: np.ndarray | None = None        # uint8 [N, S, S] into ANATOMY_NAMES (synthetic)
  origin: str = ""           # where the items come from, for the results
  notes: list[str] = dataclasses.field(default_factory=list)  # e.g. files left out

  def __len__(self) -> int:
    return len(self.names)

  def finding_mask(self, i: int, c: int) -> np.ndarray:
    """bool [S, S]: finding c's pixels in item i; where only a box is known, the pixels
    whose centres lie in it."""
    if self.finding_masks is not None:
      return (self.finding_masks[i] >> c) & 1 == 1
    centres = np.arange(self.images.shape[-1]) + 0.5
    x, y, w, h = self.boxes[i, c] if self.located[i, c] else (0, 0, 0, 0)
    inside = lambda start, length: (centres >= start) & (centres < start + length)
    return inside(y, h)[:, None] & inside(x, w)[None, :]

  def take(self, positions, name: str | None = None) -> Split:
    """The items at `positions`, as a split of their own."""
    positions = np.asarray(positions, np.int64)
    pick = lambda a: None if a is None else a[positions]
    return dataclasses.replace(
        self, name=name or self.name, names=[self.names[p] for p in positions],
        images=self.images[positions], findings=self.findings[positions],
        boxes=self.boxes[positions], located=self.located[positions],
        finding_masks=pick(self.finding_masks), anatomy=pick(self.anatomy), notes=[])


def item_name(source_seed: int, index: int) -> str:
  """The file name a synthetic item has in split files."""
  return f"synthetic_cxr/labelled/seed{source_seed}/{index:07d}"


def split_ranges(num_train: int, num_val: int, num_test: int) -> dict[str, range]:
  starts = np.cumsum([0, num_train, num_val])
  return {name: range(int(s), int(s) + n)
          for name, s, n in zip(SPLITS, starts, (num_train, num_val, num_test))}


def render(source: SyntheticCXR, indices, name: str, source_seed: int) -> Split:
  items = [source[int(i)] for i in indices]
  findings = np.stack([it["findings"] for it in items])
  return Split(
      name=name, names=[item_name(source_seed, int(i)) for i in indices],
      class_names=FINDING_NAMES, images=np.stack([it["image"] for it in items]),
      findings=findings, boxes=np.stack([it["boxes"] for it in items]),
      located=findings.astype(bool),
      finding_masks=np.stack([it["finding_masks"] for it in items]),
      anatomy=np.stack([it["anatomy"] for it in items]),
      origin=f"synthetic_cxr labelled seed {source_seed}, items {indices.start}.."
             f"{indices.stop - 1}")


def load_splits(data_config, image_size: int, names=SPLITS, workdir: str | None = None,
                log=print) -> dict[str, Split]:
  """The requested splits at `image_size` pixels: synthetic, or a real collection's
  (real_data.py; unusable files are listed in WORKDIR/bad_files.tsv)."""
  if data_config.source != "synthetic_cxr":
    return real_data.load(data_config, image_size, names, workdir, log)
  ranges = split_ranges(data_config.num_train, data_config.num_val, data_config.num_test)
  source = SyntheticCXR("labelled", image_size=image_size,
                        num_examples=ranges["test"].stop, seed=data_config.source_seed)
  return {n: render(source, ranges[n], n, data_config.source_seed) for n in names}


def label_subset(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted positions of a `fraction` of the train split (at least one), nested in seed."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fraction {fraction} is not in (0, 1]")
  count = max(1, int(math.floor(fraction * num_examples + 1e-9)))
  order = np.random.default_rng([seed, 0x5B5E7]).permutation(num_examples)
  return np.sort(order[:count])


# ------------------------------------------------------------------ split files
def write_split_file(path: str, names, labels) -> None:
  """One line per item: `file_name l0 ... lN` (labels 0/1), as ChestX-ray14-style splits."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for name, row in zip(names, np.asarray(labels)):
      f.write(name + " " + " ".join(str(int(v)) for v in row) + "\n")


def subset_positions(split: Split, fraction: float, seed: int, data_config,
                     out_dir: str | None) -> np.ndarray:
  """Positions in `split` of the labelled subset for (fraction, seed).

  Generated deterministically, or read from `data_config.subsets_dir`: the file named by
  data.subset_pattern with {percent} and {seed} filled in (default
  `train_<percent>pct_seed<seed>.txt`, as written to OUT/splits/ by an earlier run; a
  pattern without {seed} gives every seed the same, published, subset). Entries are
  matched by name, or by file name alone for bare names (the NIH split files); their
  labels must agree with the split's. The subset is written to `out_dir`.
  """
  file_name = subset_file_name(data_config.subset_pattern, fraction, seed)
  if data_config.subsets_dir:
    path = os.path.join(data_config.subsets_dir, file_name)
    names, labels = read_split_file(path, split.findings.shape[1])
    positions = positions_of(split, names, path)
    disagree = np.flatnonzero((labels != split.findings[positions]).any(1))
    if len(disagree):
      raise ValueError(f"{path}: the labels of {len(disagree)} entries differ from the "
                       f"data's, e.g. {names[disagree[0]]}: file "
                       f"{labels[disagree[0]].tolist()}, data "
                       f"{split.findings[positions[disagree[0]]].tolist()} (in the order "
                       f"{list(split.class_names)})")
  else:
    positions = label_subset(len(split), fraction, seed)
  if out_dir:
    write_split_file(os.path.join(out_dir, subset_file_name(SUBSET_PATTERN, fraction, seed)),
                     [split.names[p] for p in positions], split.findings[positions])
  return positions


SUBSET_PATTERN = "train_{percent}pct_seed{seed}.txt"


def subset_file_name(pattern: str, fraction: float, seed: int) -> str:
  return pattern.format(percent=f"{100 * fraction:g}", seed=seed)


def positions_of(split: Split, names, path: str) -> np.ndarray:
  """Positions in `split` of the items a split file names (full name or bare file name)."""
  full = {n: p for p, n in enumerate(split.names)}
  bare = {}
  for p, n in enumerate(split.names):
    bare.setdefault(os.path.basename(n), p)
  lookup = lambda n: full.get(n, bare.get(n) if "/" not in n else None)
  found = [lookup(n) for n in names]
  missing = [n for n, p in zip(names, found) if p is None]
  if missing:
    raise ValueError(f"{path}: {len(missing)} entries are not in the {split.name} split, "
                     f"e.g. {missing[:3]}")
  return np.asarray(found, np.int64)


__all__ = ["ANATOMY_NAMES", "FINDING_NAMES", "SPLITS", "Split", "label_subset",
           "load_splits", "read_split_file", "subset_positions", "write_split_file"]
