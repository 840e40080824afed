"""Alice: self-distillation across anatomically matched views of two patients, a masked
student with reconstruction, and CASA token alignment (shared/methods/alice.md; Jiang et
al., ICCV 2023).

A batch item is a mined pair (anatjax/data/ct_volumes.py, data/alice_pairs.py): the crop of
patient A around a foreground point p and the crop of patient B around p's match q
(int16 HU, scaled to [0, 1] here), and one student mask per crop. Matches come from
provider (b), affine maps to an atlas (alice.provider=affine, the default), or provider
(a), the fields of a trained anatomy embedding (alice.provider=embedding,
alice.embedding_run; `pair_matching`). Views are stacked view 0 then view 1 (n = 2B)
through the networks. One step (spec 4.2):
1. `prepare`, no gradients, whole global batch: the EMA teacher (Swin + decoder + head,
   one last layer V_t) on the unmasked crops -> CLS logits t_cls and decoder-token logits
   Dt_t; the CLS centre c moves with them (the loss uses the old c);
2. `loss`: the student (stochastic depth) on the masked crops x (1 - m) -> s_cls, encoder-
   token logits E, decoder-token logits Dt_s and the reconstruction x_hat; CASA (shared
   parameters) gives S = CASA(E, Dt_s) and the target T = sg(CASA(E, Dt_t));
     L = L_cls (teacher view q -> student view v != q) + L_patch (S -> T within each view)
         + 5 mean (x_hat - x)^2 over every voxel of the unmasked crops,
   teacher temperatures 0.008 -> 0.01 per epoch over the first 30, student 0.1; the patch
   centre c2 moves with T (returned as method state);
3. AdamW (DINO's recipe: per-tensor clipping at 3 of student and CASA gradients, weight
   decay 0.04 -> 0.4 on ndim >= 2, lr warm-up + cosine; V_cls and V_patch frozen during
   epoch 0); then the teacher follows the student, m = 0.996 -> 1 (cosine), V_t <- V_cls.
params = {encoder (Swin), decoder, head, casa}; method_state = {teacher {encoder, decoder,
head without v_patch}, centre, centre2}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anatjax import config as config_lib, losses, optim
from anatjax.data import alice_pairs, correspondence, ct_volumes
from anatjax.methods import Method
from anatjax.methods.common import teacher_or_student
from anatjax.models.alice import CASA, AliceHead, ReconstructionDecoder, casa_student_and_target
from anatjax.models.swin3d import SwinViT3D

LAST_LAYERS = r"head/v_(cls|patch)$"
PROVIDERS = ("affine", "embedding")


def swin_from_config(model, drop_path_rate: float = 0.0, dtype=jnp.float32) -> SwinViT3D:
  """The Swin encoder a config's `model` block describes (evaluation builds it too)."""
  return SwinViT3D(feature_size=model.feature_size, depths=tuple(model.depths),
                   num_heads=tuple(model.num_heads), window_size=model.window_size,
                   patch_size=model.patch_size, drop_path_rate=drop_path_rate,
                   downsample=model.downsample, dtype=dtype)


