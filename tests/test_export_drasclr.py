"""DrasCLR's encoder export (anatjax/export/cnn3d.py) and its reference PyTorch module
(anatjax/export/drasclr_torch.py): key layout, the atlas in the file, and parity with the
Flax encoder in inference mode."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from anatjax.data import ct_patches
from anatjax.export import cnn3d as cnn3d_export
from anatjax.models import cnn3d

torch = pytest.importorskip("torch")
# pylint: disable=g-import-not-at-top,wrong-import-position  (torch only where installed)
from anatjax.export import drasclr_torch

GROUPS, N, SIZE = 2, 3, 16
ENCODER = cnn3d.DrasCLREncoder()


@pytest.fixture(scope="module")
def variables():
  """Encoder variables with NumPy random values (a jitted Flax init compiles slowly on a
  small CPU): experts at their init scale so activations stay of order one, routers and
  BatchNorm far from the identity so that a wrong transpose or statistic shows."""
  shapes = jax.eval_shape(lambda: ENCODER.init(
      jax.random.key(0), jnp.zeros((1, 1, SIZE, SIZE, SIZE, 1)), jnp.zeros((1, 3))))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    names = [p.key for p in path]
    if names[-1] == "kernel" and len(leaf.shape) == 6:
      bound = 1.0 / math.sqrt(math.prod(leaf.shape[1:-1]))
      value = rng.uniform(-bound, bound, leaf.shape)
    elif names[-1] in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0.0, 0.5, leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def atlas():
  corners = np.array([[0, 0, 0], [0, 12, 0], [8, 12, 24]])
  loc_norm = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [1.0, 0.5, 1.0]], np.float32)
  return ct_patches.Atlas(corners, loc_norm, np.array([[1, 2], [0, 2], [1, 0]]), SIZE, 4.0,
                          "subject_007")


@pytest.fixture(scope="module")
def exported(variables, atlas, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("drasclr") / "drasclr.safetensors")
  info = cnn3d_export.export_drasclr(variables, atlas, out,
                                     metadata={"method": "drasclr", "step": 7})
  return out, info


def test_keys_and_shapes_match_the_reference_module(variables):
  tensors = cnn3d_export.torch_state_dict(variables["params"], variables["batch_stats"])
  reference = drasclr_torch.DrasCLREncoder().state_dict()
  assert set(tensors) == set(reference)
  for key, value in reference.items():
    assert tensors[key].shape == tuple(value.shape), key
  kernel = variables["params"]["block2_a_cond"]["kernel"]   # [E, 3, 3, 3, 16, 32]
  np.testing.assert_array_equal(tensors["block2_a_cond.weight"][5, 7, 3, 0, 1, 2],
                                kernel[5, 0, 1, 2, 3, 7])
  np.testing.assert_array_equal(tensors["conv1_cond.router.weight"],
                                variables["params"]["conv1_cond"]["router"]["kernel"].T)
  np.testing.assert_array_equal(tensors["conv4_bn.running_var"],
                                variables["batch_stats"]["conv4_bn"]["var"])
  with pytest.raises(ValueError, match="not the encoder's variables"):
    cnn3d_export.torch_state_dict({"encoder": variables["params"]}, variables["batch_stats"])


def test_the_file_holds_the_atlas_and_its_metadata(exported, atlas):
  out, info = exported
  assert info["torch_create_model"].endswith("DrasCLREncoder(num_experts=8)")
  with safetensors.safe_open(out, framework="numpy") as f:
    header = {k: json.loads(v) for k, v in f.metadata().items()}
    np.testing.assert_array_equal(f.get_tensor("atlas.corners"), atlas.corners)
    assert f.get_tensor("atlas.loc_norm").dtype == np.float32
  assert (header["method"], header["step"], header["atlas_id"]) == ("drasclr", 7, "subject_007")
  assert (header["patch_size"], header["spacing_mm"]) == (SIZE, 4.0)
  encoder, loaded = drasclr_torch.load_drasclr(out)
  assert not encoder.training
  assert (loaded["atlas_id"], loaded["patch_size"], loaded["spacing_mm"]) == (
      "subject_007", SIZE, 4.0)
  np.testing.assert_array_equal(loaded["neighbours"].numpy(), atlas.neighbours)
  np.testing.assert_array_equal(loaded["loc_norm"].numpy(), atlas.loc_norm)


def test_pytorch_reference_module_matches_the_flax_encoder(variables, exported, atlas):
  """Inference mode (running statistics): per location, and with each sample at its own
  location in one batch (the grouped-convolution path)."""
  encoder, loaded = drasclr_torch.load_drasclr(exported[0])
  rng = np.random.default_rng(1)
  x = rng.uniform(-1.0, 1.0, (GROUPS, N, SIZE, SIZE, SIZE, 1)).astype(np.float32)
  loc = atlas.loc_norm[1:1 + GROUPS]
  # jitted: one compilation is quicker here than op-by-op dispatch of the 13 layers
  h = np.asarray(jax.jit(ENCODER.apply)(variables, x, loc))           # [G, n, 128]
  assert np.abs(h[0] - h[1]).max() > 1e-2     # the location changes the features
  patches = torch.from_numpy(x.transpose(0, 1, 5, 2, 3, 4).copy())   # [G, n, 1, S, S, S]
  with torch.no_grad():
    per_location = np.stack([encoder(patches[g], loaded["loc_norm"][1 + g]).numpy()
                             for g in range(GROUPS)])
    per_sample = encoder(patches.flatten(0, 1),
                         loaded["loc_norm"][1:1 + GROUPS].repeat_interleave(N, 0)).numpy()
  diff = max(np.abs(per_location - h).max(), np.abs(per_sample - h.reshape(-1, 128)).max())
  print(f"max abs diff Flax vs PyTorch: {diff:.3g}")
  assert diff <= 1e-4


def test_export_run_writes_the_query_encoder_and_the_runs_atlas(variables, tmp_path,
                                                                 monkeypatch):
  """export_run's DrasCLR branch on a checkpoint stand-in (no training: the store and the
  method are real, `load_checkpoint` returns NumPy-filled variables)."""
  from anatjax import export, train as trainer
  from test_drasclr import tiny_config, write_store   # pylint: disable=import-error
  config = tiny_config(tmp_path / "store")
  write_store(str(tmp_path / "store"), config.data)
  _, _, method = trainer.build(config)
  key_encoder = jax.tree.map(lambda a: a + 1.0, variables)
  state = {"params": {"encoder": variables["params"]},
           "method_state": {"batch_stats": {"encoder": variables["batch_stats"]},
                            "key": {"params": {"encoder": key_encoder["params"]},
                                    "batch_stats": {"encoder": key_encoder["batch_stats"]}}}}
  monkeypatch.setattr(trainer, "load_checkpoint", lambda workdir, step: (config, method,
                                                                         state, 11))
  os.makedirs(tmp_path / "run" / "checkpoints")
  out = str(tmp_path / "f_q.safetensors")
  info = export.export_run(str(tmp_path / "run"), out)
  assert (info["method"], info["which"], info["step"]) == ("drasclr", "auto", 11)
  encoder, atlas = drasclr_torch.load_drasclr(out)
  assert (atlas["atlas_id"], atlas["patch_size"], len(atlas["corners"])) == ("s0", 8, 4)
  np.testing.assert_array_equal(encoder.conv3_bn.running_mean.numpy(),
                                variables["batch_stats"]["conv3_bn"]["mean"])
  export.export_run(str(tmp_path / "run"), out, which="key")
  encoder, _ = drasclr_torch.load_drasclr(out)
  np.testing.assert_array_equal(encoder.conv1_cond.bias.detach().numpy(),
                                key_encoder["params"]["conv1_cond"]["bias"])
  with pytest.raises(ValueError, match="format=timm"):
    export.export_run(str(tmp_path / "run"), out, format="npz")
