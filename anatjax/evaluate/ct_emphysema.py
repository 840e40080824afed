r"""DrasCLR's downstream evaluation on the synthetic CT phantom: emphysema from frozen
patch features, per patient and per patch (shared/methods/drasclr.md section 6).

  python -m anatjax.evaluate.ct_emphysema --config=configs/eval/ct_emphysema.py:runlocal \
      --init=RUN_DIR [--workdir=OUT] [--workers=2]
  python -m anatjax.evaluate.ct_emphysema --config=configs/eval/ct_emphysema.py:runlocal \
      --init=random --store=STORE [--workdir=OUT]

The real targets of the paper (COPDGene spirometry, visual emphysema scores) do not exist
for the phantom; its emphysema does, as a voxel mask with a measured severity, so this
protocol asks of the features what the spec's decision asks of them, on emphysema:

Cohort. `cohort.num_subjects` phantom subjects of a held-out population
(`cohort.population_seed`, which must differ from the store's pretraining source_seed),
with disease, rendered at the store's `synthetic_size` and taken through the store's own
steps: cubic resampling to its spacing (the emphysema mask nearest), the classical lung
mask, affine registration to its atlas and one patch at every atlas location
(`ct_prepare.map_to_store`). Subjects whose registered lungs have Dice < the store's
`min_dice` are dropped, as pretraining drops them, and listed. Each subject is cached as
an .npz (in `cohort.cache_dir`, default OUT/cohort, keyed by the store and the
population), so a second run, e.g. the other encoder, registers nothing; `--workers`
registers in that many spawned processes.

Features. The encoder f_q (BatchNorm statistics, inference mode; `which`) applied to every
patch at its own atlas location: h [M, L, 128]. The patch intensities go through the
training mapping without augmentation: clip to [-1024, 240] HU, + 1024, then x / 632 - 1.
`--init=random` is the same architecture from its own initialisers (those DrasCLR's init
uses) with the key `seed`; it needs `--store` to know the atlas. A run is evaluated on its
own store (`ct_prepare.store_root` of its data config).
A classical reference from the same patches, named `intensity`, is scored alike: per
patch the mean HU in the network's window and LAA-950 (the fraction of the patch's lung
voxels below -950 HU). The phantom's emphysema mask is, by construction, the diseased
lung voxels below -950 HU, so LAA-950 nearly reads the answer: it is the ceiling a HU
threshold reaches, not a competitor the encoder is expected to beat.

Tasks. Patient representation: the mean of h over the L locations (intensity: the means
of the two patch features), standardised with the training subjects' statistics.
- severity: ridge regression of the emphysema fraction of the lungs; R^2 and Spearman;
- presence: L2 logistic regression of severity > 0; AUROC;
- dense: an L2 logistic classifier on each patch's own h (standardised with the training
  subjects' patches) of "the patch is emphysematous", i.e. more than `dense.threshold`
  of its voxels in the resampled emphysema mask (the mask cropped at the patch's start,
  empty outside the volume); AUROC over the test subjects' patches.
Splits (decision). `probe.repeats` repeats of stratified (by presence) `probe.folds`-fold
cross-validation over subjects. In each outer fold, `n_labelled` subjects of the training
folds are labelled (a stratified draw; 0 = all of them): they train all three tasks, the
dense one with their patches. The regularisation (ridge alpha, logistic C, in
scikit-learn's parameterisation) is chosen on the labelled subjects by an inner
stratified `probe.inner_folds`-fold CV over subjects, by the pooled out-of-fold squared
error or log-loss (ties: the stronger regularisation). Each repeat pools the out-of-fold
predictions of its folds (every subject predicted once, by a model that never saw it) and
scores them once: small cohorts give folds too small for a per-fold AUROC. Reported:
mean and std over repeats. Ridge is solved in closed form and logistic regression by
Newton's method with a backtracking line search, in NumPy (tests/test_ct_emphysema.py
checks both against scikit-learn).

Outputs: OUT/results.json (records {task, metric, n_labelled, init, features, mean, std,
values}; n_labelled is an int or "all"), OUT/results.md (the table) and
OUT/figures/ct_emphysema.png (predicted vs true severity of every subject out of fold,
and the dense prediction on a coronal slice of the most emphysematous subject, both from
all labels and repeat 0). Default OUT: RUN_DIR/eval/<config> or
workdirs/eval/<config>_random.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from anatjax.data import atlas as atlas_lib, ct_patches, ct_prepare, registration, synthetic_ct
from anatjax.data.patch_views import HU_HIGH, HU_LOW, to_network, to_view_units
from anatjax.data.volume import Volume, resample
from anatjax.evaluate import metrics, report
from anatjax.evaluate.probes import norm_stats
from anatjax.models.cnn3d import DrasCLREncoder

TASKS = (("severity", "r2"), ("severity", "spearman"), ("presence", "auroc"),
         ("dense", "auroc"))
TASK_TITLES = {"severity": "severity (ridge)", "presence": "presence (logistic)",
               "dense": "patch emphysema (logistic)"}
INTENSITY = "intensity"   # the classical reference's `features` value in records
# Bumped when the cached content of a subject changes, so that old caches are redone.
CACHE_VERSION = 1


# ------------------------------------------------------------------ linear models
@dataclasses.dataclass
class Linear:
  """x @ w + b: a ridge prediction, or a logistic model's logit."""
  w: np.ndarray
  b: float

  def __call__(self, x) -> np.ndarray:
    return np.asarray(x, np.float64) @ self.w + self.b


