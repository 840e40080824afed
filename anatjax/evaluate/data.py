"""The evaluation sets: disjoint train / val / test splits, label subsets, split files.

Synthetic data: every split renders items of ONE `SyntheticCXR("labelled", seed=...)`
source from its own index range (train [0, n_train), val next, test after), so the splits
never overlap and each item is the same in every run and process. Pretraining reads the
"pretrain" split, so no evaluation image was seen in pretraining either.

Label subsets (1 %, 10 %, ...) are prefixes of one seeded permutation of the train split,
so the subsets are nested (1 % is inside 10 %) and a seed gives the same subsets in every
run. They are written to OUT/splits/ in the usual `file_name l0 ... lN` split-file format,
and `data.subsets_dir` reads such files back instead of generating them.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from anatjax.data.radiographs import read_split_file
from anatjax.data.synthetic_cxr import ANATOMY_NAMES, FINDING_NAMES, SyntheticCXR

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Split:
  """One evaluation split as arrays (N items, S x S pixels)."""
  name: str
  indices: np.ndarray        # [N] source indices (the synthetic items' identity)
  images: np.ndarray         # uint8 [N, S, S]
  anatomy: np.ndarray        # uint8 [N, S, S], index into ANATOMY_NAMES
  findings: np.ndarray       # uint8 [N, C] multi-hot over FINDING_NAMES
  finding_masks: np.ndarray  # uint8 [N, S, S], bit f set where finding f is
  boxes: np.ndarray          # float32 [N, C, 4] (x, y, w, h) pixels

  def __len__(self) -> int:
    return len(self.indices)

  def file_names(self, source_seed: int) -> list[str]:
    return [item_name(source_seed, int(i)) for i in self.indices]


def item_name(source_seed: int, index: int) -> str:
  """The file name a synthetic item has in split files."""
  return f"synthetic_cxr/labelled/seed{source_seed}/{index:07d}"


def item_index(name: str, source_seed: int) -> int:
  prefix = f"synthetic_cxr/labelled/seed{source_seed}/"
  if not name.startswith(prefix):
    raise ValueError(f"split file entry {name!r} is not an item of the synthetic labelled "
                     f"split with source seed {source_seed} (expected {prefix}NNNNNNN)")
  return int(name[len(prefix):])


def split_ranges(num_train: int, num_val: int, num_test: int) -> dict[str, range]:
  starts = np.cumsum([0, num_train, num_val])
  return {name: range(int(s), int(s) + n)
          for name, s, n in zip(SPLITS, starts, (num_train, num_val, num_test))}


def render(source: SyntheticCXR, indices, name: str) -> Split:
  items = [source[int(i)] for i in indices]
  return Split(
      name=name,
      indices=np.asarray(list(indices), np.int64),
      images=np.stack([it["image"] for it in items]),
      anatomy=np.stack([it["anatomy"] for it in items]),
      findings=np.stack([it["findings"] for it in items]),
      finding_masks=np.stack([it["finding_masks"] for it in items]),
      boxes=np.stack([it["boxes"] for it in items]))


def load_splits(data_config, image_size: int, names=SPLITS) -> dict[str, Split]:
  """The requested splits of the synthetic labelled data at `image_size` pixels."""
  if data_config.source != "synthetic_cxr":
    raise ValueError(f"config data.source={data_config.source!r}: the evaluation reads only "
                     "the embedded 'synthetic_cxr' data so far")
  ranges = split_ranges(data_config.num_train, data_config.num_val, data_config.num_test)
  source = SyntheticCXR("labelled", image_size=image_size,
                        num_examples=ranges["test"].stop, seed=data_config.source_seed)
  return {n: render(source, ranges[n], n) for n in names}


def label_subset(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted positions of a `fraction` of the train split (at least one), nested in seed."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fraction {fraction} is not in (0, 1]")
  count = max(1, int(math.floor(fraction * num_examples + 1e-9)))
  order = np.random.default_rng([seed, 0x5B5E7]).permutation(num_examples)
  return np.sort(order[:count])


def fraction_tag(fraction: float) -> str:
  """0.01 -> '1pct', 0.005 -> '0.5pct' (for file names)."""
  return f"{100 * fraction:g}pct"


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

  Generated deterministically, or read from `data_config.subsets_dir` when set (the file
  `train_<tag>_seed<seed>.txt`, as written to OUT/splits/ by an earlier run). The labels
  in a read file must agree with the data's. The subset is written to `out_dir`.
  """
  file_name = f"train_{fraction_tag(fraction)}_seed{seed}.txt"
  if data_config.subsets_dir:
    names, labels = read_split_file(os.path.join(data_config.subsets_dir, file_name),
                                    split.findings.shape[1])
    wanted = np.array([item_index(n, data_config.source_seed) for n in names])
    lookup = {int(i): p for p, i in enumerate(split.indices)}
    missing = [int(i) for i in wanted if int(i) not in lookup]
    if missing:
      raise ValueError(f"{file_name}: items {missing[:5]} are not in the train split")
    positions = np.array([lookup[int(i)] for i in wanted])
    if not np.array_equal(labels, split.findings[positions]):
      raise ValueError(f"{file_name}: its labels differ from the data's")
  else:
    positions = label_subset(len(split), fraction, seed)
  if out_dir:
    names = split.file_names(data_config.source_seed)
    write_split_file(os.path.join(out_dir, file_name), [names[p] for p in positions],
                     split.findings[positions])
  return positions


__all__ = ["ANATOMY_NAMES", "FINDING_NAMES", "SPLITS", "Split", "label_subset",
           "load_splits", "read_split_file", "subset_positions", "write_split_file"]
