"""The 3-D Swin encoder (anatjax/models/swin3d.py) against MONAI's SwinUNETR.swinViT, and its
export (anatjax/export/swin3d.py): strict loading, hidden-state parity in both directions,
the shifted-window mask, the merge orders.

A tiny configuration keeps the file fast on a small CPU: feature_size 12 (MONAI wants a
multiple of 12) with MONAI's default depths and heads, so head_dim is 4 and every stage has
an unshifted and a shifted block.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from anatjax.export import swin3d as swin_export
from anatjax.models import swin3d

monai = pytest.importorskip("monai")
torch = pytest.importorskip("torch")
# pylint: disable=g-import-not-at-top,wrong-import-position  (MONAI only where installed)
from monai.networks.nets import SwinUNETR
from monai.networks.nets import swin_unetr as monai_swin

CONFIG = dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))
ENCODER = swin3d.SwinViT3D(**CONFIG)
APPLY = jax.jit(ENCODER.apply)
# (batch, spatial size). 64^3 is the Alice crop: stage grids 32, 16, 8 padded to 35, 21, 14,
# and at 4^3 the window shrinks to 4 (the top-left slice of the 7^3 index matrix). The odd
# size pads the input to the patch, the grids to the window and to even sizes before each
# merge, and mixes axes: stage 2 is 12 x 7 x 16 (the 7-axis unshifted, the others shifted),
# stage 3 is 6 x 4 x 8 with window (6, 4, 7), shift (0, 0, 3) and a sliced index.
SIZES = [(2, (64, 64, 64)), (1, (46, 26, 61))]
TOLERANCE = 1e-4


def _monai_net():
  return SwinUNETR(in_channels=1, out_channels=2, downsample="mergingv2", use_v2=False, **CONFIG)


def _monai_states(encoder, x: np.ndarray) -> list[np.ndarray]:
  """MONAI's hidden states for NDHWC x, back in NDHWC."""
  with torch.no_grad():
    states = encoder(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), normalize=True)
  return [s.numpy().transpose(0, 2, 3, 4, 1) for s in states]


def _assert_states_match(ours, theirs):
  assert len(ours) == len(theirs) == 5
  for s, (a, b) in enumerate(zip(ours, theirs)):
    assert a.shape == b.shape, (s, a.shape, b.shape)
    np.testing.assert_allclose(np.asarray(a), b, atol=TOLERANCE, rtol=0, err_msg=f"h{s}")


