r"""How well a correspondence provider finds the same anatomy in another patient
(alice.md 2.2-2.3, open question 5), measured on phantom pairs with known organs.

  python -m anatjax.evaluate.correspondence --out=runs/correspondence \
      --num_pairs=12 --synthetic_size=96 --spacing_mm=4
  # provider (a): the dense embedding of a trained anatomy_embedding run
  python -m anatjax.evaluate.correspondence --provider=embedding --run=runs/embedding \
      --out=runs/correspondence_embedding

For a population of synthetic CTs (anatjax/data/synthetic_ct.py; a seed apart from
pretraining's), each resampled to `spacing_mm` and `prepare`d by the provider (`affine`,
provider (b): affine registration to the median-body atlas, exactly as the volume store
does; `embedding`, provider (a): the fields of the run's model, on the grid it was trained
on), every pair (i, i + 1):
- organ centroids of A matched into B: error in mm to B's own centroid, against the
  scanner-coordinate baseline (the same physical point in B: what cropping at equal
  coordinates would give);
- pairs mined by the acceptance rule (`--mined_per_pair` each, the training miner's
  `find_pair`): the weak-pair rate and the organ-label agreement of p in A and q in B,
  against the chance agreement of a random body voxel of B.
Writes results.json, results.md and matches.png (two patients with matched centroids).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from anatjax.data import correspondence, slice_figures, synthetic_ct
from anatjax.data.volume import resample

ORGANS = ("heart", "aorta", "liver", "spleen", "stomach", "kidney_right", "kidney_left")
# Labels that name no organ: agreement counts voxels of the same organ only.
NOT_ORGANS = ("background", "body", "fat")


def phantom(seed: int, index: int, size: int, spacing_mm: float):
  """(CT, labels) of one synthetic subject at `spacing_mm`."""
  ct = synthetic_ct.subject(seed, index, shape=(size,) * 3)
  image = resample(ct.image, spacing_mm, order=1)
  return image, resample(ct.labels, spacing_mm, order=0, cval=0).array


def centroids(labels: np.ndarray) -> dict:
  """Organ name -> centroid voxel (z, y, x), for the organs present."""
  out = {}
  for name in ORGANS:
    voxels = np.argwhere(labels == synthetic_ct.LABEL_NAMES.index(name))
    if len(voxels):
      out[name] = voxels.mean(0)
  return out


def centroid_errors(provider, cache_a, cache_b, labels_a, labels_b) -> dict:
  """Organ -> (matched error mm, scanner-coordinate error mm)."""
  ca, cb = centroids(labels_a), centroids(labels_b)
  names = [n for n in ORGANS if n in ca and n in cb]
  points = np.rint([ca[n] for n in names]).astype(int)
  q, _ = provider.match_many(cache_a, points, cache_b)
  spacing = np.asarray(cache_b.image.spacing)
  same_point = cache_b.image.point_to_index(cache_a.image.index_to_point(points))
  out = {}
  for i, name in enumerate(names):
    out[name] = (float(np.linalg.norm((q[i] - cb[name]) * spacing)),
                 float(np.linalg.norm((same_point[i] - cb[name]) * spacing)))
  return out


def organ_agreement(labels_a, p, labels_b, q) -> tuple[int, int]:
  """(1 if p and q lie in the same organ else 0, 1 if p lies in an organ at all)."""
  organ_ids = [i for i, n in enumerate(synthetic_ct.LABEL_NAMES) if n not in NOT_ORGANS]
  label = labels_a[tuple(p)]
  in_organ = int(label in organ_ids)
  return int(in_organ and labels_b[tuple(q)] == label), in_organ


def chance_agreement(labels_a, body_b, labels_b, rng, count: int = 2000) -> float:
  """Agreement when q is a random body voxel of B: P(label_B(q) = label_A(p)), p an organ
  voxel drawn from A's organ voxels in proportion."""
  organ_ids = [i for i, n in enumerate(synthetic_ct.LABEL_NAMES) if n not in NOT_ORGANS]
  a = labels_a[np.isin(labels_a, organ_ids)]
  b = labels_b[body_b]
  return float(np.mean(rng.choice(a, count) == rng.choice(b, count)))


