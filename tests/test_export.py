"""Encoder export to timm (safetensors, big_vision .npz) and import back (issue 3)."""

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from anatjax import export, train
from anatjax.export import vit as vit_table
from anatjax.models.vit import ViT, parse_variant, sincos_2d
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ helpers
def random_encoder(variant, size, channels, depth=0, seed=0):
  """(module, params): a ViT with random weights everywhere, LayerNorms and biases included
  (not the init's ones and zeros), kernels scaled 1/sqrt(fan-in) so activations are O(1)."""
  cfg = parse_variant(variant)
  if depth:
    cfg["depth"] = depth
  module = ViT(**cfg)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, size, size, channels)))["params"]
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in export.flatten(shapes).items():
    shape = leaf.shape
    noise = rng.standard_normal(shape, dtype=np.float32)
    if path.endswith("scale"):
      value = 1.0 + 0.3 * noise
    elif path.endswith("bias"):
      value = 0.1 * noise
    elif path == "cls":
      value = noise
    else:
      fan_in = (np.prod(shape[:-1]) if "MultiHeadDotProductAttention_0/out" in path
                or path == "embedding/kernel" or len(shape) == 2 else shape[0])
      value = noise / np.sqrt(fan_in)
    flat[path] = value.astype(np.float32)
  return module, export.unflatten(flat)


def timm_features(model, images_nhwc):
  import torch
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def make_timm(info):
  """The printed create_model call, run as printed (plus weight_init='skip': the weights
  are all loaded afterwards, and timm's own init of a B/16 takes ~9 s on this CPU)."""
  timm = pytest.importorskip("timm")
  call = info["timm_create_model"]
  assert call.endswith(", num_classes=0)")
  fast = call[:-len(")")] + ", weight_init='skip')"
  return eval(fast, {"timm": timm}).eval()