def fit_ridge(x, y, alpha: float) -> Linear:
  """argmin ||y - x w - b||^2 + alpha ||w||^2, the intercept unpenalised (scikit-learn's
  Ridge(alpha)): centred normal equations."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mx, my = x.mean(0), y.mean()
  xc = x - mx
  w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
  return Linear(w, float(my - mx @ w))


def sigmoid(z):
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))   # no overflow


def fit_logistic(x, y, c: float, start: Linear | None = None, max_steps: int = 100,
                 tol: float = 1e-9) -> Linear:
  """argmin 1/2 ||w||^2 + c sum_i log(1 + exp(-s_i (x_i w + b))), s_i = +-1, the intercept
  unpenalised (scikit-learn's LogisticRegression(C=c) with lbfgs): Newton steps with a
  backtracking (Armijo) line search, from `start` (warm starts along a C grid) or zero."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, d = x.shape
  if y.min() == y.max():
    # One class: the unpenalised intercept has no finite optimum. w = 0 and the class
    # frequency with half an example of the other class, a finite stand-in.
    p = (y.sum() + 0.5) / (n + 1.0)
    return Linear(np.zeros(d), float(np.log(p / (1.0 - p))))
  xa = np.concatenate([x, np.ones((n, 1))], 1)
  penalty = np.r_[np.ones(d), 0.0]
  theta = np.zeros(d + 1) if start is None else np.r_[start.w, start.b]

  def objective(t):
    z = xa @ t
    return 0.5 * penalty @ (t * t) + c * np.sum(np.logaddexp(0.0, z) - y * z)

  value = objective(theta)
  for _ in range(max_steps):
    p = sigmoid(xa @ theta)
    grad = penalty * theta + c * (xa.T @ (p - y))
    if np.max(np.abs(grad)) <= tol * max(1.0, c * n):
      break
    hessian = np.diag(penalty) + c * (xa.T * (p * (1.0 - p))) @ xa
    # A tiny ridge keeps the intercept's row solvable when every p saturates.
    step = np.linalg.solve(hessian + 1e-12 * np.eye(d + 1), grad)
    size, slope = 1.0, grad @ step
    while True:
      candidate = theta - size * step
      new = objective(candidate)
      if new <= value - 1e-4 * size * slope or size < 1e-10:
        break
      size *= 0.5
    if new > value:   # no descent left at machine precision: converged
      break
    theta, value = candidate, new
  return Linear(theta[:d], float(theta[d]))


def squared_error(y, prediction) -> float:
  return float(np.mean((np.asarray(y, np.float64) - prediction) ** 2))


def log_loss(y, logits) -> float:
  z = np.asarray(logits, np.float64)
  return float(np.mean(np.logaddexp(0.0, z) - np.asarray(y, np.float64) * z))


def r2(y, prediction) -> float:
  """1 - SS_res / SS_tot (scikit-learn's r2_score); NaN for a constant target."""
  y = np.asarray(y, np.float64)
  total = np.sum((y - y.mean()) ** 2)
  return float(1.0 - np.sum((y - prediction) ** 2) / total) if total > 0 else math.nan


def spearman(a, b) -> float:
  """Pearson correlation of the midranks; NaN when either side is constant."""
  ra, rb = metrics.midranks(a), metrics.midranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  norm = math.sqrt(float(ra @ ra) * float(rb @ rb))
  return float(ra @ rb / norm) if norm > 0 else math.nan


# ------------------------------------------------------------------ splits
def stratified_folds(labels, k: int, rng: np.random.Generator) -> np.ndarray:
  """Fold ids 0..k-1: each class shuffled and dealt round the folds, the deal continuing
  from class to class, so fold sizes differ by at most one."""
  labels = np.asarray(labels)
  folds = np.empty(len(labels), int)
  dealt = 0
  for value in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == value))
    folds[members] = (dealt + np.arange(len(members))) % k
    dealt += len(members)
  return folds