def views_first(x):
  """[B, 2, ...] -> [2B, ...], view 0 of every item first, then view 1."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def by_view(x):
  """[2B, ...] -> [2, B, ...]."""
  return x.reshape(2, x.shape[0] // 2, *x.shape[1:])


def voxel_mask(cells, size: int):
  """Cell masks [n, 4, 4] (columns over (y, x), through all z) or [n, 4, 4, 4] -> float32
  voxel masks [n, S, S, S, 1], 1 = hidden from the student."""
  m = cells.astype(jnp.float32)
  for axis in range(1, cells.ndim):
    m = jnp.repeat(m, size // cells.shape[axis], axis=axis)
  if cells.ndim == 3:
    m = jnp.broadcast_to(m[:, None], (m.shape[0], size, size, size))
  return m[..., None]


def teacher_part(params):
  """The student's parameters the teacher has: all but CASA and V_patch (V_t is V_cls's
  EMA, kept under its name)."""
  head = {k: v for k, v in params["head"].items() if k != "v_patch"}
  return {"encoder": params["encoder"], "decoder": params["decoder"], "head": head}


def pair_matching(config) -> tuple:
  """(host transforms before the miner, the miner's matcher) of alice.provider. 'affine'
  (provider (b)) matches the source's caches as they come; 'embedding' (provider (a))
  first swaps them for the memory-mapped fields of the anatomy_embedding run
  alice.embedding_run, computed here once per volume store if missing: here, because the
  fields come from a JAX network, which Grain workers must not run. The store must exist
  (training prepares it before building the method)."""
  cfg = config.alice
  if cfg.provider not in PROVIDERS:
    raise ValueError(f"config alice.provider={cfg.provider!r}: use one of {PROVIDERS}")
  if cfg.provider == "affine":
    if cfg.embedding_run:
      raise ValueError(f"config alice.embedding_run={cfg.embedding_run!r} is used with "
                       "alice.provider='embedding' only: set both, or clear it")
    return (), correspondence.AffineMatcher(cfg.score_mode)
  if not cfg.embedding_run:
    raise ValueError("config alice.provider='embedding' needs alice.embedding_run: the "
                     "workdir of an anatomy_embedding run (configs/anatomy_embedding.py)")
  fields = ct_volumes.FieldCaches(ct_volumes.ensure_fields(
      ct_volumes.store_root(config.data), cfg.embedding_run))
  return (fields,), fields.matcher()


def make(config, schedule) -> Method:
  cfg, model, opt = config.alice, config.model, config.optim
  crop = config.data.image_size
  multiple = model.patch_size * 2 ** len(model.depths)
  if crop % multiple or crop % alice_pairs.MASK_GRID:
    raise ValueError(f"config data.image_size={crop} (the crop edge) must be a multiple of "
                     f"{multiple} (patch {model.patch_size} x 2^{len(model.depths)} stages) "
                     f"and of the mask grid {alice_pairs.MASK_GRID}")
  dtype = config_lib.compute_dtype(model.dtype)
  student_swin = swin_from_config(model, model.drop_path_rate, dtype)
  teacher_swin = swin_from_config(model, 0.0, dtype)
  decoder = ReconstructionDecoder(dtype=dtype)
  head_kwargs = dict(out_dim=model.out_dim, width=model.head_width,
                     hidden_dim=model.head_hidden_dim, bottleneck_dim=model.bottleneck_dim,
                     dtype=dtype)
  student_head = AliceHead(teacher=False, **head_kwargs)
  teacher_head = AliceHead(teacher=True, **head_kwargs)
  casa = CASA(cfg.casa.num_heads, cfg.casa.head_dim, cfg.casa.ffn_dim, cfg.casa.dropout,
              dtype=dtype)
  accumulate = config.grad_accum_steps

  def network(swin, head, params, x, train=False, rng=None):
    """x [n, S, S, S, 1] -> (cls [n, K], encoder tokens [n, L3, K], decoder tokens
    [n, L2, K], x_hat [n, S, S, S, 1])."""
    hidden = swin.apply({"params": params["encoder"]}, x, train=train,
                        rngs={"dropout": rng} if train else None)
    x_hat, u2 = decoder.apply({"params": params["decoder"]}, hidden)
    cls, enc, dec = head.apply({"params": params["head"]}, hidden[-1], hidden[-2], u2)
    return cls, enc, dec, x_hat

  def crops(batch):
    return alice_pairs.to_unit(views_first(batch["crops"]))[..., None]

  def init(rng):
    k_swin, k_dec, k_head, k_casa = jax.random.split(rng, 4)
    x = jnp.zeros((1, crop, crop, crop, 1))
    hidden = teacher_swin.init(k_swin, x)
    hidden_states = teacher_swin.apply(hidden, x)
    decoder_vars = decoder.init(k_dec, hidden_states)
    _, u2 = decoder.apply(decoder_vars, hidden_states)
    head_vars = student_head.init(k_head, hidden_states[-1], hidden_states[-2], u2)
    tokens = jnp.zeros((1, 1, model.out_dim))   # CASA's shapes depend on K only
    params = {"encoder": hidden["params"], "decoder": decoder_vars["params"],
              "head": head_vars["params"],
              "casa": casa.init(k_casa, tokens, tokens)["params"]}
    zeros = jnp.zeros((model.out_dim,), jnp.float32)
    return params, {"teacher": teacher_part(params), "centre": zeros, "centre2": zeros}

  epoch = lambda step: jnp.asarray(step) // schedule.steps_per_epoch
  # The reference's np.linspace(0.008, 0.01, E)[epoch]: a per-epoch linear ramp.
  ramp = optim.linear(cfg.warmup_teacher_temp, cfg.teacher_temp,
                      max(cfg.warmup_teacher_temp_epochs - 1, 0))
  teacher_temp = lambda step: ramp(epoch(step))

  def prepare(params, method_state, batch, step):
    del params
    t_cls, _, t_dec, _ = network(teacher_swin, teacher_head, method_state["teacher"],
                                 crops(batch))
    t_cls, t_dec = jax.lax.stop_gradient((by_view(t_cls), by_view(t_dec)))
    centre = method_state["centre"]
    probs = jax.nn.softmax((t_cls - centre) / teacher_temp(step), axis=-1)
    context = {"centre": centre, "per_example": {
        "teacher_cls": jnp.swapaxes(t_cls, 0, 1), "teacher_dec": jnp.swapaxes(t_dec, 0, 1)}}
    metrics = {
        "teacher_entropy": -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-12), axis=-1)),
        "weak_pairs": jnp.mean(batch["weak"].astype(jnp.float32)),
        "pair_score": jnp.mean(batch["pair_score"]),
    }
    centre = losses.updated_centre(centre, t_cls, cfg.centre_momentum)
    return dict(method_state, centre=centre), context, metrics

  def loss_fn(params, method_state, context, batch, rng, step):
    drop_rng, casa_rng = jax.random.split(rng)
    x = crops(batch)
    hidden = voxel_mask(views_first(batch["mask_cells"]), crop)
    s_cls, s_enc, s_dec, x_hat = network(student_swin, student_head, params,
                                         x * (1.0 - hidden), train=True, rng=drop_rng)
    student, target = casa_student_and_target(
        casa, params["casa"], s_enc, s_dec, views_first(batch["teacher_dec"]), train=True,
        rng=casa_rng, teacher_dropout=cfg.casa.teacher_dropout)
    t_cls = jnp.swapaxes(batch["teacher_cls"], 0, 1)
    tau = teacher_temp(step)
    loss_cls = losses.alice_cls_distillation(by_view(s_cls), t_cls, context["centre"],
                                             cfg.student_temp, tau)
    loss_patch = losses.alice_patch_distillation(by_view(student), by_view(target),
                                                 method_state["centre2"], cfg.student_temp,
                                                 tau)
    loss_rec = losses.alice_reconstruction(x_hat, x, cfg.rec_weight / 2)
    loss = (cfg.cls_weight * loss_cls + cfg.patch_weight * loss_patch + loss_rec) / accumulate
    metrics = {"loss": loss, "loss_cls": loss_cls / accumulate,
               "loss_patch": loss_patch / accumulate, "loss_rec": loss_rec / accumulate,
               "agreement": losses.alice_argmax_agreement(t_cls, by_view(s_cls)) / accumulate}
    centre2 = losses.updated_centre(method_state["centre2"], target, cfg.centre_momentum)
    return loss, {**metrics, "method_state": {"centre2": centre2}}

  teacher_momentum = optim.cosine(cfg.teacher_momentum, 1.0, schedule.total_steps)

  def after_update(params, method_state, step):
    """The teacher follows the student over the shared names (V_t <- V_cls)."""
    m = teacher_momentum(step)
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, method_state["teacher"],
                           teacher_part(params))
    return dict(method_state, teacher=teacher)

  def encoder_params(params, method_state, which="auto"):
    return teacher_or_student(params, method_state, which, "Alice")

  def with_encoder(params, method_state, load):
    del params, method_state, load
    raise ValueError("config init_from: Alice's 3-D Swin encoder does not load 2-D ViT "
                     "weights files")

  lr = optim.warmup_cosine(opt.base_lr * schedule.batch_size / opt.base_batch_size,
                           schedule.steps(opt.warmup, "optim.warmup"), schedule.total_steps,
                           opt.min_lr)
  wd = optim.cosine(opt.weight_decay, opt.weight_decay_end, schedule.total_steps)
  optimizer = optim.dino_adamw(
      opt, lr, wd, frozen=LAST_LAYERS,
      freeze_steps=schedule.steps(cfg.freeze_last_layer, "alice.freeze_last_layer"))
  before, matcher = pair_matching(config)
  host = before + (alice_pairs.MinePairs(matcher, crop, cfg.mask_mode, cfg.mask_fraction,
                                         cfg.partner),)
  return Method("alice", init, prepare, loss_fn, after_update, optimizer, encoder_params,
                with_encoder, host,
                {"lr": lr, "weight_decay": wd, "teacher_momentum": teacher_momentum,
                 "teacher_temp": teacher_temp})