def load_safetensors_strict(model, path):
  import safetensors.torch
  result = model.load_state_dict(safetensors.torch.load_file(path), strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  return model


def assert_same_tree(a, b):
  fa, fb = export.flatten(a), export.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ------------------------------------------------------------------ parity with timm
PARITY = [
    # variant, image size, channels, depth: stock B/16; another size + 1 channel; another
    # patch size + depth + size.
    ("B/16", 224, 3, 0),
    ("Ti/16", 112, 1, 0),
    ("S/8", 64, 3, 2),
]
EXPECTED_CALLS = {
    "B/16": "timm.create_model('vit_base_patch16_224', num_classes=0)",
    "Ti/16": "timm.create_model('vit_tiny_patch16_224', img_size=112, in_chans=1, "
             "num_classes=0)",
    "S/8": "timm.create_model('vit_small_patch8_224', img_size=64, depth=2, num_classes=0)",
}


@pytest.mark.parametrize("variant,size,channels,depth", PARITY)
def test_timm_parity_and_round_trip(tmp_path, variant, size, channels, depth):
  pytest.importorskip("timm")
  module, params = random_encoder(variant, size, channels, depth)
  batch = 1 if variant == "B/16" else 2
  images = np.random.default_rng(1).standard_normal((batch, size, size, channels),
                                                     dtype=np.float32)
  tokens = np.asarray(jax.jit(module.apply)({"params": params}, images))
  out = str(tmp_path / "enc.safetensors")
  info = export.export_encoder(params, out, image_size=size, metadata={"step": 7})
  assert info["timm_create_model"] == EXPECTED_CALLS[variant]
  model = load_safetensors_strict(make_timm(info), out)
  err = np.abs(timm_features(model, images) - tokens).max()
  print(f"{variant}@{size}px/{channels}ch: max abs |timm - anatjax| = {err:.2e}")
  assert err <= 1e-4
  # the round trip: timm file -> anatjax gives the very same parameters
  assert_same_tree(export.import_encoder(out, params, image_size=size), params)
  # the header carries the metadata, as strings
  with safetensors.safe_open(out, framework="numpy") as f:
    header = f.metadata()
  assert header["step"] == "7" and header["format_version"] == str(export.FORMAT_VERSION)
  assert json.loads(header["mean"]) == info["mean"]


def test_npz_through_timms_own_loader_matches_safetensors(tmp_path):
  torch = pytest.importorskip("torch")
  module, params = random_encoder("S/8", 48, 1, depth=2, seed=3)
  st, npz = str(tmp_path / "enc.safetensors"), str(tmp_path / "enc.bv")
  info = export.export_encoder(params, st, image_size=48)
  export.export_encoder(params, npz, image_size=48, format="npz")
  with np.load(npz) as z:
    assert z["embedding/kernel"].dtype == np.float32
    assert z["pos_embedding"].shape == (1, 1 + 36, 384)
  from_st = load_safetensors_strict(make_timm(info), st)
  from_npz = make_timm(info)
  from_npz.load_pretrained(npz)
  images = np.random.default_rng(2).standard_normal((2, 48, 48, 1)).astype(np.float32)
  a, b = timm_features(from_st, images), timm_features(from_npz, images)
  assert np.abs(a - b).max() <= 1e-6
  for (k, v), (k2, v2) in zip(from_st.state_dict().items(), from_npz.state_dict().items()):
    assert k == k2 and torch.equal(v, v2), k
  # and the .npz imports back too
  assert_same_tree(export.import_encoder(npz, params, image_size=48), params)


def test_avg_pool_hint_gives_the_mean_patch_token(tmp_path):
  """README's fine-tuning hint: global_pool='avg', fc_norm=False keeps the same weights
  (strict load) and pools the encoder's patch tokens; plain global_pool='avg' would not."""
  timm = pytest.importorskip("timm")
  import torch
  module, params = random_encoder("mu/8", 32, 3, seed=4)
  out = str(tmp_path / "enc.safetensors")
  info = export.export_encoder(params, out, image_size=32)
  call = info["timm_create_model"].replace("num_classes=0", "num_classes=0, global_pool='avg', "
                                           "fc_norm=False")
  model = load_safetensors_strict(eval(call, {"timm": timm}).eval(), out)
  images = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    pooled = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  tokens = np.asarray(module.apply({"params": params}, images))
  assert np.abs(pooled - tokens[:, 1:].mean(1)).max() <= 1e-5
  plain = eval(info["timm_create_model"].replace("num_classes=0", "num_classes=0, "
                                                 "global_pool='avg'"), {"timm": timm})
  with pytest.raises(RuntimeError, match="fc_norm"):
    load_safetensors_strict(plain, out)


# ------------------------------------------------------------------ import paths and errors
def _tiny(depth=1, variant="mu/8", seed=0):
  return random_encoder(variant, 32, 3, depth, seed)[1]


def _timm_state(params, size=32):
  """The export's state dict, as NumPy."""
  flat = export.flatten(params)
  geo = vit_table.geometry({k: v.shape for k, v in flat.items()}, size)
  state = {row.torch: row.to_torch(*(flat[p] for p in row.jax))
           for row in vit_table.table(geo.depth)}
  state.update(vit_table.torch_extras(geo))
  return state


def test_truncated_safetensors_is_refused_naming_the_file(tmp_path):
  params = _tiny()
  out = str(tmp_path / "enc.safetensors")
  export.export_encoder(params, out, image_size=32)
  data = open(out, "rb").read()
  for cut in (len(data) - 100, 20, 0):
    open(out, "wb").write(data[:cut])
    with pytest.raises(export.WeightsFileError, match=re.escape(out) + ".*truncated"):
      export.import_encoder(out, params, image_size=32)


def test_wrong_architecture_lists_keys_and_shapes(tmp_path):
  out = str(tmp_path / "enc.safetensors")
  export.export_encoder(_tiny(depth=2), out, image_size=32)
  with pytest.raises(export.WeightsFileError) as e:      # deeper file, shallower encoder
    export.import_encoder(out, _tiny(depth=1), image_size=32)
  msg = str(e.value)
  assert out in msg and "unexpected keys (12)" in msg and "blocks.1.attn.qkv.weight" in msg
  assert "missing" not in msg
  with pytest.raises(export.WeightsFileError) as e:      # shallower file, deeper encoder
    export.import_encoder(out, _tiny(depth=3), image_size=32)
  assert "missing keys (12)" in str(e.value) and "blocks.2.mlp.fc2.bias" in str(e.value)
  # another width: every tensor mismatches, each named with both shapes
  wide = random_encoder("Ti/8", 32, 3, depth=2)[1]
  with pytest.raises(export.WeightsFileError) as e:
    export.import_encoder(out, wide, image_size=32)
  msg = str(e.value)
  assert "patch_embed.proj.weight: file (32, 3, 8, 8) vs encoder (192, 3, 8, 8)" in msg
  assert "blocks.0.attn.qkv.weight: file (96, 32) vs encoder (576, 192)" in msg
  assert "pos_embed: file (1, 17, 32) vs encoder (1, 17, 192)" in msg
  # a key missing and a stray one
  state = _timm_state(_tiny())
  state["blocks.0.extra"] = state.pop("norm.bias")
  safetensors.numpy.save_file(state, out)
  with pytest.raises(export.WeightsFileError,
                     match=r"missing keys \(1\): norm.bias\n  unexpected keys \(1\): "
                           r"blocks.0.extra"):
    export.import_encoder(out, _tiny(), image_size=32)


def test_torch_checkpoints_afire_release_layout_and_refusals(tmp_path):
  torch = pytest.importorskip("torch")
  params = _tiny(depth=2)
  state = {k: torch.from_numpy(np.array(v)) for k, v in _timm_state(params).items()}
  # AFiRe's release: teacher/student dicts, encoder.* + head.* keys, other entries
  release = {
      "teacher": {**{f"encoder.{k}": v for k, v in state.items()},
                  "head.mlp.0.weight": torch.zeros(4, 32), "head.prototypes": torch.ones(16, 8)},
      "student": {f"encoder.{k}": v + 1 for k, v in state.items()},
      "epoch": 400,
  }
  path = str(tmp_path / "afire_release.pth")
  torch.save(release, path)
  assert_same_tree(export.import_encoder(path, params, image_size=32), params)
  student = export.import_encoder(path, params, image_size=32, which="student")
  np.testing.assert_array_equal(student["embedding"]["bias"], params["embedding"]["bias"] + 1)
  # a plain timm state dict with a classifier (skipped)
  plain = str(tmp_path / "timm.pt")
  torch.save({**state, "head.weight": torch.zeros(10, 32)}, plain)
  assert_same_tree(export.import_encoder(plain, params, image_size=32), params)
  # not weights-only: refused, with torch's reason
  release["args"] = argparse.Namespace(lr=1e-3)
  bad = str(tmp_path / "with_args.pth")
  torch.save(release, bad)
  with pytest.raises(export.WeightsFileError) as e:
    export.import_encoder(bad, params, image_size=32)
  msg = str(e.value)
  assert bad in msg and "not a weights-only checkpoint" in msg
  assert "argparse.Namespace" in msg and "Weights only load failed" in msg
  # a truncated .pth
  open(bad, "wb").write(open(path, "rb").read()[:100])
  with pytest.raises(export.WeightsFileError, match=re.escape(bad)):
    export.import_encoder(bad, params, image_size=32)


def test_pth_without_torch_names_the_file(tmp_path, monkeypatch):
  path = str(tmp_path / "weights.pth")
  open(path, "wb").write(b"\x80\x04not really")
  monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` now fails
  with pytest.raises(export.WeightsFileError, match=re.escape(path) + ".*needs torch"):
    export.import_encoder(path, _tiny(), image_size=32)


def test_position_embedding_checks(tmp_path, caplog):
  params = _tiny()
  out = str(tmp_path / "enc.safetensors")
  state = _timm_state(params)
  safetensors.numpy.save_file(state, out)
  with caplog.at_level("WARNING"):
    export.import_encoder(out, params, image_size=32)
  assert "position embedding" not in caplog.text         # the fixed table itself: silent
  # a learned-looking table: warned about, not loaded
  state["pos_embed"] = state["pos_embed"] + 0.01
  safetensors.numpy.save_file(state, out)
  caplog.clear()
  with caplog.at_level("WARNING"):
    loaded = export.import_encoder(out, params, image_size=32)
  assert "differs from anatjax's fixed 2-D sin-cos table" in caplog.text
  # its CLS row goes into the CLS token (timm adds it there), the rest is as in the file
  np.testing.assert_allclose(loaded["cls"], params["cls"] + 0.01, atol=1e-7)
  np.testing.assert_array_equal(loaded["Transformer"]["encoder_norm"]["scale"],
                                params["Transformer"]["encoder_norm"]["scale"])
  # another grid (file trained at 64 px, encoder at 32 px): resampled for the comparison
  state["pos_embed"] = sincos_2d(8, 8, 32)[None] + 0.05
  safetensors.numpy.save_file(state, out)
  caplog.clear()
  with caplog.at_level("WARNING"):
    export.import_encoder(out, params, image_size=32)
  assert "resampled from its 8x8 grid to 4x4" in caplog.text


def test_timm_model_with_a_cls_position_imports_to_the_same_function(tmp_path):
  """A timm model (its own init), positions set to the sin-cos table except a non-zero CLS
  row: imported into anatjax it computes what timm computes."""
  timm = pytest.importorskip("timm")
  import torch
  import safetensors.torch
  model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                            num_classes=0).eval()
  with torch.no_grad():
    table = torch.from_numpy(np.array(sincos_2d(4, 4, 192)))
    table[0] = torch.randn(192)
    model.pos_embed.copy_(table[None])
  path = str(tmp_path / "timm.safetensors")
  safetensors.torch.save_file(model.state_dict(), path)
  module, target = random_encoder("Ti/8", 32, 3, depth=2)
  params = export.import_encoder(path, target, image_size=32)
  images = np.random.default_rng(6).standard_normal((2, 32, 32, 3)).astype(np.float32)
  tokens = np.asarray(module.apply({"params": params}, images))
  assert np.abs(tokens - timm_features(model, images)).max() <= 1e-4


# ------------------------------------------------------------------ resample_posemb
def test_resample_posemb_by_hand():
  # 2x2 -> 4x4 bilinear (align_corners=False): sources at -0.25 (clamped), 0.25, 0.75, 1.25
  # (clamped) give a, .75a + .25b, .25a + .75b, b along each axis.
  grid = np.array([[0.0, 4.0], [8.0, 12.0]])
  posemb = np.concatenate([[[7.0, -7.0]], np.stack([grid.ravel(), -grid.ravel()], 1)])[None]
  out = export.resample_posemb(posemb, (4, 4), num_prefix_tokens=1, method="bilinear")
  axis = np.array([0.0, 1.0, 3.0, 4.0])                 # 0, .25*4, .75*4, 4
  expected = (2 * axis[:, None] + axis[None, :]).ravel()   # rows step 8, columns step 4
  assert out.shape == (1, 17, 2)
  np.testing.assert_array_equal(out[0, 0], [7.0, -7.0])   # the CLS row is kept
  np.testing.assert_allclose(out[0, 1:, 0], expected)
  np.testing.assert_allclose(out[0, 1:, 1], -expected)
  # the same grid: unchanged, bicubic and bilinear; a constant stays constant
  table = sincos_2d(3, 5, 8)[None]
  for method in ("bicubic", "bilinear"):
    np.testing.assert_allclose(export.resample_posemb(table, (3, 5), old_grid_hw=(3, 5),
                                                      method=method), table, atol=1e-7)
    const = np.full((1, 1 + 9, 4), 2.5, np.float32)
    np.testing.assert_allclose(export.resample_posemb(const, (5, 2), method=method), 
                               np.full((1, 11, 4), 2.5), rtol=1e-6)
  # no prefix tokens, and a non-square grid needs old_grid_hw
  assert export.resample_posemb(table[:, 1:], (6, 10), 0, (3, 5)).shape == (1, 60, 8)
  with pytest.raises(ValueError, match="not a square grid"):
    export.resample_posemb(table, (4, 4))


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resample_posemb_matches_torch_interpolate(method):
  torch = pytest.importorskip("torch")
  posemb = np.random.default_rng(7).standard_normal((1, 1 + 6 * 6, 5)).astype(np.float32)
  for new in ((9, 4), (3, 3), (6, 6), (14, 11)):
    ours = export.resample_posemb(posemb, new, method=method)
    grid = torch.from_numpy(posemb[:, 1:]).reshape(1, 6, 6, 5).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=new, mode=method, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
    np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-5, err_msg=str(new))
    np.testing.assert_array_equal(ours[:, :1], posemb[:, :1])


# ------------------------------------------------------------------ the command, a real run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train(tiny_config(), workdir)
  return workdir


def test_command_on_a_real_run(tiny_run, tmp_path):
  timm = pytest.importorskip("timm")
  out = str(tmp_path / "out" / "afire_teacher.safetensors")
  # `python -m anatjax.export ...`, in a fresh interpreter that must not import torch/timm
  code = ("import runpy, sys\n"
          "sys.argv = ['anatjax.export'] + sys.argv[1:]\n"
          "try:\n  runpy.run_module('anatjax.export', run_name='__main__', alter_sys=True)\n"
          "except SystemExit as e:\n  assert not e.code, e.code\n"
          "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'imported torch'\n")
  proc = subprocess.run(
      [sys.executable, "-c", code, f"--workdir={tiny_run}", "--format=timm", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = proc.stdout
  print(printed)
  call = re.search(r"model = (timm\.create_model\(.*\))", printed).group(1)
  assert call == ("timm.create_model('vit_base_patch16_224', img_size=32, patch_size=8, "
                  "embed_dim=32, depth=1, num_heads=2, num_classes=0)")
  assert f"safetensors.torch.load_file({out!r}), strict=True" in printed
  model = load_safetensors_strict(eval(call, {"timm": timm}).eval(), out)

  sidecar = json.load(open(out + ".json"))
  config, method, state, step = train.load_checkpoint(tiny_run)
  assert step == 12
  assert {k: sidecar[k] for k in ("method", "which", "step", "image_size", "channels",
                                  "format_version", "variant", "timm_create_model")} == {
      "method": "afire", "which": "auto", "step": 12, "image_size": 32, "channels": 3,
      "format_version": export.FORMAT_VERSION, "variant": "mu/8", "timm_create_model": call}
  assert sidecar["mean"] == [0.485, 0.456, 0.406] and sidecar["std"] == [0.229, 0.224, 0.225]
  assert sidecar["config"] == json.loads(json.dumps(config.to_dict()))
  with safetensors.safe_open(out, framework="numpy") as f:
    assert json.loads(f.metadata()["config"]) == sidecar["config"]

  # the file holds the teacher of the newest step, and computes what anatjax computes
  teacher = method.encoder(state["params"], state["method_state"], "teacher")
  assert_same_tree(export.import_encoder(out, teacher, image_size=32),
                   jax.tree.map(np.asarray, teacher))
  module = ViT(**parse_variant("mu/8"))
  images = np.random.default_rng(8).standard_normal((2, 32, 32, 3)).astype(np.float32)
  tokens = np.asarray(module.apply({"params": teacher}, images))
  assert np.abs(timm_features(model, images) - tokens).max() <= 1e-4

  # --step / --which through the same function the command calls
  info = export.export_run(tiny_run, str(tmp_path / "s4.npz"), step=4, which="student",
                           format="npz")
  assert info["step"] == 4 and info["which"] == "student"
  _, method, state4, _ = train.load_checkpoint(tiny_run, 4)
  assert_same_tree(export.import_encoder(str(tmp_path / "s4.npz"), teacher, image_size=32),
                   jax.tree.map(np.asarray, state4["params"]["encoder"]))


def test_scanned_encoder_exports_and_imports_in_its_own_layout(tmp_path):
  """ViT(scan=True) stacks its blocks: export writes the same per-block timm file as the
  unrolled model, and the import returns the stacked layout the scanned target has."""
  if "scan" not in ViT.__dataclass_fields__:
    pytest.skip("this ViT has no scan option")
  module, params = random_encoder("mu/8", 32, 3, depth=3)
  scanned = ViT(**{**parse_variant("mu/8"), "depth": 3}, scan=True)
  target = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert "encoderblock" in target["Transformer"]
  flat = export.flatten(params)
  stacked = export.unflatten(vit_table.rescan(flat))
  a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
  export.export_encoder(params, a, image_size=32)
  export.export_encoder(stacked, b, image_size=32)
  ta, tb = safetensors.numpy.load_file(a), safetensors.numpy.load_file(b)
  assert sorted(ta) == sorted(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
  loaded = export.import_encoder(a, target, image_size=32)
  assert_same_tree(loaded, stacked)
  images = np.random.default_rng(9).standard_normal((1, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(scanned.apply({"params": loaded}, images),
                             module.apply({"params": params}, images), atol=1e-5)
