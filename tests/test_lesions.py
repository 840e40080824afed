"""Tests for anatjax.data.lesions (AFiRe synthetic lesion masks, afire.md 2.3 and 8)."""

import numpy as np
import pytest

from anatjax.data import lesions
from anatjax.data.lesions import (LesionConfig, draw_boxes, fallback_texture, lesion_texture,
                                  synthesize, token_flags)


def _phantom(height, width, rows, cols, seed=0):
  """Dark noisy background with one bright noisy rectangle [rows) x [cols)."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 41, (height, width)).astype(np.uint8)
  r0, r1 = rows
  c0, c1 = cols
  image[r0:r1, c0:c1] = rng.integers(150, 251, (r1 - r0, c1 - c0))
  return image


def _reference_texture(src):
  """Direct float64 re-implementation of the spec's falloff formula (afire.md 2.3 step 2)."""
  h, w = src.shape
  a, b = w / 2, h / 2
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  e = np.exp(-(((x - w // 2) / a) ** 2 + ((y - h // 2) / b) ** 2) / 0.5)
  e = (e - e.min()) / (e.max() - e.min()) * 0.5
  return np.floor(np.clip(src.astype(np.float64) * e, 0, 255)).astype(np.uint8)


def _assert_texture_close(actual, expected):
  # The module computes in float32 as the spec says; floor() may differ by one at a handful
  # of pixels whose product lies within float32 round-off of an integer.
  assert actual.shape == expected.shape
  diff = np.abs(actual.astype(int) - expected.astype(int))
  assert diff.max() <= 1
  assert np.mean(diff == 0) > 0.99


# ----------------------------------------------------------------------------- boxes


def test_draw_boxes_count_sizes_and_placement():
  config = LesionConfig(max_lesions=4, min_size=3, max_size=6)
  height, width = 20, 24
  counts, heights, widths, tops_at_edge, lefts_at_edge = set(), set(), set(), set(), set()
  for seed in range(400):
    boxes = draw_boxes(np.random.default_rng(seed), config, height, width)
    assert boxes.ndim == 2 and boxes.shape[1] == 4
    counts.add(len(boxes))
    for top, left, h, w in boxes:
      assert config.min_size <= h <= config.max_size
      assert config.min_size <= w <= config.max_size
      assert 0 <= top and top + h <= height
      assert 0 <= left and left + w <= width
      heights.add(h)
      widths.add(w)
      tops_at_edge.add("first" if top == 0 else "last" if top == height - h else "mid")
      lefts_at_edge.add("first" if left == 0 else "last" if left == width - w else "mid")
  assert counts == {1, 2, 3, 4}  # inclusive on both ends
  assert heights == widths == {3, 4, 5, 6}  # inclusive on both ends
  assert tops_at_edge == lefts_at_edge == {"first", "mid", "last"}


def test_synthesize_paints_exactly_the_drawn_boxes():
  # An all-ones texture resizes to all ones, so noise counts the boxes covering each pixel.
  # Non-square image, texture and boxes catch a (width, height) mix-up in cv2.resize.
  height, width = 48, 64
  clean = np.zeros((height, width), np.uint8)
  texture = np.ones((7, 5), np.uint8)
  config = LesionConfig(max_lesions=4, min_size=4, max_size=40)
  for seed in range(60):
    boxes = draw_boxes(np.random.default_rng(seed), config, height, width)
    expected = np.zeros((height, width), np.int64)
    for top, left, h, w in boxes:
      expected[top:top + h, left:left + w] += 1
    slm, noise, abn = synthesize(clean, texture, np.random.default_rng(seed), config, 16)
    assert noise.dtype == np.int32 and noise.shape == (height, width)
    np.testing.assert_array_equal(noise, expected)
    np.testing.assert_array_equal(slm, np.minimum(expected, 235).astype(np.uint8))
    assert 1 <= len(boxes) <= 4


# ----------------------------------------------------------------------------- labels


def _abn_by_loop(noise, patch_size):
  grid_h, grid_w = noise.shape[0] // patch_size, noise.shape[1] // patch_size
  abn = np.zeros(grid_h * grid_w, bool)
  for row in range(grid_h):
    for col in range(grid_w):
      block = noise[row * patch_size:(row + 1) * patch_size,
                    col * patch_size:(col + 1) * patch_size]
      abn[row * grid_w + col] = bool((block > 0).any())
  return abn


@pytest.mark.parametrize("shape,patch_size", [((64, 64), 16), ((48, 64), 8), ((64, 96), 16)])
def test_abn_agrees_with_per_patch_loop(shape, patch_size):
  height, width = shape
  clean = _phantom(height, width, (8, 40), (10, 50))
  texture, used_fallback = lesion_texture(clean, 9)
  assert not used_fallback
  config = LesionConfig(min_size=5, max_size=37)
  marked = 0
  for seed in range(30):
    _, noise, abn = synthesize(clean, texture, np.random.default_rng(seed), config,
                               patch_size)
    assert abn.dtype == bool
    assert abn.shape == ((height // patch_size) * (width // patch_size),)
    np.testing.assert_array_equal(abn, _abn_by_loop(noise, patch_size))
    marked += abn.sum()
  assert marked > 0


def test_token_flags_row_major_and_strictly_positive():
  noise = np.zeros((32, 48), np.int32)
  noise[17, 40] = 3  # row 1, col 2 -> j = 1 * 3 + 2 = 5
  noise[0, 0] = -7  # not > 0, must not flag token 0
  abn = token_flags(noise, 16)
  assert abn.shape == (6,) and abn.dtype == bool
  assert abn.tolist() == [False, False, False, False, False, True]
  np.testing.assert_array_equal(abn, _abn_by_loop(noise, 16))


# ----------------------------------------------------------------------------- blending


def test_blend_untouched_outside_and_bounded_inside():
  rng = np.random.default_rng(123)
  height, width = 64, 64
  texture, _ = lesion_texture(_phantom(height, width, (10, 50), (12, 52)), 9)
  config = LesionConfig(min_size=5, max_size=37, ceiling=235)
  for seed in range(40):
    clean = rng.integers(0, 256, (height, width)).astype(np.uint8)  # includes > 235
    slm, noise, _ = synthesize(clean, texture, np.random.default_rng(seed), config, 16)
    assert slm.dtype == np.uint8 and slm.shape == clean.shape
    outside = noise == 0
    inside = noise > 0
    assert inside.any()
    assert (noise >= 0).all()
    np.testing.assert_array_equal(slm[outside], clean[outside])  # byte-identical
    c = clean.astype(np.int64)
    s = slm.astype(np.int64)
    assert (s[inside] >= c[inside]).all()  # never darkens
    assert (s[inside] <= np.maximum(c[inside], config.ceiling)).all()
    expected = np.maximum(c, np.minimum(c + noise, config.ceiling))
    np.testing.assert_array_equal(s[inside], expected[inside])


@pytest.mark.parametrize("ceiling", [235, 255])
def test_overlapping_lesions_sum_without_wraparound(ceiling):
  size = 32
  clean = np.full((size, size), 50, np.uint8)
  texture = np.full((6, 6), 200, np.uint8)
  # Every box covers the whole image, so all lesions overlap everywhere.
  config = LesionConfig(max_lesions=4, min_size=size, max_size=size, ceiling=ceiling)
  seed = next(s for s in range(100)
              if len(draw_boxes(np.random.default_rng(s), config, size, size)) >= 2)
  n = len(draw_boxes(np.random.default_rng(seed), config, size, size))
  slm, noise, abn = synthesize(clean, texture, np.random.default_rng(seed), config, 16)
  assert (noise == 200 * n).all()  # > 255: an uint8 accumulator would have wrapped
  assert (slm == ceiling).all()  # saturates bright, never dark
  assert abn.all()


# ----------------------------------------------------------------------------- texture


def test_texture_matches_formula_at_known_centre():
  # Bright rectangle rows 20..41, cols 61..82 in a non-square image: its minimum enclosing
  # circle is centred at (col 71.5, row 30.5) -> cx = 71, cy = 30. A row/column swap (D2)
  # would crop elsewhere (row 71 does not even exist).
  clean = _phantom(64, 96, (20, 42), (61, 83), seed=1)
  radius = 12
  texture, used_fallback = lesion_texture(clean, radius)
  assert not used_fallback
  assert texture.dtype == np.uint8
  src = clean[30 - radius:30 + radius, 71 - radius:71 + radius]
  _assert_texture_close(texture, _reference_texture(src))
  # The crop centre carries e = 0.5 exactly.
  assert texture[radius, radius] == src[radius, radius] // 2


def test_texture_crop_clipped_at_border():
  # Region touching the top-right corner: rows 0..11, cols 80..95 -> centre (87.5, 5.5) ->
  # cx = 87, cy = 5; crop rows 0:17, cols 75:96 (17x21), legitimately smaller than 24x24.
  clean = _phantom(64, 96, (0, 12), (80, 96), seed=2)
  texture, used_fallback = lesion_texture(clean, 12)
  assert not used_fallback
  assert texture.shape == (17, 21)
  _assert_texture_close(texture, _reference_texture(clean[0:17, 75:96]))


def test_texture_of_bright_disk_centred_on_disk():
  import cv2

  clean = np.full((64, 64), 20, np.uint8)
  cv2.circle(clean, (40, 25), 12, 200, -1)  # cv2 points are (x=col, y=row)
  texture, used_fallback = lesion_texture(clean, 9)
  assert not used_fallback and texture.shape == (18, 18)
  # The enclosing circle centre is the disk centre up to float round-off before truncation.
  candidates = [_reference_texture(clean[cy - 9:cy + 9, cx - 9:cx + 9])
                for cy in (24, 25) for cx in (39, 40)]
  assert any(np.abs(texture.astype(int) - c).max() <= 1 for c in candidates)


def test_falloff_range_and_peak():
  e = lesions.falloff(24, 17)
  assert e.dtype == np.float32 and e.shape == (24, 17)
  assert e.min() == 0.0 and e.max() == pytest.approx(0.5)
  assert e[12, 8] == e.max()


# ----------------------------------------------------------------------------- fallback


def test_fallback_texture_definition():
  radius = 9
  texture = fallback_texture(radius)
  assert texture.dtype == np.uint8 and texture.shape == (18, 18)
  _assert_texture_close(texture, _reference_texture(np.full((18, 18), 128, np.uint8)))
  assert texture.max() == 64


def _tiny_spot():
  image = np.zeros((64, 64), np.uint8)
  image[30:33, 40:43] = 255
  return image


def _faint():
  # A large region of value 1 on 0: found fine, but floor(1 * e) == 0 -> invisible texture.
  image = np.zeros((64, 64), np.uint8)
  image[10:50, 10:50] = 1
  return image


@pytest.mark.parametrize("name,image", [
    ("blank", np.zeros((64, 64), np.uint8)),
    ("constant", np.full((64, 64), 128, np.uint8)),
    ("white", np.full((64, 64), 255, np.uint8)),
    ("tiny_spot", _tiny_spot()),
    ("single_pixel", np.pad(np.full((1, 1), 255, np.uint8), ((20, 43), (7, 56)))),
    ("faint", _faint()),
])
def test_fallback_on_degenerate_images(name, image):
  texture, used_fallback = lesion_texture(image, 9)
  assert used_fallback, name
  np.testing.assert_array_equal(texture, fallback_texture(9))
  assert texture.any()
  # The fallback texture still yields visible, labelled lesions.
  slm, noise, abn = synthesize(image, texture, np.random.default_rng(0),
                               LesionConfig.for_image_size(64), 16)
  assert abn.any() and (noise > 0).any()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (5, 3)])
def test_lesion_texture_never_raises_on_tiny_images(shape):
  rng = np.random.default_rng(sum(shape))
  for image in (np.zeros(shape, np.uint8), rng.integers(0, 256, shape).astype(np.uint8)):
    for radius in (1, 2, 30):
      texture, used_fallback = lesion_texture(image, radius)
      assert texture.dtype == np.uint8 and texture.ndim == 2 and texture.any()
      assert isinstance(used_fallback, bool)


def test_lesion_texture_accepts_non_contiguous_view():
  clean = _phantom(64, 64, (10, 50), (12, 52))
  big = np.zeros((64, 128), np.uint8)
  big[:, ::2] = clean
  texture, used_fallback = lesion_texture(big[:, ::2], 9)
  np.testing.assert_array_equal(texture, lesion_texture(clean, 9)[0])
  assert not used_fallback


# ----------------------------------------------------------------------------- randomness


def test_same_seed_same_sample_and_seeds_differ():
  clean = _phantom(64, 64, (10, 50), (12, 52))
  texture, _ = lesion_texture(clean, 9)
  config = LesionConfig.for_image_size(64)
  first = synthesize(clean, texture, np.random.default_rng(7), config, 16)
  second = synthesize(clean, texture, np.random.default_rng(7), config, 16)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  others = [synthesize(clean, texture, np.random.default_rng(s), config, 16)[1]
            for s in range(8, 12)]
  assert any(not np.array_equal(first[1], other) for other in others)


def test_p_no_lesion_one_is_identity():
  clean = _phantom(64, 64, (10, 50), (12, 52))
  texture, _ = lesion_texture(clean, 9)
  config = LesionConfig.for_image_size(64, p_no_lesion=1.0)
  for seed in range(10):
    slm, noise, abn = synthesize(clean, texture, np.random.default_rng(seed), config, 16)
    np.testing.assert_array_equal(slm, clean)
    assert slm is not clean and slm.dtype == np.uint8
    assert noise.dtype == np.int32 and not noise.any()
    assert abn.dtype == bool and abn.shape == (16,) and not abn.any()


def test_p_no_lesion_only_blanks_samples():
  # The boxes are drawn before the skip coin, so a non-skipped sample equals the p = 0 one.
  clean = _phantom(64, 64, (10, 50), (12, 52))
  texture, _ = lesion_texture(clean, 9)
  base = LesionConfig.for_image_size(64)
  half = LesionConfig.for_image_size(64, p_no_lesion=0.5)
  skipped = kept = 0
  for seed in range(40):
    _, noise0, _ = synthesize(clean, texture, np.random.default_rng(seed), base, 16)
    _, noise, _ = synthesize(clean, texture, np.random.default_rng(seed), half, 16)
    if noise.any():
      np.testing.assert_array_equal(noise, noise0)
      kept += 1
    else:
      skipped += 1
  assert skipped > 0 and kept > 0


# ----------------------------------------------------------------------------- config


def test_for_image_size_scaling():
  assert LesionConfig.for_image_size(224) == LesionConfig()
  c224 = LesionConfig.for_image_size(224)
  assert (c224.min_size, c224.max_size, c224.crop_radius) == (16, 128, 30)
  c64 = LesionConfig.for_image_size(64)
  # 16*64/224 = 4.57 -> 5; 128*64/224 = 36.6 -> 37; 30*64/224 = 8.57 -> 9.
  assert (c64.min_size, c64.max_size, c64.crop_radius) == (5, 37, 9)
  assert (c64.max_lesions, c64.ceiling, c64.p_no_lesion) == (4, 235, 0.0)
  c112 = LesionConfig.for_image_size(112)
  assert (c112.min_size, c112.max_size, c112.crop_radius) == (8, 64, 15)
  c4 = LesionConfig.for_image_size(4)
  assert c4.min_size >= 1 and c4.crop_radius >= 1 and c4.min_size <= c4.max_size <= 4
  # Fields are given on the 224 grid and rescaled like the defaults.
  c = LesionConfig.for_image_size(64, max_lesions=2, crop_radius=14, p_no_lesion=0.1)
  assert (c.max_lesions, c.crop_radius, c.p_no_lesion, c.min_size) == (2, 4, 0.1, 5)
  with pytest.raises(TypeError, match="unknown"):
    LesionConfig.for_image_size(64, max_sizes=3)
  with pytest.raises(ValueError, match="image_size"):
    LesionConfig.for_image_size(0)


def test_end_to_end_at_224_with_default_recipe():
  clean = _phantom(224, 224, (30, 200), (20, 204))
  config = LesionConfig.for_image_size(224)
  texture, used_fallback = lesion_texture(clean, config.crop_radius)
  assert not used_fallback and texture.shape == (60, 60)
  slm, noise, abn = synthesize(clean, texture, np.random.default_rng(0), config, 16)
  assert slm.shape == noise.shape == (224, 224) and abn.shape == (196,)
  assert abn.any() and slm.dtype == np.uint8


# ----------------------------------------------------------------------------- validation


def test_validation_errors_name_the_argument():
  clean = np.zeros((64, 64), np.uint8)
  texture = np.ones((8, 8), np.uint8)
  rng = np.random.default_rng(0)
  config = LesionConfig.for_image_size(64)
  with pytest.raises(ValueError, match="clean"):
    lesion_texture(np.zeros((64, 64, 3), np.uint8), 9)
  with pytest.raises(TypeError, match="clean"):
    lesion_texture(np.zeros((64, 64), np.float32), 9)
  with pytest.raises(ValueError, match="clean"):
    lesion_texture(np.zeros((0, 5), np.uint8), 9)
  with pytest.raises(ValueError, match="crop_radius"):
    lesion_texture(clean, 0)
  with pytest.raises(TypeError, match="texture"):
    synthesize(clean, texture.astype(np.int32), rng, config, 16)
  with pytest.raises(ValueError, match="patch_size"):
    synthesize(np.zeros((64, 72), np.uint8), texture, rng, config, 16)
  with pytest.raises(ValueError, match="patch_size"):
    synthesize(clean, texture, rng, config, 0)
  with pytest.raises(TypeError, match="rng"):
    synthesize(clean, texture, np.random.RandomState(0), config, 16)
  with pytest.raises(TypeError, match="config"):
    synthesize(clean, texture, rng, {"max_lesions": 4}, 16)
  with pytest.raises(ValueError, match="max_size"):
    synthesize(clean, texture, rng, LesionConfig(), 16)  # 128 > 64
  with pytest.raises(ValueError, match="min_size"):
    synthesize(np.zeros((16, 16), np.uint8), texture, rng,
               LesionConfig(min_size=20, max_size=30), 16)
  with pytest.raises(ValueError, match="min_size"):
    LesionConfig(min_size=20, max_size=10)
  with pytest.raises(ValueError, match="ceiling"):
    LesionConfig(ceiling=300)
  with pytest.raises(ValueError, match="p_no_lesion"):
    LesionConfig(p_no_lesion=1.5)
  with pytest.raises(ValueError, match="max_lesions"):
    LesionConfig(max_lesions=0)
  with pytest.raises(TypeError, match="crop_radius"):
    LesionConfig(crop_radius=2.5)
  with pytest.raises(ValueError, match="noise"):
    token_flags(np.zeros((4, 4, 1), np.int32), 2)
  with pytest.raises(ValueError, match="patch_size"):
    token_flags(np.zeros((4, 6), np.int32), 4)