def stratified_draw(pool, labels, n: int, rng: np.random.Generator) -> np.ndarray:
  """n of the indices `pool`, each class of `labels` (binary) in proportion and at least
  one of each where both occur; sorted."""
  pool = np.asarray(pool)
  positive = pool[np.asarray(labels)[pool]]
  negative = pool[~np.asarray(labels)[pool]]
  n_pos = int(round(n * len(positive) / len(pool)))
  if len(positive) and len(negative):
    n_pos = min(max(n_pos, 1), n - 1)
  n_pos = min(max(n_pos, n - len(negative)), len(positive))
  return np.sort(np.concatenate([rng.choice(positive, n_pos, replace=False),
                                 rng.choice(negative, n - n_pos, replace=False)]))


def choose(grid, fit, loss, x, y, folds) -> Linear:
  """The model fitted on everything with the grid value (ordered strongest regularisation
  first) of the lowest pooled out-of-fold loss. `fit(x, y, value, start)`; each fold
  warm-starts from its model at the previous value."""
  scores, models = [], {}
  for value in grid:
    prediction = np.empty(len(y))
    for fold in np.unique(folds):
      train = folds != fold
      models[fold] = fit(x[train], y[train], value, models.get(fold))
      prediction[~train] = models[fold](x[~train])
    scores.append(loss(y, prediction))
  return fit(x, y, grid[int(np.argmin(scores))], None)


def _ridge(x, y, alpha, start):
  del start   # closed form
  return fit_ridge(x, y, alpha)


# ------------------------------------------------------------------ the cohort
def patch_fractions(mask: np.ndarray, starts, size: int) -> np.ndarray:
  """[L] the fraction of each size^3 patch (starting at starts [L, 3]) inside `mask`;
  voxels outside the volume count as outside the mask."""
  volume = Volume(np.asarray(mask, np.uint8), (1.0, 1.0, 1.0))
  return np.array([registration.crop_patch(volume, s, size, 0).mean() for s in starts],
                  np.float32)


def intensity_features(patches: np.ndarray, lung_patches: np.ndarray) -> np.ndarray:
  """[L, 2]: the mean HU of each patch in the network's window [-1024, 240], and LAA-950,
  the fraction of its lung voxels below -950 HU (0 without lung voxels)."""
  axes = (1, 2, 3)
  mean_hu = np.clip(patches.astype(np.float32), HU_LOW, HU_HIGH).mean(axes)
  lung = lung_patches > 0
  low = np.sum((patches < synthetic_ct.LAA_THRESHOLD_HU) & lung, axes)
  laa = low / np.maximum(lung.sum(axes), 1)
  return np.stack([mean_hu, laa], -1).astype(np.float32)


def store_options(root: str) -> ct_prepare.Options:
  saved = ct_patches.read_options(root)["options"]
  return ct_prepare.Options(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in saved.items()})


