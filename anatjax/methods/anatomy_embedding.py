"""Dense anatomical embedding: the model behind Alice's correspondence provider (a)
(shared/methods/alice.md 2.4, after SAM, Yan et al., IEEE TMI 2022).

A batch item is two overlapping, rescaled, intensity-jittered crops of one CT and the
cells of both that show the same physical points (anatjax/data/embedding_pairs.py). The
network (anatjax/models/embed3d.py) turns each crop into a fine field F (stride f) and a
coarse field G (stride c) of unit vectors. For every positive, in both directions (crop 1's
vector as the query against crop 2's field, then the other way; the mean of the two; a
Decision, the spec does not say):
- coarse: InfoNCE, tau = 0.5, over ALL coarse cells of the other crop, the positive's cell
  the target;
- fine: InfoNCE, tau = 0.5, of the positive against 100 hard negatives (the cells most
  similar to the query among those more than 3 cells from the positive, chosen without
  gradient) and 100 random cells of the same set;
  L = L_fine + L_coarse.
AdamW (lr 2e-4, 20k steps in the recipe). Metrics: both losses and their top-1 accuracies
(coarse: the positive is the most similar coarse cell of the other crop; fine: it beats
every cell more than 3 cells away, the hard negatives being the most similar of those).
params = the network; no method state.

`load_provider(run_dir)` turns a trained run into the correspondence provider
(anatjax/data/correspondence.EmbeddingProvider).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anatjax import checkpoint, config as config_lib, losses, optim
from anatjax.data import correspondence, embedding_pairs
from anatjax.methods import Method
from anatjax.models import embed3d


def network_from_config(model, dtype=jnp.float32) -> embed3d.Embed3D:
  """The network a config's `model` block describes (the provider builds it too)."""
  return embed3d.Embed3D(widths=tuple(model.widths), blocks=tuple(model.blocks),
                         stem_stride=model.stem_stride, fpn_width=model.fpn_width,
                         fine_stride=model.fine_stride, fine_dim=model.fine_dim,
                         coarse_stride=model.coarse_stride, coarse_dim=model.coarse_dim,
                         dtype=dtype)


def cell_coordinates(cells: int) -> np.ndarray:
  """[cells^3, 3] (z, y, x) of a cubic grid's cells in flat (row-major) order."""
  return np.indices((cells,) * 3).reshape(3, -1).T.astype(np.int32)


def flat_index(cells, grid: int):
  """Cell coordinates [..., 3] -> flat indices [...] of a grid^3 field."""
  return (cells[..., 0] * grid + cells[..., 1]) * grid + cells[..., 2]


def excluded_cells(radius: float) -> int:
  """Cells within `radius` (Euclidean, in cells) of a cell, itself included."""
  r = int(np.floor(radius))
  offsets = np.indices((2 * r + 1,) * 3).reshape(3, -1).T - r
  return int(np.sum(np.sum(offsets ** 2, axis=1) <= radius ** 2))


