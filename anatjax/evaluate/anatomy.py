"""Protocol 3: how well frozen patch tokens encode anatomy, and how they cluster.

Each patch token gets the anatomy label most of its pixels carry (ties: the lower label
index). Then, on the encoder's final patch tokens:
- token probe: a softmax linear classifier of the label (the linear probe of `probes`,
  weight decay chosen on validation tokens), scored on every test token by mIoU over the
  structures (at token resolution, i.e. on the patch grid);
- cohesion: k-means (k-means++ seeding, seeded, best of `n_init`) on a subsample of test
  tokens, scored against the anatomy labels by NMI; silhouette (Euclidean, on a smaller
  subsample) of the k-means clusters and of the anatomy labels themselves (how compact
  and separated the structures are in feature space). Tokens are L2-normalised first
  when `kmeans.normalize` is set (cosine geometry, the usual one for ViT tokens).
"""

from __future__ import annotations

import numpy as np

from anatjax.evaluate import (data as data_lib, embedding, features as features_lib, metrics,
                              probes)


def token_labels(anatomy: np.ndarray, patch: int, num_classes: int) -> np.ndarray:
  """uint8 [N, S, S] pixel labels -> int [N, (S/p)^2] majority label of each patch."""
  n, size = anatomy.shape[0], anatomy.shape[-1]
  g = size // patch
  cells = anatomy[:, :g * patch, :g * patch].reshape(n, g, patch, g, patch)
  cells = cells.transpose(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)
  counts = np.stack([(cells == k).sum(-1) for k in range(num_classes)], axis=-1)
  return counts.argmax(-1)


