"""Pure loss functions shared by the methods. Everything here computes in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sinkhorn(scores, epsilon: float, num_iters: int):
  """Sinkhorn-Knopp balancing of a [rows, cols] score matrix.

  Returns Q with every row summing to 1 and, as the iterations converge, every column
  summing to rows/cols: each column (prototype) is used equally across the rows
  (positions). Q = exp(scores/eps), normalised, then `num_iters` rounds of column then row
  rescaling; the row step comes last, so row sums are exact.
  """
  scores = scores.astype(jnp.float32)
  rows, cols = scores.shape
  q = jnp.exp((scores - jnp.max(scores)) / epsilon)
  q = q / jnp.sum(q)
  for _ in range(num_iters):  # a few static rounds: unrolled into one fused kernel
    q = q / (jnp.sum(q, axis=0, keepdims=True) * cols)
    q = q / (jnp.sum(q, axis=1, keepdims=True) * rows)
  return q * rows


def soft_cross_entropy(target_probs, logits, temperature: float):
  """-sum_k target[..., k] * log_softmax(logits / temperature)[..., k], per token."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(target_probs * log_probs, axis=-1)


def masked_mean(values, mask, count=None):
  """Sum of `values` where `mask` is true over max(1, count); 0 when nothing is selected.

  `count` defaults to the number of selected values (a plain masked mean); passing the
  count of a whole batch makes the results of its micro-batches add up to its mean.
  """
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask) if count is None else count
  return jnp.sum(values * mask) / jnp.maximum(1.0, count)


def mean_squared_error(prediction, target, count=None):
  """Sum of squared differences over `count` (default: the number of elements)."""
  squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.sum(squared) / (squared.size if count is None else count)


# ----------------------------------------------------------------------------------------
# LD (local discrimination), shared/methods/ld.md section 3. Embeddings come in as unit
# vectors (the U-Net's embedding head); the similarity products use full float32 precision
# (Precision.HIGHEST), since accelerators otherwise round float32 matmul inputs to bfloat16,
# and they are small next to the network.

_HIGHEST = jax.lax.Precision.HIGHEST


def _unit(x, axis=-1):
  """x / (||x|| + 1e-10), the spec's L2 normalisation."""
  return x / (jnp.linalg.norm(x, axis=axis, keepdims=True) + 1e-10)


