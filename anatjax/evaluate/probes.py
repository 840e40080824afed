"""Protocol 1: multi-label classification from a fraction of the labels.

Two ways to read the encoder, both deterministic given the seed:
- linear probe on frozen features: features standardised with the statistics of the whole
  (unlabelled) train split, a linear layer trained with Adam (L2 penalty, cosine lr) on
  minibatches drawn with replacement from the labelled subset, one weight decay per
  vmapped copy; the weight decay with the best validation mean AUROC is kept. Drawing with
  replacement at a fixed batch size gives one compiled program for every subset size.
- full fine-tuning: the encoder end to end with a linear head on the mean of the patch
  tokens (standardised by fixed train statistics), sigmoid BCE, AdamW with warm-up +
  cosine and layer-wise lr decay; the head starts from the linear probe (LP-FT) unless
  finetune.head_init='zeros'; no augmentation (the phantom's patient variation stands in
  for it); the evaluation point (step 0 included with LP-FT) with the best validation
  mean AUROC, of `num_evals`, is kept.
The linear head is used per token by the localisation protocol and, with a softmax
loss, by the anatomy protocol's token probe; the fine-tuning optimiser and loop
(`finetune_optimizer`, `fit_keep_best`) also train the segmentation protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anatjax.evaluate import data as data_lib, features as features_lib, metrics

LOSSES = ("bce", "softmax")


# ------------------------------------------------------------------ linear probe
@dataclasses.dataclass
class LinearHead:
  """logits = ((x - mu) / sd) @ w + b, with the weight decay it was chosen with."""
  w: np.ndarray
  b: np.ndarray
  mu: np.ndarray
  sd: np.ndarray
  weight_decay: float = math.nan
  val_score: float = math.nan

  def logits(self, x: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, np.float32) - self.mu) / self.sd) @ self.w + self.b

  def as_dict(self) -> dict:
    return {"w": self.w, "b": self.b, "mu": self.mu, "sd": self.sd}


def norm_stats(x: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and standard deviation (floored, so constant features stay finite)."""
  x = np.asarray(x, np.float64)
  mu = x.mean(0)
  sd = x.std(0)
  sd = np.maximum(sd, eps * max(float(sd.max(initial=0.0)), 1.0))
  return mu.astype(np.float32), sd.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("loss", "steps", "batch_size", "num_classes"))
def _train_linear(x, y, positions, count, weight_decays, key, lr, *, loss, steps,
                  batch_size, num_classes):
  """Trains one linear layer per weight decay on x[positions[:count]] -> [W, D, C], [W, C]."""
  dim = x.shape[1]
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def objective(params, xb, yb, wd):
    logits = xb @ params["w"] + params["b"]
    if loss == "bce":
      data_term = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, yb))
    else:
      data_term = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
    return data_term + 0.5 * wd * jnp.sum(params["w"] ** 2)

  def update(params, opt_state, xb, yb, wd):
    grads = jax.grad(objective)(params, xb, yb, wd)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(carry, k):
    params, opt_state = carry
    rows = positions[jax.random.randint(k, (batch_size,), 0, count)]
    xb, yb = x[rows], y[rows]
    params, opt_state = jax.vmap(update, in_axes=(0, 0, None, None, 0))(
        params, opt_state, xb, yb, weight_decays)
    return (params, opt_state), None

  n_wd = weight_decays.shape[0]
  params = {"w": jnp.zeros((n_wd, dim, num_classes)), "b": jnp.zeros((n_wd, num_classes))}
  opt_state = jax.vmap(opt.init)(params)
  (params, _), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
  return params["w"], params["b"]