def evaluate(args, say=print):
  """(results, volumes, provider caches, provider) for the options `args` (module doc)."""
  start = time.time()
  volumes = [phantom(args.population_seed, i, args.synthetic_size, args.spacing_mm)
             for i in range(args.num_pairs + 1)]
  bodies = [correspondence.body_mask(image).array for image, _ in volumes]
  if args.provider == "embedding":
    from anatjax.methods import anatomy_embedding  # pylint: disable=g-import-not-at-top
    provider, step = anatomy_embedding.load_provider(args.run, args.step)
    caches = [provider.prepare(image) for image, _ in volumes]
    say(f"Embedded {len(caches)} phantoms with {args.run} step {step} in "
        f"{time.time() - start:.0f} s")
  else:
    sizes = np.array([b.sum() for b in bodies])
    atlas = int(np.argmin(np.abs(sizes - np.median(sizes))))   # the median body, as stores do
    provider = correspondence.AffineProvider(volumes[atlas][0], args.score_mode,
                                             args.iterations)
    caches = [provider.prepare(image, body) for (image, _), body in zip(volumes, bodies)]
    say(f"Registered {len(caches)} phantoms to the atlas in {time.time() - start:.0f} s")
  rng = np.random.default_rng(args.population_seed)
  errors = {n: [] for n in ORGANS}
  mined = {"pairs": 0, "weak": 0, "agree": 0, "in_organ": 0, "chance": []}
  for i in range(args.num_pairs):
    la, lb = volumes[i][1], volumes[i + 1][1]
    for name, pair in centroid_errors(provider, caches[i], caches[i + 1], la, lb).items():
      errors[name].append(pair)
    for _ in range(args.mined_per_pair):
      p, q, _, accepted = correspondence.find_pair(provider, caches[i], caches[i + 1], rng)
      agree, in_organ = organ_agreement(la, p, lb, q)
      mined["pairs"] += 1
      mined["weak"] += int(not accepted)
      mined["agree"] += agree
      mined["in_organ"] += in_organ
    mined["chance"].append(chance_agreement(la, bodies[i + 1], lb, rng))
  results = {
      "setup": {k: v for k, v in vars(args).items() if k != "out"},
      "organs": {n: {"matched_mm_mean": float(np.mean([e[0] for e in v])),
                     "matched_mm_median": float(np.median([e[0] for e in v])),
                     "same_point_mm_mean": float(np.mean([e[1] for e in v])),
                     "pairs": len(v)}
                 for n, v in errors.items() if v},
      "mining": {"pairs": mined["pairs"], "weak_rate": mined["weak"] / mined["pairs"],
                 "organ_agreement": mined["agree"] / max(mined["in_organ"], 1),
                 "points_in_organs": mined["in_organ"],
                 "chance_agreement": float(np.mean(mined["chance"]))},
      "seconds": time.time() - start,
  }
  return results, volumes, caches, provider


def markdown(results: dict) -> str:
  lines = ["| organ | matched error, mm (mean / median) | same scanner point, mm (mean) |",
           "|---|---|---|"]
  for name, r in results["organs"].items():
    lines.append(f"| {name} | {r['matched_mm_mean']:.1f} / {r['matched_mm_median']:.1f} | "
                 f"{r['same_point_mm_mean']:.1f} |")
  m = results["mining"]
  lines += ["", f"Mined pairs: {m['pairs']}, weak (no candidate passed) "
            f"{m['weak_rate']:.1%}; organ-label agreement of p and q "
            f"{m['organ_agreement']:.1%} over {m['points_in_organs']} points in organs "
            f"(random body voxel of B: {m['chance_agreement']:.1%})."]
  return "\n".join(lines)


def figure(path: str, volumes, caches, provider) -> None:
  """Coronal slices of patients A and B side by side, A's organ centroids and their
  matches in B drawn in the same colours (each point projected onto its slice)."""
  import cv2  # pylint: disable=g-import-not-at-top
  (image_a, labels_a), (image_b, _) = volumes[0], volumes[1]
  cents = centroids(labels_a)
  names = list(cents)
  p = np.rint([cents[n] for n in names]).astype(int)
  q, _ = provider.match_many(caches[0], p, caches[1])
  colours = [tuple(int(c) for c in cv2.applyColorMap(np.uint8([[k * 255 // len(names)]]),
                                                     cv2.COLORMAP_JET)[0, 0])
             for k in range(len(names))]
  panels = []
  for image, points in ((image_a, p), (image_b, q)):
    row = int(np.median(points[:, 1]))      # one coronal slice through the organs
    window = np.clip((image.array[:, row].astype(np.float32) + 160) / 400, 0, 1)
    panel = cv2.cvtColor((window[::-1] * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    for (z, _, x), colour in zip(points, colours):
      cv2.circle(panel, (int(x), int(image.shape[0] - 1 - z)), 2, colour, -1)
    panels.append(panel)
  slice_figures.save_side_by_side(panels, path, min_size=300)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--provider", default="affine", choices=("affine", "embedding"))
  parser.add_argument("--run", default="", help="--provider=embedding: the workdir of an "
                      "anatomy_embedding run")
  parser.add_argument("--step", type=int, default=None, help="its checkpoint (newest)")
  parser.add_argument("--num_pairs", type=int, default=12)
  parser.add_argument("--population_seed", type=int, default=7)
  parser.add_argument("--synthetic_size", type=int, default=96)
  parser.add_argument("--spacing_mm", type=float, default=4.0)
  parser.add_argument("--iterations", type=int, default=300)
  parser.add_argument("--score_mode", default="inside", choices=("inside", "ncc"))
  parser.add_argument("--mined_per_pair", type=int, default=20)
  args = parser.parse_args(argv)
  if (args.provider == "embedding") != bool(args.run):
    parser.error("--run (an anatomy_embedding workdir) goes with --provider=embedding, "
                 "and only with it")
  os.makedirs(args.out, exist_ok=True)
  results, volumes, caches, provider = evaluate(args)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown(results)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  figure(os.path.join(args.out, "matches.png"), volumes, caches, provider)
  print(table)
  print(f"Wrote results.json, results.md and matches.png to {args.out} in "
        f"{results['seconds']:.0f} s")


if __name__ == "__main__":
  main()