def cache_key(root: str, population_seed: int) -> str:
  """What a cached subject depends on: the store's options and atlas, the population."""
  atlas = ct_patches.read_atlas(root)
  text = json.dumps({"store": ct_patches.read_options(root)["options"],
                     "atlas": atlas.atlas_id, "locations": atlas.num_locations,
                     "population_seed": population_seed, "version": CACHE_VERSION},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_subject(root: str, population_seed: int, index: int, path: str) -> None:
  """Renders, resamples and maps one evaluation subject onto the store; writes `path`.

  A lung mask or registration failure is saved as Dice NaN (dropped), with the message.
  """
  options = store_options(root)
  ct = synthetic_ct.subject(population_seed, index, shape=options.synthetic_size,
                            disease=True)
  image = resample(ct.image, options.spacing_mm, order=3)
  image = image.with_array(np.clip(image.array, *ct_prepare.HU_RANGE).astype(np.int16))
  emphysema = resample(ct.image.with_array(ct.emphysema.astype(np.uint8)),
                       options.spacing_mm, order=0, cval=0)
  out = {"severity": ct.severity}
  try:
    lungs = atlas_lib.lung_mask(image)
    mapped = ct_prepare.map_to_store(root, image, lungs)
  except ValueError as e:
    out.update(dice=math.nan, error=str(e))
  else:
    size, starts = options.image_size, mapped["starts"]
    lung_patches = np.stack([registration.crop_patch(lungs, s, size, 0) for s in starts])
    # A coronal slice through the middle of the patch grid, for the figure.
    y = int(np.clip(np.median(starts[:, 1]) + size // 2, 0, image.shape[1] - 1))
    out.update(dice=mapped["dice"], patches=mapped["patches"], starts=starts,
               emphysema_fraction=patch_fractions(emphysema.array, starts, size),
               intensity=intensity_features(mapped["patches"], lung_patches),
               coronal_y=y, coronal=image.array[:, y], coronal_emphysema=emphysema.array[:, y])
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **out)
  os.replace(tmp, path)


@dataclasses.dataclass
class Cohort:
  """The kept subjects' small arrays; their patches stay in `paths` until encoded."""
  indices: np.ndarray              # [M] phantom indices
  paths: list
  dice: np.ndarray                 # [M]
  severity: np.ndarray             # [M]
  emphysema_fraction: np.ndarray   # [M, L]
  intensity: np.ndarray            # [M, L, 2]
  starts: np.ndarray               # [M, L, 3]
  dropped: list                    # [{"index", "dice", "error"?}]

  @property
  def presence(self) -> np.ndarray:
    return self.severity > 0


def build_cohort(root: str, cohort_config, cache_dir: str, workers: int = 0,
                 log=print) -> Cohort:
  """Every subject of the cohort mapped onto the store (cached), the failed ones dropped."""
  options = store_options(root)
  seed = cohort_config.population_seed
  if seed == options.source_seed and options.volumes == "synthetic_ct":
    raise ValueError(f"config cohort.population_seed={seed} is the store's pretraining "
                     "population (source_seed): pick another, held-out one")
  key = cache_key(root, seed)
  os.makedirs(cache_dir, exist_ok=True)
  indices = list(range(cohort_config.first_index,
                       cohort_config.first_index + cohort_config.num_subjects))
  paths = [os.path.join(cache_dir, f"subject_{key}_{i:05d}.npz") for i in indices]
  todo = [(root, seed, i, p) for i, p in zip(indices, paths) if not os.path.exists(p)]
  if todo:
    start = time.time()
    log(f"Mapping {len(todo)} of {len(indices)} cohort subjects onto {root} "
        f"({workers or 1} process(es); cached in {cache_dir})")
    if workers > 0:
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(prepare_subject, *zip(*todo)))
    else:
      for args in todo:
        prepare_subject(*args)
    log(f"  mapped in {time.time() - start:.0f} s")
  kept, dropped, rows = [], [], []
  for index, path in zip(indices, paths):
    with np.load(path) as f:
      dice = float(f["dice"])
      if not dice >= options.min_dice:   # NaN too
        dropped.append({"index": index, "dice": dice, **(
            {"error": str(f["error"])} if "error" in f else {})})
        continue
      kept.append((index, path))
      rows.append({k: f[k] for k in ("severity", "emphysema_fraction", "intensity",
                                     "starts")} | {"dice": dice})
  for d in dropped:
    log(f"  dropped subject {d['index']}: lung Dice with the atlas {d['dice']:.3f} < "
        f"{options.min_dice}" + (f" ({d['error']})" if "error" in d else ""))
  if not rows:
    raise ValueError(f"no cohort subject passed the store's registration check "
                     f"(min_dice {options.min_dice})")

  def stack(name):
    return np.stack([r[name] for r in rows])
  return Cohort(np.array([i for i, _ in kept]), [p for _, p in kept], stack("dice"),
                stack("severity").astype(np.float64), stack("emphysema_fraction"),
                stack("intensity"), stack("starts"), dropped)


# ------------------------------------------------------------------ the encoder
def network_input(hu) -> np.ndarray:
  """int16 HU [...] -> the encoder's input [..., 1]: training's mapping without the
  augmentation (clip to [-1024, 240], + 1024, then view units and x / 632 - 1)."""
  shifted = np.clip(np.asarray(hu, np.float32), HU_LOW, HU_HIGH) - HU_LOW
  return to_network(to_view_units(shifted))[..., None]


@dataclasses.dataclass(eq=False)
class PatchEncoder:
  """DrasCLR's encoder f with its variables {"params", "batch_stats"}, the store whose
  atlas it reads, and what it is (`info`, in results.json)."""
  variables: dict
  num_experts: int
  store: str
  info: dict

  @functools.cached_property
  def _apply(self):
    encoder = DrasCLREncoder(self.num_experts)
    return jax.jit(lambda v, x, loc: encoder.apply(v, x, loc, train=False))

  def features(self, paths, loc, locations_per_batch: int, subjects_per_batch: int,
               log=print) -> np.ndarray:
    """h [M, L, 128] of the cached subjects' patches, each at its location loc [L, 3].

    Chunks are padded to fixed shapes [G, n, S, S, S, 1], so there is one compilation."""
    num_locations = len(loc)
    g = min(locations_per_batch, num_locations)
    n = min(subjects_per_batch, len(paths))
    padded_loc = np.concatenate([loc, np.repeat(loc[-1:], -num_locations % g, 0)])
    out = []
    start = time.time()
    for first in range(0, len(paths), n):
      chunk = paths[first:first + n]
      patches = []
      for path in chunk:
        with np.load(path) as f:
          patches.append(f["patches"])
      # [L, n, S, S, S]: locations first, as the encoder groups them
      hu = np.stack(patches, 1)
      hu = np.pad(hu, [(0, len(padded_loc) - num_locations), (0, n - len(chunk))]
                  + [(0, 0)] * 3, mode="edge")
      h = [np.asarray(self._apply(self.variables, jnp.asarray(network_input(hu[i:i + g])),
                                  jnp.asarray(padded_loc[i:i + g])))
           for i in range(0, len(padded_loc), g)]
      out.append(np.swapaxes(np.concatenate(h)[:num_locations, :len(chunk)], 0, 1))
    log(f"Encoded {len(paths)} subjects x {num_locations} locations in "
        f"{time.time() - start:.0f} s")
    return np.concatenate(out).astype(np.float32)


def random_encoder(store: str, seed: int, num_experts: int) -> PatchEncoder:
  """The architecture from its own initialisers, key `seed`, for the store's patches."""
  size = ct_patches.read_atlas(store).patch_size
  encoder = DrasCLREncoder(num_experts)
  variables = jax.jit(encoder.init)(jax.random.key(seed),
                                    jnp.zeros((1, 1, size, size, size, 1)), jnp.zeros((1, 3)))
  return PatchEncoder(jax.device_get(variables), num_experts, store,
                      {"init": "random", "kind": "random", "seed": seed,
                       "num_experts": num_experts})


def run_encoder(run_dir: str, which: str, step: int | None = None) -> PatchEncoder:
  """A DrasCLR run's encoder (`which`: auto / query = f_q, key = f_k) and its store."""
  from anatjax import train  # pylint: disable=g-import-not-at-top  (heavy: the trainer)
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise FileNotFoundError(f"--init={run_dir!r} is neither 'random' nor a run directory "
                            "(no checkpoints/ in it)")
  config, method, state, step = train.load_checkpoint(run_dir, step)
  if config.method != "drasclr":
    raise ValueError(f"--init={run_dir}: a {config.method} run; this protocol evaluates "
                     "DrasCLR's 3D encoder")
  variables = method.encoder(state["params"], state["method_state"], which)
  return PatchEncoder(variables, config.drasclr.num_experts,
                      ct_prepare.store_root(config.data),
                      {"init": os.path.abspath(run_dir), "kind": "run", "method": "drasclr",
                       "step": int(step), "which": which,
                       "num_experts": config.drasclr.num_experts})


def load_encoder(init: str, config, store: str = "", step: int | None = None):
  if init == "random":
    if not store:
      raise ValueError("--init=random needs --store=STORE: the patch store whose atlas "
                       "(locations, patch size) the random encoder is evaluated on")
    return random_encoder(store, config.seed, config.num_experts)
  encoder = run_encoder(init, config.which, step)
  if store and os.path.abspath(store) != os.path.abspath(encoder.store):
    raise ValueError(f"--store={store}: a run is evaluated on its own store, "
                     f"{encoder.store}; drop --store")
  return encoder


# ------------------------------------------------------------------ the protocol
def cross_validate(patient_x, patch_x, cohort: Cohort, patch_positive, probe, dense_cs,
                   n_labelled: int, repeat: int) -> dict | None:
  """One repeat at one label count: pooled out-of-fold predictions {"severity" [M],
  "presence" [M] logits, "dense" [M, L] logits}; None when n_labelled exceeds a fold's
  training subjects."""
  presence, severity = cohort.presence, cohort.severity
  m, num_locations = patch_positive.shape
  rng = np.random.default_rng([probe.seed, repeat])
  folds = stratified_folds(presence, probe.folds, rng)
  out = {"severity": np.full(m, np.nan), "presence": np.full(m, np.nan),
         "dense": np.full((m, num_locations), np.nan)}
  for fold in range(probe.folds):
    pool, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    if n_labelled > len(pool):
      return None
    draw_rng = np.random.default_rng([probe.seed, repeat, fold, n_labelled])
    labelled = stratified_draw(pool, presence, n_labelled or len(pool), draw_rng)
    inner = stratified_folds(presence[labelled], probe.inner_folds, draw_rng)

    mu, sd = norm_stats(patient_x[pool])
    x, x_test = (patient_x[labelled] - mu) / sd, (patient_x[test] - mu) / sd
    model = choose(probe.ridge_alphas, _ridge, squared_error, x, severity[labelled], inner)
    out["severity"][test] = model(x_test)
    model = choose(probe.logistic_cs, fit_logistic, log_loss, x,
                   presence[labelled].astype(float), inner)
    out["presence"][test] = model(x_test)

    mu, sd = norm_stats(patch_x[pool].reshape(-1, patch_x.shape[-1]))
    x = ((patch_x[labelled] - mu) / sd).reshape(-1, patch_x.shape[-1])
    model = choose(dense_cs, fit_logistic, log_loss, x,
                   patch_positive[labelled].ravel().astype(float),
                   np.repeat(inner, num_locations))
    out["dense"][test] = model((patch_x[test] - mu) / sd)
  return out


def score(predictions: dict, cohort: Cohort, patch_positive) -> dict:
  return {("severity", "r2"): r2(cohort.severity, predictions["severity"]),
          ("severity", "spearman"): spearman(cohort.severity, predictions["severity"]),
          ("presence", "auroc"): metrics.auroc(cohort.presence, predictions["presence"]),
          ("dense", "auroc"): metrics.auroc(patch_positive, predictions["dense"])}


def evaluate(feature_sets: dict, cohort: Cohort, config, init: str, log=print):
  """(records, out-of-fold predictions of repeat 0 at the largest label count that ran
  per feature set) for {name: (patient features [M, D], patch features [M, L, D])}."""
  patch_positive = cohort.emphysema_fraction > config.dense.threshold
  records, figure = [], {}
  for name, (patient_x, patch_x) in feature_sets.items():
    for n in sorted(config.probe.label_counts, key=lambda n: n or math.inf):   # 0: all
      runs = [cross_validate(patient_x, patch_x, cohort, patch_positive, config.probe,
                             config.dense.cs, n, r) for r in range(config.probe.repeats)]
      if runs[0] is None:
        log(f"  n_labelled={n} is more than a fold's training subjects: skipped")
        continue
      figure[name] = runs[0]   # the most labels that ran, in the end
      scores = [score(p, cohort, patch_positive) for p in runs]
      for task, metric in TASKS:
        values = [s[(task, metric)] for s in scores]
        defined = [v for v in values if not math.isnan(v)]
        records.append({"task": task, "metric": metric, "n_labelled": n or "all",
                        "init": init, "features": name,
                        "mean": float(np.mean(defined)) if defined else math.nan,
                        "std": float(np.std(defined)) if defined else math.nan,
                        "values": values})
      log(f"  {name}, n_labelled={n or 'all'}: " + ", ".join(
          f"{t} {m} {r['mean']:.3f}" for (t, m), r in zip(TASKS, records[-len(TASKS):])))
  return records, figure


# ------------------------------------------------------------------ report
def markdown(results: dict) -> str:
  c, enc = results["cohort"], results["encoder"]
  described = ("random initialisation (seed {seed})".format(**enc) if enc["kind"] == "random"
               else f"DrasCLR run {enc['init']}, step {enc['step']}, encoder {enc['which']}")
  counts = list(dict.fromkeys(r["n_labelled"] for r in results["records"]))
  lines = [f"# Emphysema on the synthetic CT phantom: {described}", "",
           f"Cohort: {c['num_subjects']} of {c['requested']} phantom subjects (population "
           f"seed {c['population_seed']}) mapped onto {results['store']} "
           f"({c['num_locations']} locations, {c['patch_size']}^3 patches at "
           f"{c['spacing_mm']:g} mm), {len(c['dropped'])} dropped by the registration "
           f"check; {c['with_emphysema']} with emphysema, severity median "
           f"{100 * c['severity_median']:.1f} % of the lungs; {100 * c['dense_positive']:.1f} "
           f"% of the patches emphysematous (> {100 * results['dense_threshold']:g} % of "
           "their voxels).",
           f"{results['repeats']} x stratified {results['folds']}-fold CV over subjects, "
           "out-of-fold predictions pooled per repeat; mean ± std over repeats. "
           f"`{INTENSITY}`: per-patch mean HU and LAA-950 (the phantom's emphysema is "
           "defined below -950 HU: a ceiling, not a competitor). "
           f"{results['seconds']:.0f} s.", "",
           report.table(["features", "task", "metric"] + [
               "all labels" if n == "all" else f"{n} labelled" for n in counts],
               [[name, TASK_TITLES[task], metric] + [
                   _mean_std(results["records"], name, task, metric, n) for n in counts]
                for name in dict.fromkeys(r["features"] for r in results["records"])
                for task, metric in TASKS])]
  if results["figures"]:
    lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in results["figures"])]
  return "\n".join(lines) + "\n"


