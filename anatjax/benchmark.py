"""Throughput: `python -m anatjax.benchmark [--variant=B/16] [--batch=8] [--out=FILE.json]`.

Measures in one process, after compilation and warm-up, as medians over interleaved
repeats (whole-process speed drifts by tens of percent from minute to minute on shared
machines, so only numbers measured side by side are compared):
- a plain ViT train step (the same encoder, a simple loss, AdamW) and the full train step
  of the configured method (AFiRe by default): images/s, FLOPs per image from XLA's cost
  analysis, achieved FLOP/s, and utilisation against this machine's dense matmul rate
  measured in the same run; compiled memory per device;
- the host pipeline alone: images/s per worker for the synthetic source + the method's
  host transforms, for JPEG and PNG decoding + resize + the same transforms, and for the
  Grain pipeline with N worker processes; and the ratio of that rate to the device's;
- the 3D host pipeline (DrasCLR): patches/s per worker and through Grain with N workers
  for the atlas patch store's reading and augmentation (anatjax/data/patch_views.py), at
  --ct_patch_size, on a temporary store of random HU patches (the cost does not depend on
  the content), and phantom CT volumes/s per worker at --ct_volume_size;
- Alice's pair mining (alice.md 2.2, 2.5: the acceptance rule, two --alice_crop crops and
  two student masks): pairs/s per worker, on those phantoms.
Prints a table and writes JSON, one entry per measurement.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from anatjax import train
from anatjax.config import compute_dtype
from anatjax.data import (alice_pairs, correspondence, ct_patches, patch_views, pipeline,
                          registration, synthetic_ct)
from anatjax.methods.common import normalize
from anatjax.models.vit import ViT, parse_variant

def define_flags():
  """The command's flags (defined only when run as a command, so that importing this
  module next to other commands does not clash over names like --config)."""
  config_flags.DEFINE_config_file(
      "config", "configs/afire_vitb.py", "The recipe whose train step is measured.",
      lock_config=True)
  flags.DEFINE_string("variant", None, "ViT variant (default: the config's).")
  flags.DEFINE_integer("batch", 8, "Batch size of the measured steps.")
  flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (median taken).")
  flags.DEFINE_integer("steps", 2, "Steps per timing round.")
  flags.DEFINE_integer("workers", None, "Grain workers (default: the config's).")
  flags.DEFINE_integer("host_images", 200, "Images per host measurement.")
  flags.DEFINE_integer("decode_size", 1024, "Side of the encoded JPEG/PNG images decoded.")
  flags.DEFINE_integer("ct_patch_size", 32, "Patch edge of the 3D pipeline measurement.")
  flags.DEFINE_integer("ct_volume_size", 128, "Phantom CT grid of the 3D measurements.")
  flags.DEFINE_integer("alice_crop", 64, "Crop edge of Alice's pair mining measurement.")
  flags.DEFINE_string("out", None, "Write the measurements to this JSON file.")


def timed(fn, repeats_out: list):
  start = time.perf_counter()
  fn()
  repeats_out.append(time.perf_counter() - start)


def compiled_stats(compiled, batch: int) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {"flops_per_image": float(cost["flops"]) / batch, "peak_bytes": peak}


class DeviceBench:
  """A compiled step and the arrays it runs on; `run(n)` does n steps and waits."""

  def __init__(self, name, step_fn, state, batch, batch_size):
    self.name, self.batch_size = name, batch_size
    self.compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batch).compile()
    self.stats = compiled_stats(self.compiled, batch_size)
    self.state, self.batch, self.times = state, batch, []

  def run(self, steps: int) -> None:
    def go():
      for _ in range(steps):
        self.state, out = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, out))
    timed(go, self.times)


def method_bench(config, batch_size: int) -> tuple[DeviceBench, object, object]:
  """The configured method's full train step on one device, on a real host batch."""
  source, _, method = train.build(config)
  state = jax.jit(train.state_initializer(method))(jax.random.key(0))
  batch = next(iter(pipeline.make_dataset(source, method.host_transforms,
                                          batch_size=batch_size, seed=0)))
  step = train.make_train_step(method, jax.random.key(1))
  return DeviceBench(f"{method.name}_train_step", step, state, batch, batch_size), \
      source, method


def plain_vit_bench(config, batch) -> DeviceBench:
  """The same encoder with a trivial loss and plain AdamW: the speed to match."""
  vit = parse_variant(config.model.variant, config.model.depth)
  encoder = ViT(**vit, dtype=compute_dtype(config.model.dtype))
  channels = config.model.channels
  images = normalize(jnp.asarray(batch["x_clean"]), channels)
  params = jax.jit(encoder.init)(jax.random.key(0), images[:1])["params"]
  optimizer = optax.adamw(1e-4, weight_decay=0.05)

  def step(state, batch):
    def loss_fn(params):
      tokens = encoder.apply({"params": params}, normalize(batch, channels))
      return jnp.mean(jnp.square(tokens))
    grads = jax.grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}

  state = {"params": params, "opt_state": optimizer.init(params)}
  return DeviceBench("plain_vit_train_step", lambda s, b: (step(s, b), None), state,
                     jnp.asarray(batch["x_clean"]), images.shape[0])