def fit_linear(x, y, positions, x_val, y_val, *, stats, cfg, seed: int, loss: str = "bce",
               num_classes: int | None = None, score=None) -> LinearHead:
  """A linear probe on x[positions] (labels y[positions]), weight decay chosen on val.

  x: [N, D] features of the whole train split (the subset is `positions`, so every label
  fraction shares one compiled program); stats: (mu, sd) to standardise with; cfg: steps,
  batch_size, lr, weight_decays; loss 'bce' (multi-hot y) or 'softmax' (integer y);
  score(val_labels, val_logits) -> higher is better (default: mean AUROC for bce,
  mIoU for softmax).
  """
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: use one of {LOSSES}")
  mu, sd = stats
  xs = (np.asarray(x, np.float32) - mu) / sd
  if loss == "bce":
    y = np.asarray(y, np.float32)
    num_classes = y.shape[1]
    score = score or (lambda t, s: metrics.multilabel_auroc(
        t, s, [str(i) for i in range(t.shape[1])])["mean"])
  else:
    y = np.asarray(y, np.int32)
    score = score or (lambda t, s: metrics.mean_iou(t, s.argmax(-1), num_classes))
  positions = np.asarray(positions, np.int32)
  padded = np.zeros(len(xs), np.int32)     # fixed shape: the subset's rows, then padding
  padded[:len(positions)] = positions
  wds = np.asarray(cfg.weight_decays, np.float32)
  w, b = _train_linear(jnp.asarray(xs), jnp.asarray(y), jnp.asarray(padded),
                       jnp.int32(len(positions)), jnp.asarray(wds),
                       jax.random.key(seed), jnp.float32(cfg.lr), loss=loss,
                       steps=int(cfg.steps), batch_size=int(cfg.batch_size),
                       num_classes=int(num_classes))
  w, b = np.asarray(w), np.asarray(b)
  xv = (np.asarray(x_val, np.float32) - mu) / sd
  scores = np.array([score(y_val, xv @ w[i] + b[i]) for i in range(len(wds))], np.float64)
  # The best validation score; ties and an all-undefined validation (NaN) go to the
  # strongest regularisation, the safer choice with few labels.
  filled = np.where(np.isnan(scores), -np.inf, scores)
  best = len(wds) - 1 - int(np.argmax(filled[::-1]))
  return LinearHead(w[best], b[best], mu, sd, float(wds[best]), float(scores[best]))


