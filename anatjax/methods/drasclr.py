"""DrasCLR: location-conditioned MoCo on lung-CT patches at atlas locations.

Specification: shared/methods/drasclr.md (Yu et al., MedIA 2024). A batch holds B
subjects' patches at ONE atlas location l (anatjax/data/ct_patches.py makes the blocks):
two views of the anchor and one of each of its two nearest atlas neighbours. One step:
1. `prepare`, on the whole global batch, without gradients: the key encoder follows the
   query encoder, theta_k = m theta_k + (1 - m) theta_q (before the keys, as MoCo); the
   key pass over view 2 in a random order (shuffle-BN: BatchNorm ghost groups of
   `ghost` shuffled samples; the keys come back in batch order); the location's queue
   Q_l is read, then this batch's keys are enqueued at its pointer;
2. `loss`: the query pass over view 1 at l and the neighbour pass (2B patches, each
   neighbour at its own location, BatchNorm groups spanning both), q and r_j on the unit
   sphere, s = r_1 + r_2 (a sum, not renormalised):
     L = InfoNCE(q; k, Q_l) + beta InfoNCE(s; k, Q_l),  tau = 0.2, beta = 0 during the
   neighbour warm-up epochs; the query BatchNorm averages move with the anchor pass, then
   the neighbour pass;
3. SGD (momentum 0.9, coupled weight decay 1e-4 on all parameters), lr 0.01 with a
   cosine stepped per epoch.
Method state: the key encoder (params and BatchNorm statistics), the query encoder's
BatchNorm statistics, queue [L, K, 128] (unit vectors) and ptr [L].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from anatjax import config as config_lib, losses
from anatjax.data import ct_patches, ct_prepare
from anatjax.data.patch_views import DrasCLRViews, PatchAugment, to_network
from anatjax.methods import Method
from anatjax.models.cnn3d import DrasCLRNetwork

ENCODERS = ("auto", "query", "key")


def unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def initial_queue(key, num_locations: int, size: int, dim: int):
  """[L, K, dim] i.i.d. normal vectors on the unit sphere (spec 4.1)."""
  return unit(jax.random.normal(key, (num_locations, size, dim), jnp.float32))


def enqueue(queue, ptr, location, keys):
  """queue[l, ptr[l] : ptr[l] + B] = keys; ptr[l] advances by B modulo K (K % B == 0)."""
  start = ptr[location]
  queue = jax.lax.dynamic_update_slice(queue, keys[None].astype(queue.dtype),
                                       (location, start, jnp.zeros_like(start)))
  return queue, ptr.at[location].set((start + keys.shape[0]) % queue.shape[1])


def epoch_cosine(base_lr: float, steps_per_epoch: int, total_epochs: float):
  """lr_e = base 0.5 (1 + cos(pi e / E)), e = the step's whole epoch (spec 5)."""
  def schedule(step):
    epoch = jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_epoch)
    return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / total_epochs))
  return schedule


