import jax
import jax.numpy as jnp
import numpy as np

from anatjax.models import decoders, heads, vit


def test_sincos_table_matches_mae_construction():
  dim, grid = 16, 3
  table = vit.sincos_2d(grid, grid, dim)
  assert table.shape == (1 + grid * grid, dim)
  assert not table[0].any()  # CLS row is zero
  # Independent: per token (row r, col c), channels [sin(c w), cos(c w), sin(r w), cos(r w)].
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  for r in range(grid):
    for c in range(grid):
      want = np.concatenate([np.sin(c * omega), np.cos(c * omega),
                             np.sin(r * omega), np.cos(r * omega)])
      np.testing.assert_allclose(table[1 + r * grid + c], want, atol=1e-6)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_vit_b16_layout_and_size():
  model = vit.ViT(**vit.parse_variant("B/16"))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  params = shapes["params"]
  assert set(params) == {"embedding", "cls", "Transformer"}
  assert params["embedding"]["kernel"].shape == (16, 16, 3, 768)
  block = params["Transformer"]["encoderblock_11"]
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (768, 12, 64)
  assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (768, 3072)
  assert "encoder_norm" in params["Transformer"]
  # timm's vit_base_patch16_224 without classifier: 85,798,656 including its [197, 768]
  # position table, which is a fixed constant here.
  assert _count(params) + 197 * 768 == 85_798_656


def test_prototype_head_is_per_position_cosine():
  head = heads.PositionPrototypeHead(num_positions=4, num_prototypes=5, hidden_dim=8,
                                     bottleneck_dim=6)
  tokens = jax.random.normal(jax.random.key(0), (2, 4, 10))
  variables = head.init(jax.random.key(1), tokens)
  logits = np.asarray(head.apply(variables, tokens))
  v = np.asarray(variables["params"]["prototypes"])
  assert v.shape == (4, 6, 5) and np.abs(v).max() <= 6 ** -0.5
  # Independent: run the MLP by hand, then a loop over positions and prototypes.
  p = jax.tree.map(np.asarray, variables["params"])
  gelu = lambda x: np.asarray(jax.nn.gelu(x, approximate=False))
  x = gelu(np.asarray(tokens) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  x = gelu(x @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
  x = x @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
  u = x / np.linalg.norm(x, axis=-1, keepdims=True)
  for j in range(4):
    for k in range(5):
      w = v[j, :, k] / np.linalg.norm(v[j, :, k])
      np.testing.assert_allclose(logits[:, j, k], u[:, j] @ w, atol=1e-5)
  assert np.abs(logits).max() <= 1 + 1e-5


def test_unpatchify_order():
  patches = np.arange(2 * 4 * 12).reshape(2, 4, 12).astype(np.float32)  # p=2, C=3, grid 2x2
  image = np.asarray(decoders.unpatchify(patches, 2, 2, 2))
  assert image.shape == (2, 4, 4, 3)
  # token j = 1 (row 0, col 1) covers rows 0-1, cols 2-3; its vector is (p_row, p_col, c).
  np.testing.assert_array_equal(image[0, 0:2, 2:4, :], patches[0, 1].reshape(2, 2, 3))


def test_decoder_replaces_flagged_tokens_by_position_mask_tokens():
  dec = decoders.RestorationDecoder(2, 2, patch_size=2, channels=1, width=8, depth=1,
                                    num_heads=2, mlp_dim=16)
  tokens = jax.random.normal(jax.random.key(0), (1, 5, 6))
  abn = jnp.array([[True, False, False, True]])
  variables = dec.init(jax.random.key(1), tokens, abn)
  out = dec.apply(variables, tokens, abn)
  assert out.shape == (1, 4, 4, 1)
  # Flagged tokens carry no information about the encoder tokens at those positions.
  changed = tokens.at[0, 1].add(5.0).at[0, 4].add(5.0)  # tokens of positions 0 and 3
  np.testing.assert_allclose(dec.apply(variables, changed, abn), out, atol=1e-6)
  assert not np.allclose(dec.apply(variables, tokens.at[0, 2].add(5.0), abn), out)


def _stack_blocks(transformer_params, depth, prefix="encoderblock"):
  blocks = [transformer_params.pop(f"{prefix}_{i}") for i in range(depth)]
  transformer_params[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return transformer_params


def test_scan_and_remat_compute_the_same_function_and_gradients():
  kwargs = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  plain = vit.ViT(**kwargs)
  params = jax.jit(plain.init)(jax.random.key(1), images)["params"]
  stacked = dict(params, Transformer=_stack_blocks(dict(params["Transformer"]), 2))

  def loss(model, p):
    return jnp.sum(jnp.sin(model.apply({"params": p}, images)))

  want, want_grad = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  for remat, scan in (("none", True), ("full", False), ("dots", True)):
    model = vit.ViT(**kwargs, remat=remat, scan=scan)
    p = stacked if scan else params
    # The scanned form's own initialisation has the stacked layout.
    shapes = jax.eval_shape(model.init, jax.random.key(1), images)["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(jnp.shape, p)
    got, grad = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(p)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{remat} {scan}")
    if scan:
      grad = vit.unstack_blocks(grad)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  unstacked = vit.unstack_blocks(stacked)
  for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