@pytest.fixture(scope="module")
def params():
  """Encoder parameters with NumPy random values (Flax's init compiles slowly on a small
  CPU): kernels at a 1/sqrt(fan-in) scale, LayerNorms far from the identity, biases and
  bias tables large enough that a wrong transpose or index shows."""
  shapes = jax.eval_shape(ENCODER.init, jax.random.key(0), jnp.zeros((1, 32, 32, 32, 1)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0.0, 0.5, leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)["params"]


@pytest.fixture(scope="module")
def exported(params, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("swin") / "swin.safetensors")
  info = swin_export.export_swin3d(params, out, metadata={"method": "alice", "step": 3})
  return out, info


@pytest.fixture(scope="module")
def monai_encoder(exported):
  """MONAI's swinViT, built by the sidecar's constructor call, with the file loaded
  strictly."""
  out, info = exported
  net = eval(info["monai_create_model"], {"monai": monai, "N": 2})   # pylint: disable=eval-used
  tensors = safetensors.numpy.load_file(out)
  result = net.swinViT.load_state_dict(
      {k.removeprefix("swinViT."): torch.from_numpy(v) for k, v in tensors.items()},
      strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  return net.swinViT.eval()


def test_export_loads_strictly_into_monai(params, exported, monai_encoder):
  out, info = exported
  tensors = safetensors.numpy.load_file(out)
  reference = _monai_net().swinViT.state_dict()
  assert {k.removeprefix("swinViT.") for k in tensors} == set(reference)
  for key, value in reference.items():
    assert tensors["swinViT." + key].shape == tuple(value.shape), key
    assert tensors["swinViT." + key].dtype == value.numpy().dtype, key
  # The index buffers are MONAI's own constant; the transposes put [out, in] first.
  index = "layers3.0.blocks.1.attn.relative_position_index"
  np.testing.assert_array_equal(tensors["swinViT." + index], reference[index].numpy())
  np.testing.assert_array_equal(
      tensors["swinViT.patch_embed.proj.weight"][5, 0, 1, 0, 1],
      params["patch_embed"]["proj"]["kernel"][1, 0, 1, 0, 5])
  np.testing.assert_array_equal(tensors["swinViT.layers2.0.blocks.1.attn.qkv.weight"],
                                params["layers2"]["blocks_1"]["attn"]["qkv"]["kernel"].T)
  np.testing.assert_array_equal(tensors["swinViT.layers4.0.downsample.norm.weight"],
                                params["layers4"]["downsample"]["norm"]["scale"])
  with open(out + ".json") as f:
    assert json.load(f) == json.loads(json.dumps(info))
  assert info["depths"] == [2, 2, 2, 2] and info["num_heads"] == [3, 6, 12, 24]
  assert info["method"] == "alice" and "mergingv2" in info["monai_create_model"]


@pytest.mark.parametrize("batch,size", SIZES)
def test_hidden_states_match_monai(params, monai_encoder, batch, size):
  x = np.random.default_rng(1).normal(size=(batch, *size, 1)).astype(np.float32)
  _assert_states_match(APPLY({"params": params}, x), _monai_states(monai_encoder, x))


def test_import_from_monai(params):
  """A MONAI SwinUNETR's state dict (encoder and decoder) -> Flax parameters that give
  MONAI's hidden states; and export then import is the identity."""
  roundtrip = swin_export.params_from_monai(swin_export.monai_state_dict(params))
  jax.tree.map(np.testing.assert_array_equal, roundtrip, jax.tree.map(np.asarray, params))

  torch.manual_seed(0)
  net = _monai_net()
  with torch.no_grad():   # away from MONAI's init (unit LayerNorms, 0.02 bias tables)
    for value in net.parameters():
      value.add_(0.2 * torch.randn_like(value))
  imported = swin_export.params_from_monai(net.state_dict())
  assert jax.tree.map(np.shape, imported) == jax.tree.map(np.shape, params)
  batch, size = SIZES[-1]   # the size compiled above
  x = np.random.default_rng(2).normal(size=(batch, *size, 1)).astype(np.float32)
  _assert_states_match(APPLY({"params": imported}, x), _monai_states(net.swinViT.eval(), x))

  broken = dict(net.state_dict())
  broken["swinViT.layers1.0.blocks.0.attn.relative_position_index"] = torch.zeros(
      343, 343, dtype=torch.int64)
  with pytest.raises(ValueError, match="relative position index"):
    swin_export.params_from_monai(broken)


@pytest.mark.parametrize("padded,window,shift", [
    ((14, 14, 14), (7, 7, 7), (3, 3, 3)),
    ((14, 7, 21), (7, 7, 7), (3, 0, 3)),     # an axis no larger than the window
    ((6, 4, 14), (6, 4, 7), (0, 0, 3)),
])
def test_shift_mask_is_monais(padded, window, shift):
  ours = swin3d.shifted_window_mask(padded, window, shift)
  theirs = monai_swin.compute_mask(list(padded), window, shift, "cpu").numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_shifted_block_does_not_attend_across_regions():
  """In a shifted block on a 14^3 grid (window 7, shift 3), positions 11 and 1 of each axis
  share a window after the roll (rolled positions 8 and 12) but lie in different regions,
  [7, 11) and [11, 14): no gradient flows between them, while position 13 (rolled 10, in
  11's window and region) receives one."""
  rolled = np.roll(np.arange(14), -3)
  assert [list(rolled).index(i) for i in (11, 1, 13)] == [8, 12, 10]
  windows = swin3d.window_partition(
      np.roll(np.arange(14 ** 3).reshape(1, 14, 14, 14, 1), -3, axis=(1, 2, 3)), (7, 7, 7))
  flat = lambda p: np.ravel_multi_index(p, (14, 14, 14))
  shared = [w for w in np.asarray(windows)[0, :, :, 0] if flat((11, 11, 11)) in w]
  assert flat((1, 1, 1)) in shared[0] and flat((13, 13, 13)) in shared[0]

  block = swin3d.SwinBlock(num_heads=2, window=(7, 7, 7), shifted=True)
  x = np.random.default_rng(3).normal(size=(1, 14, 14, 14, 8)).astype(np.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)
  rng = np.random.default_rng(4)
  variables = jax.tree.map(lambda l: rng.normal(0, 0.3, l.shape).astype(np.float32), shapes)
  grad = jax.jit(jax.grad(lambda x: block.apply(variables, x)[0, 11, 11, 11].sum()))(x)
  grad = np.abs(np.asarray(grad)[0]).sum(-1)
  assert grad[1, 1, 1] == 0.0            # the -100 mask: exp(-100) underflows the gradient
  assert grad[13, 13, 13] > 1e-4         # same window, same region
  assert grad[11, 11, 4] == 0.0          # another window altogether


@pytest.mark.parametrize("order", sorted(swin3d.MERGE_ORDERS))
def test_merge_orders(order):
  """The merge's LayerNorm input is the sub-grids x[i::2, j::2, k::2] in the order's
  sequence: "mergingv2" is itertools.product's, "merging" MONAI's pre-1.5 sequence that
  takes (0, 1, 0) and (0, 0, 1) twice and never (1, 1, 0) or (0, 1, 1)."""
  expected = {"mergingv2": "000 001 010 011 100 101 110 111",
              "merging": "000 100 010 001 101 010 001 111"}[order].split()
  x = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4, 1)
  merge = swin3d.PatchMerging(order)
  variables = jax.tree_util.tree_map_with_path(   # the identity LayerNorm
      lambda path, l: np.full(l.shape, path[-1].key != "bias", np.float32),
      jax.eval_shape(merge.init, jax.random.key(0), x))
  _, state = merge.apply(variables, x, capture_intermediates=True)
  normed = np.asarray(state["intermediates"]["norm"]["__call__"][0])
  concat = np.concatenate([x[:, int(o[0])::2, int(o[1])::2, int(o[2])::2] for o in expected], -1)
  reference = (concat - concat.mean(-1, keepdims=True)) / np.sqrt(
      concat.var(-1, keepdims=True) + swin3d.LN_EPSILON)
  np.testing.assert_allclose(normed, reference, atol=1e-5)