def pool_patch_embeddings(embeddings, grid: int = 8):
  """Patch vectors P = L2norm(AvgPool(v)) on a grid x grid layout (spec 3.1).

  embeddings [N, H, W, D] -> [N, grid, grid, D]; cell (r, c) averages the (H/grid) x
  (W/grid) window at (r, c) (56 x 56 pixels at 448 and grid 8), then is L2-normalised.
  """
  embeddings = embeddings.astype(jnp.float32)
  n, height, width, dim = embeddings.shape
  if height % grid or width % grid:
    raise ValueError(f"patch pooling of {height}x{width} embeddings onto a {grid}x{grid} "
                     f"grid needs height and width divisible by {grid}")
  windows = embeddings.reshape(n, grid, height // grid, grid, width // grid, dim)
  return _unit(jnp.mean(windows, axis=(2, 4)))


def invariant_spreading_terms(z, temperature: float = 0.1):
  """Per-anchor terms of the invariant-spreading criterion ISC(Z; tau) (spec 3.2): [2M].

  z [2M, D] with unit rows; z_i and z_{(i + M) mod 2M} are positives. With the second
  operand of every dot product under stop-gradient (the key side; part of the method):
    e_ij = exp(z_i . sg(z_j) / tau) for j != i, e_ii = 0,   D_i = sum_j e_ij,
    p_ij = e_ij / (D_i + 1e-10),
    term_i = -[log p_{i,i+} + sum_{j not in {i, i+}} log(1 - p_ij)].
  Row i's term therefore has a gradient with respect to z_i alone. The exponent is at most
  1/tau for unit rows, so no max-subtraction is needed (float32 is safe for tau >~ 0.012).
  """
  z = z.astype(jnp.float32)
  rows = z.shape[0]
  if rows % 2:
    raise ValueError(f"invariant spreading needs an even number of rows (two halves of "
                     f"positives), got {rows}")
  half = rows // 2
  logits = jnp.matmul(z, jax.lax.stop_gradient(z).T, precision=_HIGHEST) / temperature
  self_pair = jnp.eye(rows, dtype=bool)
  positive = jnp.roll(self_pair, half, axis=1)           # column (i + M) mod 2M of row i
  e = jnp.where(self_pair, 0.0, jnp.exp(logits))
  p = e / (jnp.sum(e, axis=1, keepdims=True) + 1e-10)
  log_positive = jnp.log(p[jnp.arange(rows), (jnp.arange(rows) + half) % rows])
  negative = ~(self_pair | positive)
  log_not_negative = jnp.sum(jnp.where(negative, jnp.log1p(-p), 0.0), axis=1)
  return -(log_positive + log_not_negative)


def invariant_spreading(z, temperature: float = 0.1):
  """ISC(Z; tau) = mean over the 2M anchors of `invariant_spreading_terms` (spec 3.2)."""
  return jnp.mean(invariant_spreading_terms(z, temperature))


def patch_discrimination(view1_patches, view2_patches, temperature: float = 0.1):
  """L_PD (spec 3.3): ISC over the patches of both views, every other patch a negative.

  view1_patches [2B, G, G, D] (I1_v1 then I2_v1) and view2_patches [2B, G, G, D] (I1_v2,
  I2_v2), the latter already aligned onto view 1's frame (dihedral.undo_batch), unit
  vectors. Each half is flattened in (image, row, col) order, so patch (n, r, c) of view 1
  and of view 2 are positives: L_PD = ISC([view1; view2]), M = 2B G^2.
  """
  dim = view1_patches.shape[-1]
  return invariant_spreading(
      jnp.concatenate([view1_patches.reshape(-1, dim), view2_patches.reshape(-1, dim)]),
      temperature)


def hypersphere_mixup(mix_patches, first_patches, second_patches, lam,
                      temperature: float = 0.1):
  """L_mix (spec 3.3): the mixed image's patches must match the mixed patch vectors.

  mix_patches [B, G, G, D] = P(x_mix); first/second_patches [B, G, G, D] = P(I1_v1),
  P(I2_v1) on their own (unaligned) grids; lam [B], x_mix = lam I1_v1 + (1 - lam) I2_v1.
    t = sg(L2norm(lam P(I1_v1) + (1 - lam) P(I2_v1))), cell by cell,
    L_mix = ISC([P(x_mix); t]), M = B G^2.
  The gradient reaches only the mix patches: t is constant, and ISC's keys are too.
  """
  lam = lam.astype(jnp.float32)[:, None, None, None]
  target = jax.lax.stop_gradient(_unit(lam * first_patches + (1.0 - lam) * second_patches))
  dim = mix_patches.shape[-1]
  return invariant_spreading(
      jnp.concatenate([mix_patches.reshape(-1, dim), target.reshape(-1, dim)]), temperature)


def region_embeddings(embeddings, assignments):
  """r_{n,k} = L2norm((1/HW) sum_p A_{n,k}(p) v_n(p)) (spec 3.3): [N, H, W, D], [N, H, W, K]
  -> [N, K, D], one contraction over the pixels (no [N, K, D, H, W] broadcast, defect D3)."""
  height, width = embeddings.shape[1:3]
  pooled = jnp.einsum("nhwk,nhwd->nkd", assignments.astype(jnp.float32),
                      embeddings.astype(jnp.float32), precision=_HIGHEST)
  return _unit(pooled / (height * width))


def region_discrimination(embeddings, assignments, temperature: float = 0.2):
  """L_RD (spec 3.3): each region embedding must be closest to its own cluster centre.

  embeddings [N_v, H, W, D] (unit vectors), assignments [N_v, H, W, K] (sum_k = 1), the
  non-mix images only. With r = region_embeddings(v, A) and batch centres
  c_k = L2norm((1/N_v) sum_n r_{n,k}) (no stop-gradient, no memory):
    L_RD = -(1/(N_v K)) sum_{n,k} log softmax_k'(r_{n,k} . c_k' / tau_r)[k].
  Gradients reach both heads through r and c.
  """
  regions = region_embeddings(embeddings, assignments)               # [N, K, D]
  centres = _unit(jnp.mean(regions, axis=0))                         # [K, D]
  logits = jnp.einsum("nkd,jd->nkj", regions, centres, precision=_HIGHEST) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(log_probs, axis1=1, axis2=2))