class MatmulBench:
  """This machine's dense float32 matmul rate, the denominator of utilisation."""
  name = "matmul_f32"

  def __init__(self, n: int = 2048):
    self.n = n
    self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    self.fn = jax.jit(lambda a: a @ a)
    self.fn(self.a).block_until_ready()
    self.times = []

  def run(self, steps: int) -> None:
    def go():
      for _ in range(4 * steps):
        out = self.fn(self.a)
      out.block_until_ready()
    timed(go, self.times)
    self.times[-1] /= 4 * steps

  def flops_per_s(self) -> float:
    return 2 * self.n ** 3 / statistics.median(self.times)


def host_rate(items, host_transforms, count: int) -> float:
  """Images/s of one worker: item -> the method's host transforms, in this process."""
  rng = np.random.default_rng(0)
  pipeline.transform_one(items(0), host_transforms, rng)  # warm caches
  start = time.perf_counter()
  for i in range(count):
    pipeline.transform_one(items(i), host_transforms, rng)
  return count / (time.perf_counter() - start)


def encoded_images(source, count: int, side: int, ext: str) -> list[bytes]:
  """Phantom radiographs at `side` px, encoded as they would sit on disk."""
  out = []
  for i in range(count):
    image = cv2.resize(source[i]["image"], (side, side), interpolation=cv2.INTER_LINEAR)
    ok, data = cv2.imencode(ext, image)
    assert ok
    out.append(data.tobytes())
  return out


def decode(data: bytes) -> dict:
  return {"image": cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)}


def grain_rate(source, host_transforms, batch_size: int, workers: int, count: int) -> float:
  """Images/s of the real Grain pipeline with `workers` processes, after start-up."""
  iterator = iter(pipeline.make_dataset(source, host_transforms, batch_size=batch_size,
                                        seed=0, num_workers=workers))
  for _ in range(2 * max(workers, 1)):
    next(iterator)
  batches = max(1, count // batch_size)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * batch_size / (time.perf_counter() - start)
  iterator.close()
  return rate


def ct_host_rates(patch_size: int, volume_size: int, alice_crop: int, workers: int,
                  count: int) -> dict:
  """3D host rates (module doc): name -> per-second rate."""
  with tempfile.TemporaryDirectory() as root:
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]) * patch_size
    ct_patches.Atlas(corners, corners.astype(np.float32), np.array([[1, 2], [0, 3], [0, 3],
                                                                    [0, 1]]),
                     patch_size, 1.0, "benchmark").save(root)
    for i in range(len(corners)):
      np.save(ct_patches.location_file(root, i),
              rng.integers(-1024, 1500, (32,) + (patch_size,) * 3).astype(np.int16))
    with open(os.path.join(root, ct_patches.SUBJECTS_FILE), "w") as f:
      json.dump([str(i) for i in range(32)], f)
    with open(os.path.join(root, ct_patches.STORE_FILE), "w") as f:
      json.dump({"options": {}}, f)
    source = ct_patches.LocationBlockedPatches(root)
    views = (patch_views.DrasCLRViews(patch_views.PatchAugment()),)
    per_item = 4      # two anchor views and two neighbours
    rates = {"host_ct_patches_per_worker": per_item * host_rate(
        lambda i: source[i % len(source)], views, count)}
    rates[f"host_ct_patches_grain_{workers}_workers"] = per_item * grain_rate(
        source, views, 8, workers, count)
  start = time.perf_counter()
  phantoms = [synthetic_ct.subject(0, i, shape=(volume_size,) * 3).image for i in range(3)]
  rates[f"host_synthetic_ct{volume_size}_per_worker"] = len(phantoms) / (
      time.perf_counter() - start)
  rates[f"host_alice_pairs{alice_crop}_per_worker"] = alice_pair_rate(phantoms, alice_crop,
                                                                      count)
  return rates


def alice_pair_rate(images, crop: int, count: int) -> float:
  """Alice's pair mining (acceptance rule, two crops, two masks) per second in one worker,
  on in-memory phantoms with identity maps to the atlas (the mining cost does not depend on
  the maps; training reads memory-mapped volumes)."""
  identity = registration.PointMap(np.eye(3), np.zeros(3))
  caches = [correspondence.AffineCache(image, correspondence.body_mask(image).array,
                                       identity) for image in images]
  pairs = [{"a": a, "b": b} for a, b in zip(caches, caches[1:] + caches[:1])]
  mine = (alice_pairs.MinePairs(correspondence.AffineMatcher(), crop),)
  return host_rate(lambda i: pairs[i % len(pairs)], mine, count)