# ------------------------------------------------------------------ classifiers on images
@dataclasses.dataclass(eq=False)
class PooledClassifier:
  """Encoder -> mean of the patch tokens -> standardise -> linear head, on images.

  A linear probe (frozen encoder, head with the train statistics) and a fine-tuned
  network (mu = 0, sd = 1) have this same form, which the localisation maps rely on.
  """
  encoder: features_lib.Encoder
  params: dict           # encoder parameters
  head: dict             # w [D, C], b [C], mu [D], sd [D]
  name: str = "linear"

  def logits(self, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for start, stop in features_lib.batches(len(images), batch_size):
      batch = features_lib.pad_to(images[start:stop], batch_size)
      out.append(np.asarray(self.encoder.pooled_logits(self.params, self.head, batch))
                 [:stop - start])
    return np.concatenate(out)


def linear_classifier(encoder, head: LinearHead) -> PooledClassifier:
  return PooledClassifier(encoder, encoder.params,
                          {k: jnp.asarray(v) for k, v in head.as_dict().items()}, "linear")


# ------------------------------------------------------------------ fine-tuning
def layer_ids(params: dict, depth: int) -> dict:
  """0 for the patch embedding and CLS, i + 1 for block i, depth + 1 for the rest of the
  encoder and everything outside it (a head, a decoder): {"encoder": ..., others}."""
  def layer(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[0] != "encoder":
      return depth + 1
    if keys[1] in ("embedding", "cls"):
      return 0
    if keys[1] == "Transformer" and keys[2].startswith("encoderblock_"):
      return int(keys[2].rsplit("_", 1)[1]) + 1
    return depth + 1
  return jax.tree_util.tree_map_with_path(layer, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter factor (layer-wise lr decay)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(init, update)


def lr_schedule(cfg, total_steps: int, batch_size: int):
  """Linear warm-up to base_lr x batch / 256, then cosine to 0; or, where the loop's cfg
  sets constant_lr, that lr throughout (LD's transfer protocol)."""
  if cfg.get("constant_lr"):
    return optax.constant_schedule(float(cfg.constant_lr))
  lr = cfg.base_lr * batch_size / 256
  warmup = max(1, int(round(cfg.warmup_fraction * total_steps)))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))


def finetune_optimizer(params, depth: int, layer_decay: float,
                       weight_decay: float) -> optax.GradientTransformation:
  """AdamW with layer-wise lr decay, without the learning rate: the train step scales
  the update by the step's lr, so one compiled step serves every run length."""
  ids = layer_ids(params, depth)
  scales = jax.tree.map(lambda i: -float(layer_decay ** (depth + 1 - i)), ids)
  # No weight decay on biases, norms and the CLS token (as in MAE / BEiT fine-tuning).
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", "") != "cls", params)
  return optax.chain(
      optax.scale_by_adam(b1=0.9, b2=0.999),
      optax.add_decayed_weights(weight_decay, decay_mask),
      scale_by_tree(scales))


@functools.lru_cache(maxsize=4)
def finetune_step(encoder, layer_decay: float, weight_decay: float, num_classes: int):
  """(optimizer, jit (params, opt_state, stats, images, labels, lr) -> params, opt_state,
  loss), cached per encoder and hyper-parameters so label fractions and seeds share it."""
  shapes = {"encoder": encoder.params,
            "head": {"w": np.zeros((encoder.width, num_classes), np.float32),
                     "b": np.zeros((num_classes,), np.float32)}}
  tx = finetune_optimizer(shapes, encoder.depth, layer_decay, weight_decay)

  def loss_fn(params, stats, x, y):
    pooled = jnp.mean(encoder.tokens(params["encoder"], x)[:, 1:], axis=1)
    logits = ((pooled - stats["mu"]) / stats["sd"]) @ params["head"]["w"] + params["head"]["b"]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

  return tx, scaled_train_step(loss_fn, tx)


def scaled_train_step(loss_fn, tx):
  """A jitted step (params, opt_state, fixed, x, y, lr) -> (params, opt_state, loss) of
  `tx` with its update scaled by lr; loss_fn(params, fixed, x, y) -> loss."""
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, fixed, x, y, lr):
    loss, grads = jax.value_and_grad(loss_fn)(params, fixed, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss
  return train_step


def batch_order(count: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """[steps, batch] positions: successive seeded permutations of range(count), cut into
  batches (a batch may straddle two epochs; tiny subsets repeat within a batch)."""
  rng = np.random.default_rng([seed, 0xF1E7])
  needed = steps * batch_size
  order = np.concatenate([rng.permutation(count) for _ in range(-(-needed // count))])
  return order[:needed].reshape(steps, batch_size)


def fit_keep_best(train_step, params, opt_state, *, cfg, count: int, seed: int, validate,
                  from_start: bool = False) -> tuple[dict, dict]:
  """The fine-tuning loop classification and segmentation share.

  cfg.epochs over `count` training items (at least cfg.min_steps steps) in seeded batches
  of cfg.batch_size (`batch_order`), lr warm-up + cosine (`lr_schedule`);
  train_step(params, opt_state, rows, lr) -> (params, opt_state, loss) takes the batch's
  positions. validate(params) -> score (higher is better) runs at cfg.num_evals evenly
  spaced steps, and at step 0 with `from_start`; a host copy of the best is kept (the
  first evaluation, then only a strictly better, non-NaN score replaces it).
  Returns (the best params, log {"steps", "evals", "best_step", "best_val"}).
  """
  batch = int(cfg.batch_size)
  total = max(int(cfg.min_steps), int(cfg.epochs * -(-count // batch)))
  schedule = lr_schedule(cfg, total, batch)
  order = batch_order(count, total, batch, seed)
  eval_at = set(np.unique(np.linspace(total / cfg.num_evals, total, cfg.num_evals)
                          .round().astype(int)).tolist())
  if from_start:
    eval_at.add(0)
  best, best_score, log = None, -np.inf, {"steps": total, "evals": []}
  loss = math.nan
  for step in range(total + 1):
    if step:
      params, opt_state, loss = train_step(params, opt_state, order[step - 1],
                                           np.float32(schedule(step - 1)))
    if step in eval_at:
      score = validate(params)
      log["evals"].append({"step": step, "loss": float(loss), "val": score})
      if best is None or (not math.isnan(score) and score > best_score):
        best, best_score = jax.tree.map(lambda a: np.array(a, copy=True), params), score
        log["best_step"] = step
  log["best_val"] = best_score
  return jax.tree.map(jnp.asarray, best), log


def finetune(encoder, images, labels, val_images, val_labels, *, cfg, seed: int,
             eval_batch_size: int, stats, init_head: LinearHead | None = None
             ) -> tuple[PooledClassifier, dict]:
  """Fine-tunes encoder + head end to end on (images, labels).

  The head reads the mean patch token standardised by `stats` (the frozen encoder's train
  statistics, held fixed): pooled tokens of near-identical radiographs differ little in
  absolute terms, and an unscaled head barely learns in a short run. With `init_head`
  (cfg.head_init='probe') the head starts at the linear probe's solution (LP-FT) and
  step 0 is a candidate, so a run that never beats the probe on validation returns it.
  Returns the classifier at the evaluation with the best validation mean AUROC, and the
  log of `fit_keep_best`.
  """
  num_classes = labels.shape[1]
  head = ({"w": jnp.array(init_head.w), "b": jnp.array(init_head.b)} if init_head is not None
          else {"w": jnp.zeros((encoder.width, num_classes)), "b": jnp.zeros((num_classes,))})
  # Copies: the train step donates its inputs, and the encoder's own weights must survive.
  params = {"encoder": jax.tree.map(jnp.array, encoder.params), "head": head}
  fixed = {"mu": jnp.asarray(stats[0]), "sd": jnp.asarray(stats[1])}
  tx, train_step = finetune_step(encoder, float(cfg.layer_decay), float(cfg.weight_decay),
                                 num_classes)

  def classifier(p):
    return PooledClassifier(encoder, p["encoder"], {**p["head"], **fixed}, "finetune")

  names = [str(i) for i in range(num_classes)]

  def validate(p):
    val_logits = classifier(p).logits(val_images, eval_batch_size)
    return metrics.multilabel_auroc(val_labels, val_logits, names)["mean"]

  labels = np.asarray(labels, np.float32)
  best, log = fit_keep_best(
      lambda p, s, rows, lr: train_step(p, s, fixed, images[rows], labels[rows], lr),
      params, tx.init(params), cfg=cfg, count=len(images), seed=seed, validate=validate,
      from_start=init_head is not None)
  return classifier(best), log


# ------------------------------------------------------------------ the protocol
def class_records(result: dict, metric: str, **fields) -> list[dict]:
  """{'mean', 'per_class', 'excluded'} -> one record for the mean and one per class."""
  out = [dict(fields, metric=metric, cls="mean", value=result["mean"],
              excluded=result["excluded"])]
  out += [dict(fields, metric=metric, cls=name, value=value)
          for name, value in result["per_class"].items()]
  return out


def auroc_records(result: dict, **fields) -> list[dict]:
  return class_records(result, "auroc", **fields)


def probe_init(cfg) -> bool:
  """Whether fine-tuning starts from the linear probe's head (cfg.head_init)."""
  if cfg.head_init not in ("probe", "zeros"):
    raise ValueError(f"config finetune.head_init={cfg.head_init!r}: use 'probe' or 'zeros'")
  return cfg.head_init == "probe"


def run_protocol(config, encoder, splits, out_dir: str, log=print) -> dict:
  """Linear probe and/or fine-tuning at each label fraction and seed; test AUROC."""
  train, val, test = splits["train"], splits["val"], splits["test"]
  names = list(train.class_names)
  bs = config.batch_size
  feats = {s.name: features_lib.extract(encoder, s.images, bs) for s in (train, val, test)}
  kind = config.linear.features
  x = {n: features_lib.pooled(f, kind) for n, f in feats.items()}
  stats = norm_stats(x["train"])
  # Fine-tuning pools the mean patch token, whatever the linear probe reads.
  mean_stats = norm_stats(feats["train"]["mean"])
  records, notes, runs = [], [], []
  for seed in config.seeds:
    for fraction in config.label_fractions:
      positions = data_lib.subset_positions(train, fraction, seed, config.data,
                                            f"{out_dir}/splits" if out_dir else None)
      positives = train.findings[positions].sum(0)
      common = dict(seed=int(seed), label_fraction=float(fraction),
                    num_labelled=int(len(positions)),
                    train_positives={n: int(p) for n, p in zip(names, positives)})
      absent = [n for n, p in zip(names, positives) if p == 0 or p == len(positions)]
      if absent:
        count = f"{len(positions)} image" + ("s" if len(positions) != 1 else "")
        notes.append(f"seed {seed}, {100 * fraction:g}% labels ({count}): "
                     f"no positive or no negative example of {', '.join(absent)}")
      heads = {}

      def linear_head(feature_kind):
        if feature_kind not in heads:
          xs = {n: features_lib.pooled(f, feature_kind) for n, f in feats.items()}
          heads[feature_kind] = fit_linear(
              xs["train"], train.findings, positions, xs["val"], val.findings,
              stats=stats if feature_kind == kind else mean_stats, cfg=config.linear,
              seed=int(seed))
        return heads[feature_kind]

      for mode in config.modes:
        if mode == "linear":
          head = linear_head(kind)
          scores = head.logits(x["test"])
          extra = {"weight_decay": head.weight_decay, "val_auroc": head.val_score,
                   "features": kind}
        elif mode == "finetune":
          init = linear_head("mean") if probe_init(config.finetune) else None
          model, ft_log = finetune(encoder, train.images[positions],
                                   train.findings[positions], val.images, val.findings,
                                   cfg=config.finetune, seed=int(seed), eval_batch_size=bs,
                                   stats=mean_stats, init_head=init)
          scores = model.logits(test.images, bs)
          extra = {"best_step": ft_log.get("best_step"), "steps": ft_log["steps"],
                   "val_auroc": ft_log["best_val"],
                   "head_init": config.finetune.head_init}
        else:
          raise ValueError(f"config modes: unknown mode {mode!r}; use 'linear', 'finetune'")
        result = metrics.multilabel_auroc(test.findings, scores, names)
        log(f"  {mode:8s} seed {seed} {100 * fraction:5g}% labels: test mean AUROC "
            f"{result['mean']:.4f}" + (f" (best step {extra['best_step']}/{extra['steps']})"
                                       if mode == "finetune" else ""))
        records += auroc_records(result, method=mode, **common, **extra)
        runs.append({"method": mode, "seed": int(seed), "label_fraction": float(fraction),
                     "mean_auroc": result["mean"]})
  return {"records": records, "notes": notes, "figures": {"curves": runs}}
