"""Data sources by name (`config.data.source`): random-access collections of items.

Each source is a Grain random-access source (`__len__`, `__getitem__`) whose items hold at
least `image`: a uint8 greyscale [H, W] array. Unknown names and missing data roots fail
here, before anything compiles. Besides the embedded synthetic radiographs, the readers of
anatjax/data/radiographs.py read real collections from their download folders, and
`prepared` reads any of them back from the ArrayRecord folder `python -m
anatjax.data.prepare` wrote (anatjax/data/prepared.py). `ct_patches` is the 3D exception:
DrasCLR's atlas patch store (anatjax/data/ct_patches.py, made by ct_prepare.py), whose
items are HU patches at atlas locations, served in location blocks; `ct_volumes` is
Alice's volume store (anatjax/data/ct_volumes.py), whose items are pairs of patients' CTs.
"""

from __future__ import annotations

from anatjax.config import closest
from anatjax.data import ct_patches, ct_prepare, ct_volumes, prepared, radiographs
from anatjax.data.synthetic_cxr import SyntheticCXR


def _synthetic_cxr(data_config, split):
  if data_config.root:
    raise ValueError(f"config data.root={data_config.root!r}: the synthetic_cxr source is "
                     "generated in memory and reads no files; leave data.root empty.")
  return SyntheticCXR(split=split, image_size=data_config.image_size,
                      num_examples=data_config.num_examples, seed=data_config.source_seed)


def _ct_patches(data_config, split):
  del split   # the SSL store has every subject; evaluation reads volumes itself
  return ct_patches.LocationBlockedPatches(ct_prepare.ensure_store(data_config),
                                           data_config.location_order,
                                           data_config.neighbour_tie_break)


def _ct_volumes(data_config, split):
  del split
  return ct_volumes.VolumePairs(ct_volumes.ensure_store(data_config))


# name -> (data config, split) -> source
SOURCES = {"synthetic_cxr": _synthetic_cxr, **radiographs.READERS,
           "prepared": prepared.prepared, "ct_patches": _ct_patches,
           "ct_volumes": _ct_volumes}


def make_source(data_config, split: str = "pretrain"):
  name = data_config.source
  if name not in SOURCES:
    raise ValueError(f"config data.source={name!r} is not a known source; known: "
                     f"{sorted(SOURCES)}." + closest(name, SOURCES))
  return SOURCES[name](data_config, split)


def examples_per_epoch(source, batch_size: int) -> int:
  """What one epoch is: the whole source, unless the source defines its epochs itself
  (DrasCLR's location blocks drop each location's last partial batch)."""
  if hasattr(source, "examples_per_epoch"):
    return source.examples_per_epoch(batch_size)
  return len(source)