def run(config, *, batch: int, repeats: int, steps: int, workers: int, host_images: int,
        decode_size: int, ct_patch_size: int = 32, ct_volume_size: int = 128,
        alice_crop: int = 64) -> list[dict]:
  """All measurements for `config` at `batch` on the first device; see the module doc."""
  device = jax.devices()[0]
  print(f"Benchmarking {config.method} {config.model.variant} at "
        f"{config.data.image_size} px, batch {batch}, model.dtype={config.model.dtype}, "
        f"on {device.platform} ({device.device_kind}), {jax.device_count()} device(s).",
        flush=True)

  # Device: compile everything first, warm up, then interleave the timed rounds.
  method_b, source, method = method_bench(config, batch)
  plain_b = plain_vit_bench(config, method_b.batch)
  matmul = MatmulBench()
  benches = (plain_b, method_b)
  for b in benches:
    b.run(1)
    b.times.clear()
  for _ in range(repeats):
    for b in (*benches, matmul):
      b.run(steps)
  peak = matmul.flops_per_s()
  common = {"variant": config.model.variant, "batch": batch,
            "dtype": str(jnp.dtype(compute_dtype(config.model.dtype)))}
  empty = {"images_per_s": None, "flops_per_image": None, "achieved_flops": None,
           "mfu": None, "peak_bytes": None}
  results = [{"name": matmul.name, **common, **empty, "achieved_flops": peak, "mfu": 1.0}]
  for b in benches:
    images_per_s = b.batch_size * steps / statistics.median(b.times)
    achieved = images_per_s * b.stats["flops_per_image"]
    results.append({"name": b.name, **common, "images_per_s": images_per_s,
                    "achieved_flops": achieved, "mfu": achieved / peak, **b.stats})
  device_rate = results[-1]["images_per_s"]

  # Host: one worker (this process), then the Grain pipeline with worker processes.
  host = method.host_transforms
  rates = {"host_synthetic_per_worker": host_rate(source.__getitem__, host, host_images)}
  for ext in (".jpg", ".png"):
    blobs = encoded_images(source, 16, decode_size, ext)
    rates[f"host_decode_{ext[1:]}{decode_size}_per_worker"] = host_rate(
        lambda i, blobs=blobs: decode(blobs[i % len(blobs)]), host, host_images)
  pipeline_name = f"host_synthetic_grain_{workers}_workers"
  rates[pipeline_name] = grain_rate(source, host, batch, workers, host_images)
  for name, rate in rates.items():
    results.append({"name": name, **common, **empty, "images_per_s": rate})
  results.append({"name": "host_to_device_ratio", **common, **empty,
                  "ratio": rates[pipeline_name] / device_rate})
  for name, rate in ct_host_rates(ct_patch_size, ct_volume_size, alice_crop, workers,
                                  host_images).items():
    unit = ("volumes/s" if "synthetic_ct" in name else
            "pairs/s" if "alice" in name else "patches/s")
    results.append({"name": name, **common, **empty, "images_per_s": rate, "unit": unit})
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  config = args.config
  config.unlock()
  if args.variant:
    config.model.variant = args.variant
    config.model.depth = 0
  config.batch_size = args.batch
  config.mesh.data, config.mesh.fsdp = 1, 1
  results = run(config, batch=args.batch, repeats=args.repeats, steps=args.steps,
                workers=(config.data.num_workers if args.workers is None else args.workers),
                host_images=args.host_images, decode_size=args.decode_size,
                ct_patch_size=args.ct_patch_size, ct_volume_size=args.ct_volume_size,
                alice_crop=args.alice_crop)
  print(format_table(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"Wrote {args.out}")


def format_table(results) -> str:
  def fmt(value, scale=1.0, digits=1):
    return "-" if value is None else f"{value / scale:.{digits}f}"
  lines = [f"{'measurement':36} {'/s':>9} {'GFLOP/img':>10} {'GFLOP/s':>9} "
           f"{'MFU':>6} {'peak MiB':>9}"]
  for r in results:
    if "ratio" in r:
      lines.append(f"{r['name']:36} {r['ratio']:9.2f}x")
      continue
    lines.append(f"{r['name']:36} {fmt(r['images_per_s']):>9} "
                 f"{fmt(r['flops_per_image'], 1e9, 2):>10} "
                 f"{fmt(r['achieved_flops'], 1e9):>9} {fmt(r['mfu'], 1, 2):>6} "
                 f"{fmt(r['peak_bytes'], 2 ** 20):>9}")
  return "\n".join(lines)


if __name__ == "__main__":
  define_flags()
  app.run(main)