def check_config(config) -> None:
  """Clear errors for values the method cannot train with, before anything compiles."""
  cfg, model, crop = config.embedding, config.model, config.data.image_size
  embed3d.levels(model.widths, model.blocks, model.stem_stride, model.fine_stride,
                 model.coarse_stride)
  if crop % model.coarse_stride:
    raise ValueError(f"config data.image_size={crop} (the crop edge) must be a multiple "
                     f"of model.coarse_stride={model.coarse_stride}")
  if cfg.temperature <= 0:
    raise ValueError(f"config embedding.temperature={cfg.temperature} must be positive")
  if cfg.num_positives < 1:
    raise ValueError(f"config embedding.num_positives={cfg.num_positives} must be >= 1")
  available = (crop // model.fine_stride) ** 3 - excluded_cells(cfg.exclusion_radius)
  for name in ("hard_negatives", "random_negatives"):
    if not 1 <= cfg[name] <= available:
      raise ValueError(
          f"config embedding.{name}={cfg[name]}: a {crop}^3 crop has "
          f"{(crop // model.fine_stride) ** 3} fine cells, at least {available} of them "
          f"beyond embedding.exclusion_radius={cfg.exclusion_radius}; use 1..{available}")


def make(config, schedule) -> Method:
  check_config(config)
  cfg, model, opt = config.embedding, config.model, config.optim
  crop = config.data.image_size
  network = network_from_config(model, config_lib.compute_dtype(model.dtype))
  fine_grid, coarse_grid = crop // model.fine_stride, crop // model.coarse_stride
  fine_cells = jnp.asarray(cell_coordinates(fine_grid))
  accumulate = config.grad_accum_steps

  def init(rng):
    params = network.init(rng, jnp.zeros((1, crop, crop, crop, 1)))["params"]
    return params, {}

  def prepare(params, method_state, batch, step):
    del params, batch, step
    return method_state, {}, {}

  def pair_losses(fine, coarse, fine_pos, coarse_pos, rng):
    """One item, both directions: fine [2, N, d], coarse [2, M, d'], positives' flat
    cells fine_pos, coarse_pos [2, P] -> (loss_fine, loss_coarse, top1_fine, top1_coarse)."""
    out = []
    for a, b in ((0, 1), (1, 0)):
      loss_f, logits_f = losses.fine_info_nce(
          fine[a][fine_pos[a]], fine[b], fine_pos[b], fine_cells, jax.random.fold_in(rng, a),
          cfg.temperature, cfg.exclusion_radius, cfg.hard_negatives, cfg.random_negatives)
      loss_c, logits_c = losses.coarse_info_nce(coarse[a][coarse_pos[a]], coarse[b],
                                                coarse_pos[b], cfg.temperature)
      zero = jnp.zeros(logits_f.shape[0], jnp.int32)
      out.append(jnp.stack([loss_f, loss_c, losses.top1(logits_f, zero),
                            losses.top1(logits_c, coarse_pos[b])]))
    return jnp.mean(jnp.stack(out), axis=0)

  def loss_fn(params, method_state, context, batch, rng, step):
    del method_state, context, step
    x = embedding_pairs.to_unit(batch["crops"], batch["jitter"])
    n = x.shape[0]
    fine, coarse = network.apply({"params": params}, x.reshape(-1, crop, crop, crop, 1))
    fine = fine.reshape(n, 2, -1, fine.shape[-1])
    coarse = coarse.reshape(n, 2, -1, coarse.shape[-1])
    terms = jax.vmap(pair_losses)(fine, coarse, flat_index(batch["fine"], fine_grid),
                                  flat_index(batch["coarse"], coarse_grid),
                                  jax.random.split(rng, n))
    loss_fine, loss_coarse, top1_fine, top1_coarse = jnp.mean(terms, axis=0) / accumulate
    loss = loss_fine + loss_coarse
    return loss, {"loss": loss, "loss_fine": loss_fine, "loss_coarse": loss_coarse,
                  "fine_top1": top1_fine, "coarse_top1": top1_coarse}

  def after_update(params, method_state, step):
    del params, step
    return method_state

  def encoder_params(params, method_state, which="auto"):
    del method_state
    if which != "auto":
      raise ValueError(f"which={which!r}: the embedding method trains one network; use "
                       "'auto'")
    return params

  def with_encoder(params, method_state, load):
    del params, method_state, load
    raise ValueError("config init_from: the 3-D embedding network does not load 2-D ViT "
                     "weights files")

  lr = optax.constant_schedule(opt.lr)
  # Decision (spec silent on decay): AdamW's decay on kernels only (ndim >= 2), as the
  # other AdamW recipes here.
  optimizer = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                          weight_decay=opt.weight_decay, mask=optim.decay_mask)
  host = (embedding_pairs.EmbeddingCrops(
      crop, model.fine_stride, model.coarse_stride, num_positives=cfg.num_positives,
      scale_range=tuple(cfg.scale_range), max_shift=cfg.max_shift, contrast=cfg.contrast,
      brightness=cfg.brightness),)
  return Method("anatomy_embedding", init, prepare, loss_fn, after_update, optimizer,
                encoder_params, with_encoder, host, {"lr": lr})


def fields_function(config, params):
  """hu [D, H, W] on the model grid -> (fine, coarse) fields of the whole volume (NumPy
  float32), the network run once on the volume padded with air at its far ends to a
  multiple of the coarse stride (one compile per padded shape)."""
  model = config.model
  network = network_from_config(model, jnp.float32)
  apply = jax.jit(lambda p, x: network.apply({"params": p}, x))

  def fields(hu):
    shape = np.asarray(hu.shape)
    padded = -(-shape // model.coarse_stride) * model.coarse_stride
    x = np.pad(np.asarray(hu, np.float32), [(0, p) for p in padded - shape],
               constant_values=embedding_pairs.HU_RANGE[0])
    x = embedding_pairs.to_unit(x, np.array([1.0, 0.0], np.float32))
    fine, coarse = apply(params, x[None, ..., None])
    keep = lambda field, stride: np.asarray(field[0])[tuple(
        slice(0, n) for n in -(-shape // stride))]
    return keep(fine, model.fine_stride), keep(coarse, model.coarse_stride)
  return fields


def newest_step(run_dir: str) -> int:
  """The newest checkpoint step of an anatomy_embedding run, read from its metadata only
  (cheap: callers check whether fields made from it exist before loading the network)."""
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
  try:
    step = ckpt.existing_step()
    method = ckpt.read_meta(step)["config"]["method"]
  finally:
    ckpt.close()
  if method != "anatomy_embedding":
    raise ValueError(f"{run_dir} is a {method!r} run, not an anatomy_embedding one")
  return step


def load_provider(run_dir: str, step: int | None = None):
  """(provider, step): the EmbeddingProvider of a trained run's checkpoint (default: the
  newest), on the grid its volume store had."""
  from anatjax import train  # pylint: disable=g-import-not-at-top  (train imports methods)
  config, _, state, step = train.load_checkpoint(run_dir, step)
  if config.method != "anatomy_embedding":
    raise ValueError(f"{run_dir} is a {config.method!r} run, not an anatomy_embedding one")
  provider = correspondence.EmbeddingProvider(
      fields_function(config, state["params"]), tuple(config.data.spacing_mm),
      config.model.fine_stride, config.model.coarse_stride)
  return provider, step
