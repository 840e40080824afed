"""LD's shape-guided variant (issue 8, spec 7.2): reference shapes on the host, the
discriminator's layout, and the adversarial losses' values and gradient separation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatjax.config import Schedule
from anatjax.data.ld_views import ShapeReferences, shape_bank
from anatjax.data.synthetic_cxr import STRUCTURES
from anatjax.methods import ld, make
from anatjax.models.shape_discriminator import ShapeDiscriminator
from configs import ld_unet

SIZE = 160


def test_reference_shapes_are_augmented_binary_masks(tmp_path):
  bank = shape_bank("", "lungs", 3, 64, seed=1)
  assert bank.shape == (3, 64, 64) and set(np.unique(bank)) == {0, 1}
  assert 0.1 < bank.mean() < 0.6                    # two lungs, not the whole image
  refs = ShapeReferences(bank, 32)
  out = refs.random_map({"view1": 0}, np.random.default_rng(0))
  assert out["view1"] == 0 and out["shape_masks"].shape == (2, 32, 32, 1)
  assert set(np.unique(out["shape_masks"])) <= {0.0, 1.0} and out["shape_masks"].any()
  again = refs.random_map({}, np.random.default_rng(0))["shape_masks"]
  np.testing.assert_array_equal(out["shape_masks"], again)
  full = ShapeReferences(np.ones((1, 40, 40), np.uint8), 40, max_cut=0.0)
  cover = np.mean([full.random_map({}, np.random.default_rng(s))["shape_masks"].mean()
                   for s in range(10)])
  assert 0.6 < cover < 1.0   # a rotated square leaves its corners empty
  import cv2  # pylint: disable=g-import-not-at-top
  (tmp_path / "masks").mkdir()
  cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.uint8(bank[0] * 255))
  from_folder = shape_bank(str(tmp_path / "masks"), "lungs", 10, 64, seed=0)
  np.testing.assert_array_equal(from_folder, bank[:1])
  with pytest.raises(ValueError, match="unknown structure"):
    shape_bank("", "spleen", 1, 32, seed=0)
  assert "lungs" in STRUCTURES


def test_discriminator_layout_and_size_check():
  disc = ShapeDiscriminator()
  shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)))
  kernels = {k: v["kernel"].shape for k, v in shapes["params"].items()}
  assert kernels == {"conv0": (3, 3, 1, 16), "conv1": (3, 3, 16, 32),
                     "conv2": (3, 3, 32, 32), "conv3": (3, 3, 32, 32),
                     "conv4": (3, 3, 32, 32), "valid0": (3, 3, 32, 32),
                     "valid1": (3, 3, 32, 32), "fc0": (1, 1, 32, 32), "fc1": (1, 1, 32, 1)}
  with pytest.raises(ValueError, match="at least 160"):
    jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, 128, 128, 1)))


def test_adversarial_terms_values_and_gradients_go_where_they_belong():
  disc = ShapeDiscriminator()
  params = disc.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)))["params"]
  rng = np.random.default_rng(0)
  maps = jnp.asarray(rng.random((2, SIZE, SIZE, 1)), jnp.float32)
  real = jnp.asarray(rng.random((2, SIZE, SIZE, 1)) > 0.5, jnp.float32)
  terms = ld.adversarial_terms(disc, params, maps, real)
  d_fake = np.asarray(disc.apply({"params": params}, maps), np.float64)
  d_real = np.asarray(disc.apply({"params": params}, real), np.float64)
  assert float(terms["adv"]) == pytest.approx(-np.log(d_fake).mean(), rel=1e-5)
  assert float(terms["disc"]) == pytest.approx(
      -0.5 * (np.log(d_real).mean() + np.log(1 - d_fake).mean()), rel=1e-5)
  # d adv / d D = 0 and d disc / d maps = 0: one backward of the sum updates each side
  # with its own loss only. (One jitted Jacobian of both terms: one compile.)
  terms_of = lambda p, m: tuple(ld.adversarial_terms(disc, p, m, real)[k]
                                for k in ("adv", "disc"))
  (adv_p, adv_m), (disc_p, disc_m) = jax.jit(jax.jacrev(terms_of, argnums=(0, 1)))(
      params, maps)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(adv_p))
  assert float(jnp.abs(disc_m).max()) == 0
  assert float(jnp.abs(adv_m).max()) > 0
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(disc_p))


def test_shape_guided_config_builds_the_method():
  config = ld_unet.get_config("stage=2,shape_guided,runlocal")
  assert config.batch_size == 6 and config.ld.num_clusters == 8 and config.ld.crop_size == 160
  method = make(config, Schedule.from_config(config, 256))
  params, _ = jax.eval_shape(method.init, jax.random.key(0))
  assert "discriminator" in params and "cluster_head" in params
  assert params["cluster_head"]["out"]["bias"].shape == (8,)
  assert type(method.host_transforms[-1]).__name__ == "ShapeReferences"
  with pytest.raises(ValueError, match="stage-2 variant"):
    ld_unet.get_config("stage=1,shape_guided")