def make(config, schedule) -> Method:
  cfg = config.drasclr
  atlas = ct_patches.read_atlas(ct_prepare.store_root(config.data))
  batch, micro = config.batch_size, config.batch_size // config.grad_accum_steps
  if cfg.queue_size % batch:
    raise ValueError(f"config drasclr.queue_size={cfg.queue_size} must be a multiple of "
                     f"batch_size={batch}: whole batches of keys are enqueued")
  if cfg.bn_mode not in ("ghost", "global"):
    raise ValueError(f"config drasclr.bn_mode={cfg.bn_mode!r}: use 'ghost' (shuffle-BN "
                     "emulation, the default) or 'global'")
  ghost = cfg.ghost if cfg.bn_mode == "ghost" else 0
  if ghost and (micro % ghost or batch % ghost):
    raise ValueError(f"config drasclr.ghost={ghost}: BatchNorm ghost groups must divide "
                     f"the batch ({batch}) and the micro-batch ({micro}); or use "
                     "drasclr.bn_mode=global")
  network = DrasCLRNetwork(cfg.num_experts, cfg.projection_dim,
                           config_lib.compute_dtype(config.model.dtype))
  size, accumulate = atlas.patch_size, config.grad_accum_steps
  shuffle_key = jax.random.fold_in(jax.random.key(config.seed), 0x5B)
  warmup_steps = schedule.steps(f"{cfg.neighbour_warmup_epochs}ep",
                                "drasclr.neighbour_warmup_epochs")

  def forward(params, batch_stats, patches, locations):
    """Training-mode pass of [G, n, S, S, S] view units at locations [G, 3] -> (unit
    embeddings [G, n, dim], new BatchNorm statistics)."""
    x = to_network(patches)[..., None]
    (_, z), updated = network.apply({"params": params, "batch_stats": batch_stats}, x,
                                    locations, train=True, ghost=ghost,
                                    mutable=["batch_stats"])
    return unit(z), updated["batch_stats"]

  def init(rng):
    net_key, queue_key = jax.random.split(rng)
    variables = network.init(net_key, jnp.zeros((1, 1, size, size, size, 1)),
                             jnp.zeros((1, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    return params, {
        "batch_stats": stats,
        "key": {"params": params, "batch_stats": stats},
        "queue": initial_queue(queue_key, atlas.num_locations, cfg.queue_size,
                               cfg.projection_dim),
        "ptr": jnp.zeros([atlas.num_locations], jnp.int32),
    }

  def prepare(params, method_state, batch, step):
    m = cfg.momentum
    key_params = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q,
                              method_state["key"]["params"], params)
    order = jax.random.permutation(jax.random.fold_in(shuffle_key, step), batch["view2"].shape[0])
    shuffled, key_stats = forward(key_params, method_state["key"]["batch_stats"],
                                  batch["view2"][order][None], batch["loc"][:1])
    keys = jnp.zeros_like(shuffled[0]).at[order].set(shuffled[0])   # back in batch order
    location = batch["loc_idx"][0]
    negatives = method_state["queue"][location]
    queue, ptr = enqueue(method_state["queue"], method_state["ptr"], location, keys)
    method_state = dict(method_state, queue=queue, ptr=ptr,
                        key={"params": key_params, "batch_stats": key_stats})
    return method_state, {"per_example": {"key": keys}, "negatives": negatives}, {}

  def loss_fn(params, method_state, context, batch, rng, step):
    del rng
    q, stats = forward(params, method_state["batch_stats"], batch["view1"][None],
                       batch["loc"][:1])
    r, stats = forward(params, stats, jnp.swapaxes(batch["neigh"], 0, 1),
                       batch["neigh_loc"][0])
    keys, negatives = batch["key"], context["negatives"]
    patch, patch_logits = losses.queue_info_nce(q[0], keys, negatives, cfg.temperature)
    neighbour, neighbour_logits = losses.queue_info_nce(r[0] + r[1], keys, negatives,
                                                        cfg.temperature)
    beta = jnp.where(step < warmup_steps, 0.0, cfg.beta)
    loss = (patch + beta * neighbour) / accumulate
    metrics = {"loss": loss, "loss_patch": patch / accumulate,
               "loss_neighbour": neighbour / accumulate}
    for name, logits in (("patch", patch_logits), ("neighbour", neighbour_logits)):
      for k in (1, 5):
        metrics[f"{name}_top{k}"] = losses.top_k_accuracy(logits, k) / accumulate
    return loss, {**metrics, "method_state": {"batch_stats": stats}}

  def after_update(params, method_state, step):
    del params, step
    return method_state

  def encoder_params(params, method_state, which="auto"):
    """f_q (the released encoder, also 'auto') or f_k: params and BatchNorm statistics."""
    if which in ("auto", "query"):
      return {"params": params["encoder"],
              "batch_stats": method_state["batch_stats"]["encoder"]}
    if which == "key":
      return {"params": method_state["key"]["params"]["encoder"],
              "batch_stats": method_state["key"]["batch_stats"]["encoder"]}
    raise ValueError(f"which={which!r}: DrasCLR has the encoders {list(ENCODERS)}")

  def with_encoder(params, method_state, load):
    del params, method_state, load
    raise ValueError("config init_from: DrasCLR's location-conditioned 3D encoder does not "
                     "load 2D ViT weights files")

  total_epochs = schedule.total_steps / schedule.steps_per_epoch
  lr = epoch_cosine(cfg.lr, schedule.steps_per_epoch, max(total_epochs, 1e-9))
  optimizer = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                          optax.sgd(lr, momentum=cfg.sgd_momentum))
  host = (DrasCLRViews(PatchAugment(noise_std_fixed=cfg.noise_std_fixed)),)
  return Method("drasclr", init, prepare, loss_fn, after_update, optimizer, encoder_params,
                with_encoder, host, {"lr": lr})
