"""Evaluation metrics in plain NumPy (the runtime does not depend on scikit-learn).

Each function matches scikit-learn's definition and edge cases where scikit-learn has one
(the tests compare them): AUROC with tied scores, NMI with the arithmetic mean of the
entropies, silhouette with singleton clusters scored 0. Values that are undefined (AUROC of
a class with one label value in the evaluated set, IoU and Dice of a class neither true
nor predicted) are NaN, never a made-up number, and the summaries say which classes they
left out.
"""

from __future__ import annotations

import math

import numpy as np


# ------------------------------------------------------------------ ranking
def midranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x with ties given their average rank (scipy's 'average')."""
  x = np.asarray(x).ravel()
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start of each run of equal values, and the average rank of that run.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  run_rank = (starts + ends + 1) / 2.0      # mean of the 1-based ranks starts+1 .. ends
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def auroc(y_true, scores) -> float:
  """Area under the ROC curve of binary labels; NaN when only one label value occurs.

  The Mann-Whitney form: the probability that a random positive outscores a random
  negative, ties counting one half (the same number as the trapezoidal ROC area).
  """
  y = np.asarray(y_true).ravel().astype(bool)
  s = np.asarray(scores, np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"auroc: {y.shape[0]} labels vs {s.shape[0]} scores")
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return math.nan
  ranks = midranks(s)
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def multilabel_auroc(y_true, scores, names) -> dict:
  """Per-class AUROC and their mean over the classes where it is defined.

  Returns {"mean": float, "per_class": {name: float (NaN if undefined)}, "excluded":
  [names left out of the mean because the evaluated set has one label value for them]}.
  """
  y = np.asarray(y_true)
  s = np.asarray(scores)
  if y.shape != s.shape or y.ndim != 2 or y.shape[1] != len(names):
    raise ValueError(f"multilabel_auroc: labels {y.shape}, scores {s.shape}, "
                     f"{len(names)} class names")
  per_class = {n: auroc(y[:, i], s[:, i]) for i, n in enumerate(names)}
  defined = [v for v in per_class.values() if not math.isnan(v)]
  return {"mean": float(np.mean(defined)) if defined else math.nan,
          "per_class": per_class,
          "excluded": [n for n, v in per_class.items() if math.isnan(v)]}


# ------------------------------------------------------------------ overlap
def iou(pred, target, zero_division: float = 0.0) -> float:
  """Jaccard index |A and B| / |A or B| of two binary masks (sklearn's jaccard_score)."""
  a, b = np.asarray(pred, bool), np.asarray(target, bool)
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else float(zero_division)


def dice(pred, target, zero_division: float = 0.0) -> float:
  """Dice / F1 2|A and B| / (|A| + |B|) of two binary masks (sklearn's f1_score)."""
  a, b = np.asarray(pred, bool), np.asarray(target, bool)
  total = a.sum() + b.sum()
  return float(2.0 * np.logical_and(a, b).sum() / total) if total else float(zero_division)


def mask_box(mask) -> np.ndarray:
  """The (x, y, w, h) pixel box of a binary mask's pixels (w = x_max - x_min + 1), as
  the synthetic data's `boxes`; zeros for an empty mask."""
  ys, xs = np.nonzero(np.asarray(mask, bool))
  if not len(xs):
    return np.zeros(4, np.float32)
  return np.array([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1],
                  np.float32)


def box_iou(a, b) -> float:
  """IoU of two (x, y, w, h) boxes in pixel units (a box covers w x h whole pixels)."""
  ax, ay, aw, ah = (float(v) for v in a)
  bx, by, bw, bh = (float(v) for v in b)
  iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
  ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
  inter = iw * ih
  union = aw * ah + bw * bh - inter
  return inter / union if union > 0 else 0.0


def pointing_game(heatmap, mask, tolerance: float = 0.0) -> bool:
  """A hit when the heatmap's maximum lies in the mask, or within `tolerance` pixels of it.

  Ties for the maximum are broken by the first pixel in row-major order, so a constant
  map points at the top-left corner (a miss unless the lesion is there): an encoder that
  gives no evidence gets no credit.
  """
  h = np.asarray(heatmap)
  m = np.asarray(mask, bool)
  if h.shape != m.shape:
    raise ValueError(f"pointing_game: heatmap {h.shape} vs mask {m.shape}")
  y, x = np.unravel_index(int(np.argmax(h)), h.shape)
  if m[y, x]:
    return True
  if tolerance <= 0 or not m.any():
    return False
  ys, xs = np.nonzero(m)
  return bool(np.min((ys - y) ** 2 + (xs - x) ** 2) <= tolerance ** 2)


# ------------------------------------------------------------------ segmentation-style
def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts, rows = true class, columns = predicted class."""
  t = np.asarray(y_true, np.int64).ravel()
  p = np.asarray(y_pred, np.int64).ravel()
  return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
  """IoU of each class from a confusion matrix; NaN for classes neither true nor predicted."""
  c = np.asarray(confusion, np.float64)
  inter = np.diag(c)
  union = c.sum(0) + c.sum(1) - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, inter / np.maximum(union, 1e-300), np.nan)


def mean_iou(y_true, y_pred, num_classes: int) -> float:
  """mIoU over the classes present in the labels or the predictions."""
  return float(np.nanmean(per_class_iou(confusion_matrix(y_true, y_pred, num_classes))))


def per_class_dice(confusion: np.ndarray) -> np.ndarray:
  """Dice of each class from a confusion matrix: 2 TP / (2 TP + FP + FN), i.e.
  scikit-learn's per-class f1_score on the flattened label maps (pixels pooled over
  every image counted in the matrix).

  NaN for a class neither true nor predicted anywhere: there is no pixel to be right or
  wrong about (sklearn's zero_division), and a mean should skip it (np.nanmean), not
  count it as 0 or as 1.
  """
  c = np.asarray(confusion, np.float64)
  inter = np.diag(c)
  total = c.sum(0) + c.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, 2 * inter / np.maximum(total, 1e-300), np.nan)


# ------------------------------------------------------------------ clustering
def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true, labels_pred) -> float:
  """NMI = MI / mean(H(true), H(pred)) (sklearn's default 'arithmetic' normalisation).

  As in scikit-learn: 1.0 when both labelings are a single cluster (or empty), 0.0 when
  the mutual information is zero.
  """
  t = np.unique(np.asarray(labels_true).ravel(), return_inverse=True)[1]
  p = np.unique(np.asarray(labels_pred).ravel(), return_inverse=True)[1]
  if t.shape != p.shape:
    raise ValueError("normalized_mutual_info: the labelings differ in length")
  nt, np_ = int(t.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1
  if (nt == np_ == 1) or (nt == np_ == 0):
    return 1.0
  contingency = np.bincount(t * np_ + p, minlength=nt * np_).reshape(nt, np_).astype(
      np.float64)
  n = contingency.sum()
  pij = contingency / n
  pi, pj = pij.sum(1, keepdims=True), pij.sum(0, keepdims=True)
  nz = pij > 0
  mi = float((pij[nz] * (np.log(pij[nz]) - np.log((pi @ pj)[nz]))).sum())
  if mi <= 0:
    return 0.0
  h = 0.5 * (_entropy(contingency.sum(1)) + _entropy(contingency.sum(0)))
  return float(mi / max(h, np.finfo(np.float64).eps))


def pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(a), len(b)], clamped at 0 (float64)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
  return np.maximum(d, 0.0)


def silhouette(x, labels, chunk: int = 1024) -> float:
  """Mean silhouette coefficient (Euclidean), scikit-learn's definition.

  s_i = (b_i - a_i) / max(a_i, b_i) with a_i the mean distance to the other members of
  i's cluster and b_i the smallest mean distance to another cluster; 0 for members of
  singleton clusters. Needs 2 <= number of clusters <= n - 1 (else ValueError, as sklearn).
  O(n^2) time: call it on a subsample.
  """
  x = np.asarray(x, np.float64)
  lab = np.unique(np.asarray(labels).ravel(), return_inverse=True)[1]
  n, k = len(x), int(lab.max(initial=-1)) + 1
  if not 2 <= k <= n - 1:
    raise ValueError(f"silhouette needs 2 <= clusters <= n - 1; got {k} clusters for "
                     f"{n} samples")
  onehot = np.eye(k)[lab]                     # [n, k]
  sizes = onehot.sum(0)
  scores = np.empty(n)
  for start in range(0, n, chunk):
    rows = slice(start, start + chunk)
    dist = np.sqrt(pairwise_sq_dists(x[rows], x))
    m = dist.shape[0]
    dist[np.arange(m), start + np.arange(m)] = 0.0   # exact zeros, not rounding residue
    sums = dist @ onehot                        # [m, k] summed distance to each cluster
    own = lab[rows]
    own_size = sizes[own]
    a = sums[np.arange(m), own] / np.maximum(own_size - 1, 1)
    others = sums / sizes[None, :]
    others[np.arange(m), own] = np.inf
    b = others.min(1)
    with np.errstate(invalid="ignore", divide="ignore"):
      s = (b - a) / np.maximum(a, b)
    s = np.where(own_size > 1, np.nan_to_num(s), 0.0)
    scores[rows] = s
  return float(scores.mean())
