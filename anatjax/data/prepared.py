"""Prepared datasets: a source's items decoded once and stored in ArrayRecord shards.

`python -m anatjax.data.prepare` (anatjax/data/prepare.py) reads any source through its
own decoding, normalisation and geometry and writes its items here; `data.source=prepared`
with `data.root=<the prepared folder>` reads them back with random access through Grain's
ArrayRecordDataSource, item for item what the original source returned (images bitwise,
findings, boxes, ...), with no decoding left to do in the data workers.

A prepared folder holds

  prepared.json              what it holds: format, source, root, split, data options,
                             class names, count, shard files, skipped files (written last:
                             a folder without it is an unfinished preparation)
  shard-NNNNN.array_record   the records in item order (ArrayRecord, group size 1)
  bad_files.tsv              every skipped file with its reason (anatjax/data/bad_files.py)

One record is one item, a dict of numeric numpy arrays, stored without pickle:

  uint32 little-endian   length of the header
  header                 JSON [[name, dtype, shape], ...], dtype as numpy's `dtype.str`
                         (e.g. "|u1", "<f4"); only bool, integer and float dtypes
  data                   each array's bytes, C order, little-endian, in header order

Records are self-describing, so reading needs no schema, and the few hundred header bytes
are nothing next to an image. A run's data options must agree with those the folder was
prepared with (`CONTENT_OPTIONS`): anything else would silently train on other images,
labels or pixels than the config says.
"""

from __future__ import annotations

import json
import math
import os
import struct

import grain
import numpy as np

FORMAT = "anatjax-prepared-v1"
METADATA_NAME = "prepared.json"
SHARD_PATTERN = "shard-{:05d}.array_record"
# group_size:1 makes every record readable alone (Grain's random access needs it);
# uncompressed: 224 px phantoms read 4x faster than with the default (brotli) compression
# for 15% more bytes.
WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER_SIZE = struct.Struct("<I")
_STORABLE_KINDS = "biuf"  # bool, signed and unsigned integers, floats

# The data options that decide what a prepared folder holds, per source (file sources:
# the selection, labels and decoding of anatjax/data/radiographs.py and decode.py).
_FILE_OPTIONS = ("image_size", "selection", "uncertain", "mimic_labels", "split_file",
                 "split_labels", "intensity", "percentiles", "geometry")
CONTENT_OPTIONS = {"synthetic_cxr": ("image_size", "num_examples", "source_seed")}


def content_options(source_name: str, data_config) -> dict:
  """The options of `data_config` that decide what source `source_name` yields, as JSON
  values (tuples become lists, so that they compare equal to what was stored)."""
  names = CONTENT_OPTIONS.get(source_name, _FILE_OPTIONS)
  return json.loads(json.dumps({name: data_config[name] for name in names}))


# ------------------------------------------------------------------ records
def encode_item(item: dict) -> bytes:
  """A source item (dict of numeric arrays and numpy scalars) -> one record."""
  fields, blobs = [], []
  for name, value in item.items():
    array = np.asarray(value)
    if array.dtype.kind not in _STORABLE_KINDS:
      raise ValueError(f"item field {name!r} has dtype {array.dtype}: only bool, integer "
                       "and float arrays can be prepared")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    fields.append([name, array.dtype.str, list(array.shape)])
    blobs.append(array.tobytes())
  header = json.dumps(fields, separators=(",", ":")).encode()
  return b"".join([_HEADER_SIZE.pack(len(header)), header, *blobs])


def decode_item(record: bytes) -> dict:
  """One record -> the item it was made from (0-d arrays come back as numpy scalars)."""
  (header_size,) = _HEADER_SIZE.unpack_from(record)
  offset = _HEADER_SIZE.size + header_size
  item = {}
  for name, dtype_str, shape in json.loads(record[_HEADER_SIZE.size:offset]):
    dtype = np.dtype(dtype_str)
    if dtype.kind not in _STORABLE_KINDS:
      raise ValueError(f"record field {name!r} has dtype {dtype}: not a prepared record")
    count = math.prod(shape)
    # A copy: writable and aligned, like the arrays a source returns.
    array = np.frombuffer(record, dtype, count, offset).reshape(shape).copy()
    item[name] = array[()] if array.ndim == 0 else array
    offset += count * dtype.itemsize
  if offset != len(record):
    raise ValueError(f"record of {len(record)} bytes holds {offset} bytes of fields: "
                     "not a prepared record")
  return item


# ------------------------------------------------------------------ the source
class PreparedSource:
  """Grain random-access source over a prepared folder: item i is record i, with `index`
  (where the original items have it) = i, its position in this source."""

  def __init__(self, root: str, metadata: dict):
    self.root, self.metadata = root, metadata
    self.class_names = tuple(metadata["class_names"])
    self.description = (f"prepared {metadata['source']} {metadata['split']} "
                        f"({metadata['options']['image_size']} px) in {root}")
    paths = [os.path.join(root, name) for name in metadata["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{self.description}: shard files are missing, e.g. "
                              f"{missing[0]}; prepare the folder again.")
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != metadata["count"]:
      raise ValueError(f"{self.description}: the shards hold {len(self._records)} "
                       f"records, {METADATA_NAME} says {metadata['count']}; prepare the "
                       "folder again.")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, position):
    position = int(position)
    item = decode_item(self._records[position])
    if "index" in item:
      item["index"] = np.int64(position)
    return item

  def __repr__(self) -> str:
    return f"PreparedSource({self.description}, {len(self)} items)"


def read_metadata(root: str) -> dict:
  """The metadata of the prepared folder `root`; fails naming what was expected."""
  expected = ("a folder written by `python -m anatjax.data.prepare` (with "
              f"{METADATA_NAME} and shard-*.array_record files)")
  if not root:
    raise ValueError("config data.source=prepared reads files: set data.root to "
                     f"{expected}.")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config data.root={root!r} is not a folder; expected "
                            f"{expected}.")
  path = os.path.join(root, METADATA_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config data.root={root!r} has no {METADATA_NAME}: it is not "
                            f"(or not yet completely) {expected}.")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e}); expected {expected}.") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    found = metadata.get("format") if isinstance(metadata, dict) else None
    raise ValueError(f"{path} is not the metadata of a prepared folder (format {found!r}, "
                     f"expected {FORMAT!r}).")
  return metadata


def check_options(metadata: dict, data_config, split: str, root: str) -> None:
  """Raises ValueError naming every data option (and the split) in which the run's
  config differs from the preparation."""
  prepared = metadata["options"]
  if data_config.image_size != prepared["image_size"]:
    raise ValueError(
        f"config data.image_size={data_config.image_size} but {root} was prepared at "
        f"image_size={prepared['image_size']}: set data.image_size="
        f"{prepared['image_size']} or prepare again with --image_size="
        f"{data_config.image_size}.")
  wanted = content_options(metadata["source"], data_config)
  differences = [f"data.{name}={wanted[name]!r} (prepared with {value!r})"
                 for name, value in prepared.items() if wanted[name] != value]
  if split != metadata["split"]:
    differences.append(f"split {split!r} (prepared: {metadata['split']!r})")
  if differences:
    raise ValueError(f"{root} holds {metadata['source']} prepared with other options than "
                     f"the config asks for: {'; '.join(differences)}. Set them as prepared "
                     "or prepare again with these.")


def prepared(data_config, split: str) -> PreparedSource:
  """The `prepared` source: the folder at data.root, checked against the run's options."""
  root = data_config.root
  metadata = read_metadata(root)
  check_options(metadata, data_config, split, root)
  return PreparedSource(root, metadata)