def binary_entropy(assignments):
  """L_ent (spec 3.3), element-wise binary entropy in bits, averaged over n, p, k:
  mean[-A log2(A + 1e-30) - (1 - A) log2(1 - A + 1e-30)]; pushes assignments to 0 or 1.

  Computed with max(x, 1e-30) in place of x + 1e-30 (the same values in float32): under jit
  XLA folds the 1e-30 into the constant of 1 - A + 1e-30, which is then log2(0) = -inf and
  0 * -inf = NaN at A = 1, and confident assignments are exactly 1.0 in float32.
  """
  a = assignments.astype(jnp.float32)
  return jnp.mean(-a * jnp.log2(jnp.maximum(a, 1e-30))
                  - (1.0 - a) * jnp.log2(jnp.maximum(1.0 - a, 1e-30)))


def area_prior(assignments):
  """L_area (spec 3.3, unused by the reference, `ld.w_area` default 0):
  mean_{n,k} (mean_p A_{n,k}(p) - 1/K)^2, pulling every cluster towards an equal area."""
  a = assignments.astype(jnp.float32)
  area = jnp.mean(a, axis=(1, 2))                                    # [N, K]
  return jnp.mean(jnp.square(area - 1.0 / a.shape[-1]))


# ----------------------------------------------------------------------------------------
# MoCo-style contrast against a queue of keys (DrasCLR, shared/methods/drasclr.md section 3).

def queue_info_nce(queries, keys, queue, temperature: float):
  """(mean loss, logits [B, 1 + K]): per row b the logits [q_b.k_b, q_b.Q^T] / t and the
  cross-entropy with target 0. `keys` and `queue` [K, D] are used as given (callers pass
  them under stop-gradient); the queries need not be unit vectors (DrasCLR's neighbour
  query is a sum of two)."""
  queries = queries.astype(jnp.float32)
  positive = jnp.sum(queries * keys.astype(jnp.float32), axis=-1, keepdims=True)
  negative = jnp.matmul(queries, queue.astype(jnp.float32).T, precision=_HIGHEST)
  logits = jnp.concatenate([positive, negative], axis=-1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0]), logits


def top_k_accuracy(logits, k: int):
  """Fraction of rows whose column 0 (the positive) is among the k largest logits
  (ties counted in the positive's favour)."""
  rank = jnp.sum(logits[:, 1:] > logits[:, :1], axis=-1)
  return jnp.mean((rank < k).astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# Alice (shared/methods/alice.md section 3). Views sit on a leading axis of size 2 (view 0,
# then view 1); the teacher's outputs, and the centres, are targets under stop-gradient.
# Teacher temperatures are a per-epoch linear warm-up, which optim.linear gives:
# optim.linear(0.008, 0.01, warmup_epochs - 1)(step // steps_per_epoch) reproduces the
# reference's np.linspace(0.008, 0.01, warmup_epochs) indexed by epoch.

def _alice_teacher_probs(teacher_logits, centre, temperature):
  """softmax((sg(t) - sg(c)) / tau_t): the centred, sharpened teacher distribution."""
  logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  return jax.nn.softmax((logits - jax.lax.stop_gradient(centre)) / temperature, axis=-1)


def alice_cls_distillation(student_cls, teacher_cls, centre, tau_s, tau_t):
  """L_cls = 1/2 sum_{q != v} mean_b H(softmax((t[q] - c) / tau_t), softmax(s[v] / tau_s)).

  student_cls, teacher_cls [2, B, K]; centre [K]. Cross-view: the teacher's view 0
  supervises the student's view 1 and the other way round, so the teacher distributions
  are paired with the student's after swapping the two views.
  """
  probs = _alice_teacher_probs(teacher_cls, centre, tau_t)
  return jnp.mean(soft_cross_entropy(probs[::-1], student_cls, tau_s))


def alice_patch_distillation(student_tokens, teacher_tokens, centre2, tau_s, tau_t2):
  """L_patch = 1/2 sum_v mean_{b, tokens} H(softmax((T[v] - c2) / tau_t2), softmax(S[v] /
  tau_s)): within each view, token by token. S, T [2, B, L, K] (CASA's outputs; T is the
  target), centre2 [K]. Both views have B L tokens, so this is the mean over all of them."""
  probs = _alice_teacher_probs(teacher_tokens, centre2, tau_t2)
  return jnp.mean(soft_cross_entropy(probs, student_tokens, tau_s))


def alice_reconstruction(x_hat, x, weight: float = 5.0):
  """L_rec = weight * mean over every voxel of (x_hat - x)^2, x the unmasked crops.

  The weight is lambda_3 / 2 = 10 / 2: the reference halves its MSE before weighting it.
  """
  return weight * mean_squared_error(x_hat, x)


def updated_centre(centre, teacher_outputs, momentum: float = 0.9):
  """c <- m c + (1 - m) mean(teacher outputs) over every axis but the last ([..., K] -> [K]):
  views, batch and, for the patch centre, tokens."""
  batch_mean = jnp.mean(jax.lax.stop_gradient(teacher_outputs).astype(jnp.float32),
                        axis=tuple(range(teacher_outputs.ndim - 1)))
  return momentum * centre + (1.0 - momentum) * batch_mean


def alice_argmax_agreement(teacher_cls, student_cls):
  """Fraction of samples whose teacher CLS logits of view 0 and student CLS logits of view 1
  ([2, B, K] each, uncentred) pick the same output: a diagnostic, not a loss."""
  agree = jnp.argmax(teacher_cls[0], axis=-1) == jnp.argmax(student_cls[1], axis=-1)
  return jnp.mean(agree.astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# Dense anatomical embedding (Alice's provider (a), shared/methods/alice.md 2.4): InfoNCE of
# a crop's unit vectors against the cells of the other crop of the same CT.

def coarse_info_nce(query, keys, positive, temperature: float):
  """(mean loss, logits [P, M]): queries [P, d] against all M cells keys [M, d], the
  target column `positive` [P]."""
  logits = jnp.matmul(query, keys.T, precision=_HIGHEST) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, positive[:, None], 1)), logits


