import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anatjax import optim
from anatjax.methods import afire


def test_per_tensor_clipping_with_groups():
  grads = {"a": jnp.full((4,), 3.0), "b": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
  tx = optim.clip_by_norm_per_tensor(1.0, {"a": 0, "b": 1})
  out, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(np.linalg.norm(out["a"]), 6.0 / (6.0 + 1e-6), rtol=1e-6)
  # Each row of b is its own group: the first (norm 5) is scaled, the second (0.5) is not.
  np.testing.assert_allclose(out["b"][0], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(out["b"][1], [0.3, 0.4], rtol=1e-6)


def test_cosine_and_warmup_schedules():
  sched = optim.warmup_cosine(1.0, warmup_steps=10, total_steps=110, end=0.0)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  wd = optim.cosine(0.04, 0.4, 100)
  np.testing.assert_allclose([wd(0), wd(50), wd(100), wd(200)], [0.04, 0.22, 0.4, 0.4],
                             atol=1e-6)


def _opt_config():
  return ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, clip_norm=3.0,
                                        mu_dtype="float32"))


def test_dino_adamw_freezes_prototypes_completely_then_starts_fresh_adam():
  params = {"head": {"prototypes": jnp.ones((2, 3, 4)), "Dense_0": {"bias": jnp.ones(3)}},
            "encoder": {"kernel": jnp.ones((3, 3))}}
  lr, wd, frozen = 0.1, 0.5, 3
  tx = optim.dino_adamw(_opt_config(), lambda s: lr, lambda s: wd, frozen=afire.PROTOTYPES,
                       freeze_steps=frozen, clip_groups=[(afire.PROTOTYPES, 1)])
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  update = jax.jit(tx.update)
  for step in range(frozen + 1):
    updates, state = update(grads, state, params)
    proto = np.asarray(updates["head"]["prototypes"])
    if step < frozen:
      assert not proto.any(), f"prototypes moved at step {step} (weight decay included)"
    else:
      # First unfrozen step = a fresh Adam step (bias-corrected m/sqrt(v) = 1) + decay.
      np.testing.assert_allclose(proto, -lr * (1.0 + wd * 1.0), rtol=1e-5)
    # Kernels decay, biases do not.
    np.testing.assert_allclose(np.asarray(updates["encoder"]["kernel"]),
                               -lr * (1.0 + wd), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["head"]["Dense_0"]["bias"]), -lr,
                               rtol=1e-4)
