"""One way to write an export: a safetensors file whose header metadata holds `info`
(every value JSON-encoded, so strings like "007" stay strings) and the same `info` as
readable JSON in OUT.json beside it."""

from __future__ import annotations

import json
import os

import safetensors.numpy


def save(tensors: dict, out: str, info: dict) -> dict:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  safetensors.numpy.save_file(
      tensors, out, metadata={k: json.dumps(v, default=str) for k, v in info.items()})
  with open(out + ".json", "w") as f:
    json.dump(info, f, indent=2, default=str)
  return info
