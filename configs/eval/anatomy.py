r"""Protocol 3: anatomy in frozen patch tokens (probing) and token cluster cohesion.

Every patch token is labelled with the anatomy structure most of its pixels show (12
structures of the synthetic phantom). On the encoder's final patch tokens:
- token probe: a softmax linear classifier of the structure (weight decay chosen on
  validation tokens); test mIoU over structures on the patch grid, per-structure IoU;
- k-means (k = number of structures, k-means++ seeding, best of kmeans_inits) on a
  subsample of test tokens: NMI against the structures; silhouette of the clusters and
  of the structures themselves (Euclidean on L2-normalised tokens when normalize).

  python -m anatjax.evaluate --config=configs/eval/anatomy.py:runlocal --init=RUN_DIR
  python -m anatjax.evaluate --config=configs/eval/anatomy.py:runlocal --init=random

Arguments: variant=, num_seeds=, runlocal, tiny (configs/eval/common.py). Writes
OUT/results.json, OUT/results.md, OUT/figures/token_embedding.png (t-SNE of the
silhouette's tokens coloured by structure) and OUT/figures/anatomy_examples.png.

What to expect from runlocal on 2 CPU cores: about 25 s. A random encoder is not at
zero: its tokens carry the fixed sin-cos positions, and position alone predicts much of
the anatomy of a roughly aligned chest film. Runlocal AFiRe run / random Ti/8: token probe
mIoU 0.54 / 0.55, k-means NMI 0.39 / 0.41, silhouette of the k-means clusters 0.22 / 0.22.
At 8-pixel patches of 64 px images the ribs (painted over the lungs) win most lung
patches, so the lungs' IoU is ~0: compare structures at the resolution you care about.
"""

from configs.eval.common import base_config


def get_config(arg=None):
  c, arg = base_config("anatomy", arg)
  if not (arg.runlocal or arg.tiny):
    c.data.update(num_train=500, num_val=200, num_test=500)   # token arrays grow fast
  c.anatomy = dict(
      probe_tokens=100_000,      # train (and validation) tokens the probe sees, at most
      kmeans_tokens=20_000,      # test tokens clustered
      silhouette_tokens=2_000,   # silhouette is O(n^2): a subsample of those
      k=0,                       # 0: one cluster per anatomy structure
      normalize=True,            # L2-normalise tokens for k-means and silhouette
      kmeans_iters=100,
      kmeans_inits=3,
  )
  if arg.runlocal:
    c.data.update(num_train=256, num_val=128, num_test=256)
    c.anatomy.update(probe_tokens=16_384, kmeans_tokens=8_192, silhouette_tokens=1_500)
  if arg.tiny:
    c.anatomy.update(probe_tokens=2_048, kmeans_tokens=1_024, silhouette_tokens=300,
                     kmeans_iters=20, kmeans_inits=1)
  c.lock()
  return c