# ------------------------------------------------------------------ k-means
def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k initial centres: the first uniformly, each next one with probability ~ D^2."""
  centers = [x[rng.integers(len(x))]]
  d2 = metrics.pairwise_sq_dists(x, centers[0][None])[:, 0]
  for _ in range(1, k):
    total = d2.sum()
    i = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=d2 / total)
    centers.append(x[i])
    d2 = np.minimum(d2, metrics.pairwise_sq_dists(x, x[i][None])[:, 0])
  return np.stack(centers)


def kmeans(x, k: int, seed: int, iters: int = 100, n_init: int = 3,
           tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
  """Lloyd's k-means: (labels [N], centres [k, D], inertia) of the best of n_init runs.

  An emptied cluster is re-seeded with the point farthest from its centre. Stops when
  the centres move less than tol x the data's total variance.
  """
  x = np.asarray(x, np.float64)
  if not 1 <= k <= len(x):
    raise ValueError(f"k-means: k={k} for {len(x)} points")
  rng = np.random.default_rng([seed, 0xC1A5])
  scale = tol * max(float(x.var(0).sum()), 1e-12)
  best = None
  for _ in range(n_init):
    centers = kmeans_plus_plus(x, k, rng)
    for _ in range(iters):
      d2 = metrics.pairwise_sq_dists(x, centers)
      labels = d2.argmin(1)
      counts = np.bincount(labels, minlength=k)
      sums = np.zeros_like(centers)
      np.add.at(sums, labels, x)
      new = sums / np.maximum(counts, 1)[:, None]
      for j in np.flatnonzero(counts == 0):
        far = int(np.argmax(d2[np.arange(len(x)), labels]))
        new[j] = x[far]
        labels[far] = j
      shift = float(((new - centers) ** 2).sum())
      centers = new
      if shift <= scale:
        break
    d2 = metrics.pairwise_sq_dists(x, centers)
    labels = d2.argmin(1)
    inertia = float(d2[np.arange(len(x)), labels].sum())
    if best is None or inertia < best[2]:
      best = (labels, centers, inertia)
  return best


def l2_normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def subsample(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
  return np.arange(count) if count <= size else np.sort(rng.choice(count, size, replace=False))


# ------------------------------------------------------------------ the protocol
def run_protocol(config, encoder, splits, out_dir: str, log=print) -> dict:
  del out_dir
  cfg = config.anatomy
  names = list(data_lib.ANATOMY_NAMES)
  k_classes = len(names)
  tokens, labels = {}, {}
  for split in (splits["train"], splits["val"], splits["test"]):
    toks = features_lib.extract(encoder, split.images, config.batch_size, tokens=True)["tokens"]
    tokens[split.name] = toks.reshape(-1, toks.shape[-1])
    labels[split.name] = token_labels(split.anatomy, encoder.patch_size, k_classes).reshape(-1)
  grid = int(round((tokens["test"].shape[0] / len(splits["test"])) ** 0.5))
  records, notes = [], []
  figures = {}
  for seed in config.seeds:
    seed = int(seed)
    rng = np.random.default_rng([seed, 0xA7A7])
    common = dict(seed=seed)

    # Token probe.
    tr = subsample(len(tokens["train"]), cfg.probe_tokens, rng)
    va = subsample(len(tokens["val"]), cfg.probe_tokens, rng)
    x_train = tokens["train"][tr]
    head = probes.fit_linear(x_train, labels["train"][tr], np.arange(len(tr)),
                             tokens["val"][va], labels["val"][va],
                             stats=probes.norm_stats(x_train), cfg=config.linear, seed=seed,
                             loss="softmax", num_classes=k_classes)
    predicted = head.logits(tokens["test"]).argmax(-1)
    ious = metrics.per_class_iou(metrics.confusion_matrix(labels["test"], predicted,
                                                          k_classes))
    miou = float(np.nanmean(ious))
    accuracy = float(np.mean(predicted == labels["test"]))
    probe = dict(common, method="token_probe", label_fraction=1.0,
                 weight_decay=head.weight_decay, train_tokens=int(len(tr)))
    records.append(dict(probe, metric="miou", cls="mean", value=miou))
    records.append(dict(probe, metric="token_accuracy", cls="all", value=accuracy))
    records += [dict(probe, metric="iou", cls=n, value=float(v)) for n, v in zip(names, ious)]

    # Cohesion: k-means and silhouettes on test tokens.
    km = subsample(len(tokens["test"]), cfg.kmeans_tokens, rng)
    x = tokens["test"][km].astype(np.float64)
    if cfg.normalize:
      x = l2_normalise(x)
    k = cfg.k or k_classes
    clusters, centers, _ = kmeans(x, k, seed, cfg.kmeans_iters, cfg.kmeans_inits)
    nmi = metrics.normalized_mutual_info(labels["test"][km], clusters)
    sil = subsample(len(km), cfg.silhouette_tokens, rng)
    unsupervised = dict(common, method="kmeans", label_fraction=None, k=int(k),
                        tokens=int(len(km)), normalize=bool(cfg.normalize))
    records.append(dict(unsupervised, metric="nmi", cls="all", value=nmi))
    for metric, assignment in (("silhouette_kmeans", clusters[sil]),
                               ("silhouette_anatomy", labels["test"][km][sil])):
      try:
        value = metrics.silhouette(x[sil], assignment)
      except ValueError as e:
        value = np.nan
        notes.append(f"{metric} (seed {seed}): {e}")
      records.append(dict(unsupervised, metric=metric, cls="all", value=value,
                          tokens=int(len(sil))))
    log(f"  seed {seed}: token probe mIoU {miou:.4f} (accuracy {accuracy:.3f}), k-means "
        f"NMI {nmi:.4f}, silhouette (k-means / anatomy) "
        f"{records[-2]['value']:.3f} / {records[-1]['value']:.3f}")

    if not figures:
      figures = figure_data(splits["test"], tokens["test"], labels["test"], predicted,
                            centers, x[sil], labels["test"][km][sil], grid, cfg)
  return {"records": records, "notes": notes, "figures": figures}


def figure_data(test, test_tokens, test_labels, predicted, centers, points, point_labels,
                grid: int, cfg, num_examples: int = 4) -> dict:
  """What the anatomy figures draw: a t-SNE map of token features coloured by anatomy, a
  few test images with their anatomy, probe and k-means maps on the patch grid."""
  per_image = grid * grid
  examples = []
  for i in range(min(num_examples, len(test))):
    rows = slice(i * per_image, (i + 1) * per_image)
    x = test_tokens[rows].astype(np.float64)
    if cfg.normalize:
      x = l2_normalise(x)
    clusters = metrics.pairwise_sq_dists(x, centers).argmin(1)
    examples.append({"image": test.images[i],
                     "anatomy": test_labels[rows].reshape(grid, grid),
                     "probe": predicted[rows].reshape(grid, grid),
                     "kmeans": clusters.reshape(grid, grid)})
  return {"embedding": {"points": embedding.tsne(points), "labels": point_labels,
                        "method": "t-SNE"},
          "examples": examples}
