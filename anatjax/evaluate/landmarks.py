"""Centre-sensitive one-shot landmark localisation with an LD network (spec 7.1).

[inferred] The paper names "centre-sensitive averaging" and shows matching against one
labelled support image; no code was released. This is anatjax's reconstruction, as the
spec fixes it:
  1. per-pixel embeddings v of the support S and of every query Q (the LD U-Net in
     inference mode, BatchNorm running statistics);
  2. the centre-sensitive field v' = L2norm(G * v / G * 1): an isotropic Gaussian, sigma
     = size / 32 (16 px at 512), truncated to a size / 8 window (65 px at 512: odd, so
     centred on a pixel), normalised at the borders;
  3. for each landmark t of the support, the query's prediction is the pixel maximising
     v'_Q(p) . v'_S(t) (landmarks independently).
Error: radial distance in pixels, reported at 512 x 512 scale (the spec's metric) and
success within 10 / 20 / 40 px there.

Synthetic protocol: labelled synthetic radiographs with landmarks derived from their
anatomy maps (`phantom_landmarks`); mean +- std over `num_supports` support images drawn
with fixed seeds, each predicting the landmarks of the same `num_queries` query images.
Reference without any network: predicting the support's own coordinates (the phantoms
are roughly aligned, so this is a strong baseline, and it is reported as such).

  python -m anatjax.evaluate.landmarks --init=RUN_DIR [--workdir=OUT]
  python -m anatjax.evaluate.landmarks --init=RUN_DIR --support=S.png \
      --support_points=points.json --queries=DIR [--truth=truth.json]
points.json: {"landmark": [x, y], ...} in the support image's pixels; truth.json:
{"query file name": {"landmark": [x, y]}}. Writes OUT/predictions.csv (query,
landmark, x, y in the query's own pixels), OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from anatjax.data import decode
from anatjax.data.synthetic_cxr import ANATOMY_NAMES, SyntheticCXR
from anatjax.methods.ld import image_input, load_run
from anatjax.models.unet import LDUNet

LANDMARKS = ("heart_centre", "right_lung_apex", "left_lung_apex",
             "right_costophrenic_angle", "left_costophrenic_angle")
SUCCESS_RADII = (10, 20, 40)   # pixels at 512 x 512
REFERENCE_SIZE = 512


# ------------------------------------------------------------------ phantom landmarks
def phantom_landmarks(anatomy: np.ndarray) -> np.ndarray:
  """[L, 2] (x, y) pixel coordinates of LANDMARKS from a synthetic anatomy map.

  heart centre: x = the heart's mean column, y = the mean row of its pixels in that
  column (the spec's JSRT/SCR rule); lung apex: the mean column of the lung's top row;
  costophrenic angle: the lung pixel furthest down and out (max y - x for the lung on
  the image left, the patient's right; max y + x for the other), mean of ties.
  """
  def where(name):
    ys, xs = np.nonzero(anatomy == ANATOMY_NAMES.index(name))
    if not len(ys):
      raise ValueError(f"the anatomy map has no {name}")
    return ys.astype(np.float64), xs.astype(np.float64)

  ys, xs = where("heart")
  column = int(round(xs.mean()))
  in_column = ys[xs == column]
  points = [(xs.mean(), in_column.mean() if len(in_column) else ys.mean())]
  lungs = {side: where(f"{side}_lung") for side in ("right", "left")}
  for side in ("right", "left"):
    ys, xs = lungs[side]
    top = ys == ys.min()
    points.append((xs[top].mean(), ys.min()))
  for side, lateral in (("right", -1.0), ("left", 1.0)):
    ys, xs = lungs[side]
    score = ys + lateral * xs
    best = score == score.max()
    points.append((xs[best].mean(), ys[best].mean()))
  return np.asarray(points, np.float32)


# ------------------------------------------------------------------ the field
def gaussian_window(size: int) -> np.ndarray:
  """The 1-D Gaussian of the centre-sensitive field: sigma size/32, width size/8 made odd
  (65 at 512) so that it is centred on a pixel."""
  sigma, half = size / 32.0, max(0, size // 16)
  offsets = np.arange(-half, half + 1, dtype=np.float64)
  return np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)


def _blur(x, kernel):
  """Separable 'same' convolution of [N, H, W, C] with the 1-D kernel along H and W,
  zero padding."""
  channels = x.shape[-1]
  k = jnp.asarray(kernel)
  for axis_kernel in (k[:, None], k[None, :]):
    filt = jnp.tile(axis_kernel[:, :, None, None], (1, 1, 1, channels))
    x = jax.lax.conv_general_dilated(
        x, filt, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
  return x


@functools.partial(jax.jit, static_argnames="size")
def centre_sensitive(embeddings, size: int):
  """v' = L2norm((G * v) / (G * 1)) for embeddings [N, H, W, D] of size x size images."""
  kernel = gaussian_window(size)
  ones = jnp.ones(embeddings.shape[:3] + (1,), jnp.float32)
  field = _blur(embeddings.astype(jnp.float32), kernel) / _blur(ones, kernel)
  return field / (jnp.linalg.norm(field, axis=-1, keepdims=True) + 1e-10)


def locate(support_field, points, query_fields) -> np.ndarray:
  """[Q, L, 2] (x, y): per query and landmark the pixel whose field best matches the
  support's field at the landmark (points [L, 2] (x, y) in support pixels)."""
  size = support_field.shape[0]
  xs = np.clip(np.round(points[:, 0]).astype(int), 0, size - 1)
  ys = np.clip(np.round(points[:, 1]).astype(int), 0, size - 1)
  templates = np.asarray(support_field)[ys, xs]                       # [L, D]
  scores = jnp.einsum("qhwd,ld->qlhw", query_fields, templates)
  flat = np.asarray(jnp.argmax(scores.reshape(*scores.shape[:2], -1), -1))
  return np.stack([flat % size, flat // size], -1).astype(np.float32)


# ------------------------------------------------------------------ the network
class LDEmbedder:
  """images uint8 [N, S, S(, C)] -> centre-sensitive fields [N, S, S, D]."""

  def __init__(self, variables, num_clusters: int, channels: int, description: str,
               trained_size: int):
    self.variables, self.channels, self.description = variables, channels, description
    self.trained_size = trained_size   # the crops it was trained on: the default size
    model = LDUNet(num_clusters=num_clusters)
    self._embed = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])

  @classmethod
  def from_run(cls, run_dir: str, step: int | None = None) -> LDEmbedder:
    config, variables, step = load_run(run_dir, step, "landmark localisation")
    return cls(variables, config.ld.num_clusters, config.model.channels,
               f"LD stage {config.ld.stage} run {os.path.abspath(run_dir)} step {step}",
               config.ld.crop_size)

  @classmethod
  def random(cls, size: int, seed: int = 0, num_clusters: int = 16) -> LDEmbedder:
    model = LDUNet(num_clusters=num_clusters)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(seed), jnp.zeros((1, size, size, 1)))
    return cls(variables, num_clusters, 1, f"random LD U-Net (seed {seed})", size)

  def fields(self, images: np.ndarray, batch_size: int = 8) -> jax.Array:
    size = images.shape[1]
    out = []
    for start in range(0, len(images), batch_size):
      x = image_input(images[start:start + batch_size], self.channels)
      out.append(centre_sensitive(self._embed(self.variables, x), size))
    return jnp.concatenate(out)


# ------------------------------------------------------------------ scoring
def radial_errors(predicted, truth, size: int) -> np.ndarray:
  """[..., L] distances in pixels at REFERENCE_SIZE scale."""
  return np.linalg.norm(predicted - truth, axis=-1) * (REFERENCE_SIZE / size)


def summarise(errors: np.ndarray) -> dict:
  """errors [supports, queries, L] -> mean +- std over supports of the mean radial error,
  per landmark and overall, and success rates."""
  per_support = errors.mean(axis=1)                                   # [S, L]
  out = {"mean_radial_error": float(per_support.mean(1).mean()),
         "mean_radial_error_std": float(per_support.mean(1).std()),
         "per_landmark": {name: float(per_support[:, l].mean())
                          for l, name in enumerate(LANDMARKS)}}
  for radius in SUCCESS_RADII:
    out[f"success_{radius}px"] = float((errors <= radius).mean())
  return out


def synthetic_protocol(embedder: LDEmbedder | None, size: int, num_queries: int = 64,
                       num_supports: int = 5, seed: int = 0, source_seed: int = 0) -> dict:
  """{"ld": ..., "support_coordinates": ...} on labelled synthetic radiographs (module
  docstring). `embedder` None scores only the reference."""
  rng = np.random.default_rng([seed, 0x1A4D])
  pool = SyntheticCXR("labelled", image_size=size, num_examples=num_queries + 1000,
                      seed=source_seed)
  queries = [pool[i] for i in range(num_queries)]
  supports = [pool[int(i)] for i in rng.choice(np.arange(num_queries, num_queries + 1000),
                                               num_supports, replace=False)]
  truth = np.stack([phantom_landmarks(q["anatomy"]) for q in queries])       # [Q, L, 2]
  support_points = np.stack([phantom_landmarks(s["anatomy"]) for s in supports])
  results = {"reference": summarise(radial_errors(support_points[:, None], truth[None], size))}
  if embedder is not None:
    query_fields = embedder.fields(np.stack([q["image"] for q in queries]))
    support_fields = embedder.fields(np.stack([s["image"] for s in supports]))
    predicted = np.stack([locate(support_fields[s], support_points[s], query_fields)
                          for s in range(num_supports)])
    results["ld"] = summarise(radial_errors(predicted, truth[None], size))
  return results


# ------------------------------------------------------------------ files
def predict_folder(embedder: LDEmbedder, size: int, support: str, points: dict,
                   queries: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
  """{query path: {landmark: (x, y) in the query's own pixels}}. Coordinates in files are
  continuous pixel coordinates (the top-left corner of the image is (0, 0), a pixel's
  centre is at +0.5), moved through decoding's placement (resize, pad or crop)."""
  options = decode.DecodeOptions(size=size)
  names = list(points)
  image, placement = options.load(support)
  scaled = np.array([[points[n][0] * placement.scale_x + placement.offset_x - 0.5,
                      points[n][1] * placement.scale_y + placement.offset_y - 0.5]
                     for n in names], np.float32)
  support_field = embedder.fields(image[None])[0]
  out = {}
  for path in queries:
    query, where = options.load(path)
    found = locate(support_field, scaled, embedder.fields(query[None]))[0]
    out[path] = {n: (float((x + 0.5 - where.offset_x) / where.scale_x),
                     float((y + 0.5 - where.offset_y) / where.scale_y))
                 for n, (x, y) in zip(names, found)}
  return out


def write_predictions(path: str, predictions: dict) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["query", "landmark", "x", "y"])
    for query, found in predictions.items():
      for name, (x, y) in found.items():
        writer.writerow([os.path.basename(query), name, f"{x:.2f}", f"{y:.2f}"])


def folder_errors(predictions: dict, truth: dict) -> dict:
  """Radial errors in the queries' own pixels for every (query, landmark) in `truth`."""
  errors = {}
  for query, found in predictions.items():
    for name, point in truth.get(os.path.basename(query), {}).items():
      if name in found:
        errors[f"{os.path.basename(query)}/{name}"] = math.dist(found[name], point)
  return errors


def markdown(results: dict) -> str:
  lines = [f"# One-shot landmarks: {results['encoder']}", ""]
  if "synthetic" in results:
    syn = results["synthetic"]
    lines += [f"Synthetic radiographs at {results['size']} px, {results['num_queries']} "
              f"queries, {results['num_supports']} supports; errors in px at 512 x 512.", "",
              "| predictor | mean radial error | " + " | ".join(
                  f"within {r} px" for r in SUCCESS_RADII) + " | " +
              " | ".join(LANDMARKS) + " |",
              "|---" * (2 + len(SUCCESS_RADII) + len(LANDMARKS)) + "|"]
    for name, title in (("ld", "LD field match"), ("reference", "support coordinates")):
      if name in syn:
        s = syn[name]
        lines.append(f"| {title} | {s['mean_radial_error']:.1f} ± "
                     f"{s['mean_radial_error_std']:.1f} | " +
                     " | ".join(f"{s[f'success_{r}px']:.2f}" for r in SUCCESS_RADII) +
                     " | " + " | ".join(f"{s['per_landmark'][n]:.1f}" for n in LANDMARKS) +
                     " |")
  if results.get("errors"):
    values = list(results["errors"].values())
    lines += ["", f"Folder: mean radial error {np.mean(values):.2f} px over {len(values)} "
              "points (the queries' own pixels)."]
  return "\n".join(lines) + "\n"


def run(init: str | LDEmbedder, workdir: str, *, size: int | None = None,
        num_queries: int = 64, num_supports: int = 5, support: str = "",
        support_points: str = "", queries: str = "", truth: str = "", log=print) -> dict:
  """The command (module docstring): the synthetic protocol, or a folder of queries.
  `init`: an LD run directory, 'random', or an LDEmbedder."""
  def check(size):
    if size % 16:
      raise ValueError(f"--size={size}: the U-Net needs a multiple of 16")
    return size

  if isinstance(init, LDEmbedder):
    embedder = init
    size = check(size or embedder.trained_size)
  elif init == "random":
    size = check(size or 64)
    embedder = LDEmbedder.random(size)
  else:
    embedder = LDEmbedder.from_run(init)
    size = check(size or embedder.trained_size)
  os.makedirs(workdir, exist_ok=True)
  results = {"encoder": embedder.description, "size": size}
  if support:
    with open(support_points) as f:
      points = json.load(f)
    files = sorted(os.path.join(queries, n) for n in os.listdir(queries)
                   if decode.is_image_file(n))
    if not files:
      raise FileNotFoundError(f"--queries={queries!r}: no image files")
    predictions = predict_folder(embedder, size, support, points, files)
    write_predictions(os.path.join(workdir, "predictions.csv"), predictions)
    if truth:
      with open(truth) as f:
        results["errors"] = folder_errors(predictions, json.load(f))
  else:
    results.update(num_queries=num_queries, num_supports=num_supports,
                   synthetic=synthetic_protocol(embedder, size, num_queries, num_supports))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results))
  log(markdown(results))
  return results


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  workdir = f.workdir or (os.path.join(f.init, "landmarks") if os.path.isdir(f.init)
                          else os.path.join("workdirs", "landmarks_random"))
  try:
    run(f.init, workdir, size=f.size, num_queries=f.num_queries, num_supports=f.num_supports,
        support=f.support, support_points=f.support_points, queries=f.queries, truth=f.truth)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"Error: {e}") from e
  print(f"Outputs in {os.path.abspath(workdir)}")


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("init", None, "An LD run directory, or 'random'.", required=True)
  flags.DEFINE_string("workdir", None, "Output folder (default RUN_DIR/landmarks).")
  flags.DEFINE_integer("size", None, "Image size (default: the run's crop size).")
  flags.DEFINE_integer("num_queries", 64, "Synthetic protocol: query images.")
  flags.DEFINE_integer("num_supports", 5, "Synthetic protocol: support images (seeds).")
  flags.DEFINE_string("support", "", "A support image file (folder mode).")
  flags.DEFINE_string("support_points", "", "JSON {landmark: [x, y]} of the support.")
  flags.DEFINE_string("queries", "", "A folder of query images (folder mode).")
  flags.DEFINE_string("truth", "", "JSON {query file: {landmark: [x, y]}} (optional).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