def fine_negatives(similarity, positive_cells, cells, rng, radius: float, num_hard: int,
                   num_random: int):
  """Negative cells [P, H + R] for queries with `similarity` [P, N] to the N cells
  (coordinates `cells` [N, 3]) whose positives lie at `positive_cells` [P, 3]: the H most
  similar cells farther than `radius` cells (Euclidean) from the positive, then R distinct
  random cells of that set. Chosen without gradient."""
  offset = cells[None].astype(jnp.float32) - positive_cells[:, None].astype(jnp.float32)
  far = jnp.sum(offset * offset, axis=-1) > radius * radius
  similarity = jax.lax.stop_gradient(similarity)
  _, hard = jax.lax.top_k(jnp.where(far, similarity, -jnp.inf), num_hard)
  draws = jax.random.uniform(rng, similarity.shape)
  _, random = jax.lax.top_k(jnp.where(far, draws, -1.0), num_random)
  return jnp.concatenate([hard, random], axis=1)


def fine_info_nce(query, keys, positive, cells, rng, temperature: float, radius: float,
                  num_hard: int, num_random: int):
  """(mean loss, logits [P, 1 + H + R]): queries [P, d] against the other crop's cells
  keys [N, d] (coordinates `cells` [N, 3]); column 0 is the positive `positive` [P]
  (flat), then `fine_negatives`."""
  similarity = jnp.matmul(query, keys.T, precision=_HIGHEST)
  negatives = fine_negatives(similarity, cells[positive], cells, rng, radius, num_hard,
                             num_random)
  columns = jnp.concatenate([positive[:, None], negatives], axis=1)
  logits = jnp.take_along_axis(similarity, columns, 1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0]), logits


def top1(logits, positive):
  """Fraction of rows whose column `positive` [P] is the largest (ties count as right)."""
  target = jnp.take_along_axis(logits, positive[:, None], 1)
  return jnp.mean((jnp.sum(logits > target, axis=-1) == 0).astype(jnp.float32))


def soft_dice_and_cross_entropy(logits, labels, smooth: float):
  """(mean voxel cross-entropy, soft Dice averaged over the classes) of logits [..., C]
  and integer labels [...], the segmentation fine-tuning terms. A class's soft Dice is
  (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth) pooled over every pixel/voxel of the
  batch, background included: `smooth` makes a class neither present nor predicted
  score 1, not 0 / 0."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(-1, num_classes)
  onehot = jax.nn.one_hot(labels.reshape(-1), num_classes, dtype=jnp.float32)
  cross_entropy = -jnp.mean(jnp.sum(onehot * log_probs, axis=-1))
  probs = jnp.exp(log_probs)
  dice = ((2.0 * jnp.sum(probs * onehot, 0) + smooth)
          / (jnp.sum(probs, 0) + jnp.sum(onehot, 0) + smooth))
  return cross_entropy, jnp.mean(dice)