def _mean_std(records, features, task, metric, n) -> str:
  found = report.select(records, features=features, task=task, metric=metric, n_labelled=n)
  if not found or found[0]["mean"] is None or math.isnan(found[0]["mean"]):
    return "-"
  return f"{found[0]['mean']:.3f} ± {found[0]['std']:.3f}"


def figure(path: str, cohort: Cohort, predictions: dict, patch: int, title: str,
           size: int = 320) -> str:
  """Left: out-of-fold predicted vs true severity (% of the lungs), one colour per feature
  set. Right: the most emphysematous subject's coronal slice, each voxel covered by a
  patch coloured by the mean predicted probability (blue 0 to red 1) of the first feature
  set's dense classifier over the patches covering it (out of fold), the true emphysema
  outlined in green."""
  top, left = 50, 70
  img = report.canvas(left + 2 * size + 40, top + size + 50)
  report.text(img, title, (10, 20), 0.45)
  truth = 100 * cohort.severity
  values = np.concatenate([truth] + [100 * p["severity"] for p in predictions.values()])
  lo, hi = float(values.min()), float(values.max())
  pad = 0.05 * max(hi - lo, 1e-6)
  ax = report.Axes(img, (left, top, left + size, top + size), (lo - pad, hi + pad),
                   (lo - pad, hi + pad))
  cv2.line(img, ax.px(lo, lo), ax.px(hi, hi), report.GREY, 1, cv2.LINE_AA)
  for i, p in enumerate(predictions.values()):
    for t, v in zip(truth, 100 * p["severity"]):
      cv2.circle(img, ax.px(t, v), 3, report.colour(i), -1, cv2.LINE_AA)
  report.legend(img, [(n, report.colour(i)) for i, n in enumerate(predictions)],
                (left + 10, top + 40), dot=True)
  ticks = np.linspace(lo, hi, 4)
  ax.yticks(ticks, "{:.1f}")
  ax.xticks(ticks, [f"{t:.1f}" for t in ticks])
  report.text(img, "true severity, % of the lungs", (left + size // 2 - 90, top + size + 40))
  report.text(img, "predicted", (8, top - 8))

  dense = next(iter(predictions.values()))["dense"]
  subject = int(np.argmax(cohort.severity))
  with np.load(cohort.paths[subject]) as f:
    slice_hu, mask, y = f["coronal"], f["coronal_emphysema"], int(f["coronal_y"])
  total, count = np.zeros(slice_hu.shape), np.zeros(slice_hu.shape)
  for start, logit in zip(cohort.starts[subject], dense[subject]):
    if start[1] <= y < start[1] + patch:
      z0, x0 = np.maximum(start[[0, 2]], 0)
      z1, x1 = np.minimum(start[[0, 2]] + patch, slice_hu.shape)
      total[z0:z1, x0:x1] += sigmoid(logit)
      count[z0:z1, x0:x1] += 1
  side = max(slice_hu.shape)

  def square(a, nearest=False):   # superior at the top, padded to a square, upscaled
    a = np.pad(a[::-1], [(0, side - a.shape[0]), (0, side - a.shape[1])])
    return report.upscale(a, size, nearest)
  window = np.uint8(np.clip((slice_hu.astype(np.float32) + 1000) / 1200, 0, 1) * 255)
  panel = report.grey_bgr(square(window))
  heat = cv2.applyColorMap(square(np.uint8(255 * total / np.maximum(count, 1))),
                           cv2.COLORMAP_JET)
  covered = square(np.uint8(count > 0), nearest=True) > 0
  panel[covered] = cv2.addWeighted(panel, 0.5, heat, 0.5, 0)[covered]
  contours, _ = cv2.findContours(square(np.uint8(mask) * 255, nearest=True),
                                 cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(panel, contours, -1, (0, 255, 0), 1, cv2.LINE_AA)
  x0 = left + size + 20
  img[top:top + size, x0:x0 + size] = panel
  report.text(img, f"subject {cohort.indices[subject]}, coronal: P(patch emphysematous), "
              f"{next(iter(predictions))}", (x0, top - 8), 0.35)
  return report.save(path, img)


# ------------------------------------------------------------------ the command
def run(config, init: str | PatchEncoder, workdir: str, *, store: str = "",
        step: int | None = None, workers: int = 0, log=print) -> dict:
  """The command (module docstring). `init`: 'random', a DrasCLR run directory, or a
  PatchEncoder (its own store)."""
  start = time.time()
  encoder = init if isinstance(init, PatchEncoder) else load_encoder(init, config, store,
                                                                     step)
  root = encoder.store
  options, atlas = store_options(root), ct_patches.read_atlas(root)
  os.makedirs(workdir, exist_ok=True)
  cohort = build_cohort(root, config.cohort,
                        config.cohort.cache_dir or os.path.join(workdir, "cohort"),
                        workers, log)
  if cohort.presence.all() or not cohort.presence.any():
    raise ValueError(f"the {len(cohort.severity)} kept subjects are all "
                     f"{'with' if cohort.presence.any() else 'without'} emphysema: "
                     "a larger cohort is needed")
  h = encoder.features(cohort.paths, atlas.loc_norm, config.features.locations_per_batch,
                       config.features.subjects_per_batch, log)
  feature_sets = {"encoder": (h.mean(1), h),
                  INTENSITY: (cohort.intensity.mean(1), cohort.intensity)}
  records, predictions = evaluate(feature_sets, cohort, config, encoder.info["init"], log)
  results = {
      "protocol": "ct_emphysema", "encoder": encoder.info, "store": os.path.abspath(root),
      "cohort": {"population_seed": config.cohort.population_seed,
                 "requested": config.cohort.num_subjects,
                 "num_subjects": len(cohort.severity), "indices": cohort.indices,
                 "dropped": cohort.dropped, "dice_min": float(cohort.dice.min()),
                 "with_emphysema": int(cohort.presence.sum()),
                 "severity_median": float(np.median(cohort.severity)),
                 "dense_positive": float(np.mean(cohort.emphysema_fraction
                                                 > config.dense.threshold)),
                 "num_locations": atlas.num_locations, "patch_size": atlas.patch_size,
                 "spacing_mm": options.spacing_mm},
      "dense_threshold": config.dense.threshold, "repeats": config.probe.repeats,
      "folds": config.probe.folds, "records": records, "config": config.to_dict(),
  }
  name = "random encoder" if encoder.info["kind"] == "random" else "DrasCLR encoder"
  results["figures"] = [os.path.relpath(figure(
      os.path.join(workdir, "figures", "ct_emphysema.png"), cohort, predictions,
      atlas.patch_size, f"Emphysema, out of fold ({name}; repeat 0, the most labels)"), workdir)]
  results["seconds"] = time.time() - start
  report.write_results(workdir, results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(report.jsonable(results)))
  log(markdown(report.jsonable(results)))
  return results


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from anatjax.config import config_name  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  config_arg = f["config"].serialize().split("=", 1)[1]
  workdir = f.workdir or (
      os.path.join(f.init, "eval", config_name(config_arg)) if f.init != "random"
      else os.path.join("workdirs", "eval", f"{config_name(config_arg)}_random"))
  try:
    run(f.config, f.init, workdir, store=f.store, step=f.step, workers=f.workers,
        log=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"Error: {e}") from e
  print(f"Outputs in {os.path.abspath(workdir)}")


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "configs/eval/ct_emphysema.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("init", None, "A DrasCLR run directory, or 'random'.", required=True)
  flags.DEFINE_string("workdir", None, "Output folder (default RUN_DIR/eval/<config>).")
  flags.DEFINE_string("store", "", "The patch store (its atlas) for --init=random.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a run (default: newest).")
  flags.DEFINE_integer("workers", 0, "Processes registering cohort subjects (0: this one).")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
