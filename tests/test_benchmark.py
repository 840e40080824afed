"""The benchmark command's numbers are checked for meaning, never for speed."""

import numpy as np

from anatjax import benchmark
from tiny import tiny_config


def vit_train_flops(tokens, patch_dim, width, depth, mlp_dim):
  """Hand count of a ViT train step's matmul FLOPs per image: forward F, backward 2F
  (gradients for activations and weights) less the unneeded gradient of the pixels."""
  patch = 2 * (tokens - 1) * patch_dim * width
  block = (2 * tokens * width * 3 * width        # q, k, v
           + 2 * 2 * tokens * tokens * width     # scores and weighted values
           + 2 * tokens * width * width          # output projection
           + 2 * 2 * tokens * width * mlp_dim)   # MLP
  return 3 * (patch + depth * block) - patch


def test_plain_vit_flops_match_a_hand_count():
  config = tiny_config()
  config.unlock()
  config.data.image_size = 64
  config.model.variant = "S/16"
  config.model.depth = 2
  batch = {"x_clean": np.zeros((4, 64, 64), np.uint8)}
  bench = benchmark.plain_vit_bench(config, batch)
  want = vit_train_flops(tokens=17, patch_dim=16 * 16 * 3, width=384, depth=2, mlp_dim=1536)
  # XLA also counts the element-wise work (norms, GELU, softmax, AdamW): a few percent.
  assert want <= bench.stats["flops_per_image"] <= 1.15 * want


def test_benchmark_runs_and_reports_every_measurement():
  config = tiny_config()
  config.unlock()
  config.batch_size = 8
  results = benchmark.run(config, batch=8, repeats=1, steps=1, workers=1, host_images=16,
                          decode_size=64, ct_patch_size=16, ct_volume_size=48,
                          alice_crop=16)
  by_name = {r["name"]: r for r in results}
  assert set(by_name) == {
      "matmul_f32", "plain_vit_train_step", "afire_train_step",
      "host_synthetic_per_worker", "host_decode_jpg64_per_worker",
      "host_decode_png64_per_worker", "host_synthetic_grain_1_workers",
      "host_to_device_ratio", "host_ct_patches_per_worker", "host_ct_patches_grain_1_workers",
      "host_synthetic_ct48_per_worker", "host_alice_pairs16_per_worker"}
  afire, plain = by_name["afire_train_step"], by_name["plain_vit_train_step"]
  assert afire["flops_per_image"] > plain["flops_per_image"] > 0
  for r in (afire, plain):
    assert r["images_per_s"] > 0 and r["peak_bytes"] > 0
    np.testing.assert_allclose(r["mfu"], r["achieved_flops"]
                               / by_name["matmul_f32"]["achieved_flops"])
  assert by_name["host_to_device_ratio"]["ratio"] > 0
  assert by_name["host_ct_patches_per_worker"]["unit"] == "patches/s"
  assert by_name["host_ct_patches_grain_1_workers"]["images_per_s"] > 0
  assert by_name["host_alice_pairs16_per_worker"]["unit"] == "pairs/s"
  assert by_name["host_alice_pairs16_per_worker"]["images_per_s"] > 0
  assert "afire_train_step" in benchmark.format_table(results)
