r"""The dense anatomical embedding behind Alice's correspondence provider (a)
(anatjax/methods/anatomy_embedding.py; shared/methods/alice.md 2.4; after SAM, Yan et al.,
IEEE TMI 2022).

The default is the spec's recipe: CTs at 2 mm isotropic, HU [-1024, 3071] -> [0, 1], two
overlapping 96^3 crops of one CT per item (per-axis scale 0.8-1.2, intensity jitter), 100
positive points per pair, a 3-D ResNet-18 (32/64/128/256 channels) with an FPN giving a
fine field (stride 4: 8 mm cells, 64-d) and a coarse one (stride 16: 32 mm, 128-d),
InfoNCE at tau 0.5 on both (coarse: all cells of the other crop; fine: 100 hard negatives
beyond 3 cells + 100 random), AdamW 2e-4, 20k steps of 8 CTs.

  # 2 CPU cores: the SAME 32-phantom 4 mm store as configs/alice_swin3d.py:runlocal (reused
  # from ~/.cache/anatjax/ct_volumes if that ran; else prepared first, ~5 min), 32^3 crops,
  # the same 8 mm / 32 mm cells (network below), 300 steps of 4 CTs, ~8 min
  python -m anatjax.main --config=configs/anatomy_embedding.py:runlocal --workdir=runs/embedding
  # its accuracy as a correspondence provider (organ centroids of phantom pairs, README)
  python -m anatjax.evaluate.correspondence --provider=embedding --run=runs/embedding \
      --out=runs/correspondence_embedding
  # the recipe on your CT folder (NIfTI files and/or DICOM series), store prepared first:
  python -m anatjax.data.ct_volumes --volumes=/data/flare22 --out=/data/flare_store_2mm \
      --spacing_mm=2 --workers=16
  python -m anatjax.main --config=configs/anatomy_embedding.py \
      --config.data.root=/data/flare_store_2mm --config.data.volumes=/data/flare22 \
      --workdir=runs/embedding

The store's options (data.volumes ... data.registration_iterations) must match those it
was prepared with; a store is refused otherwise (the registration part of the store is not
used by this method). runlocal's network: stem stride 2 on 4 mm voxels, three stages of
16/32/64 channels with one block each, FPN width 32, so fine stride 2 (8 mm) and coarse
stride 8 (32 mm): the spec's physical cells at a size 2 CPU cores train in minutes.

What runlocal does on 2 shared CPU cores: ~1.5 s per step, 300 steps in ~8 min from
launch to the last checkpoint; loss 9.0 -> 7.8 (fine 5.07 -> 4.68, chance log 201 = 5.30;
coarse 3.89 -> 3.07, chance log 64 = 4.16), top-1 fine 0.02 -> 0.25, coarse 0.01 -> 0.26
(means of the first and last 3 logged steps). Organ-centroid errors as a provider: README.
Longer runs keep learning (--config.duration=1200st, ~29 min: loss 7.37, top-1 fine 0.48,
coarse 0.32).
"""

from anatjax.config import parse_arg
from configs.common import ct_volume_store, pretraining_config, runlocal_ct_volume_store


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = pretraining_config("anatomy_embedding", "")
  c.batch_size = 8               # CTs; each item is two crops of one CT
  c.duration = "20000st"
  c.log_every = 100
  c.data = ct_volume_store(spacing_mm=(2.0, 2.0, 2.0), image_size=96)
  c.model = dict(
      widths=(32, 64, 128, 256),   # channels per stage (ResNet-18 / 2)
      blocks=(2, 2, 2, 2),         # BasicBlocks per stage
      stem_stride=2,
      fpn_width=128,
      fine_stride=4, fine_dim=64,        # 8 mm cells on 2 mm CT
      coarse_stride=16, coarse_dim=128,  # 32 mm cells
      dtype="auto",            # convolutions: bfloat16 on GPU/TPU; norms, losses float32
  )
  c.optim = dict(lr=2e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8)
  c.checkpoint.every = "1000st"
  c.embedding = dict(
      temperature=0.5,
      num_positives=100,       # points per crop pair
      hard_negatives=100,      # fine: most similar cells beyond exclusion_radius
      random_negatives=100,    # fine: random cells beyond exclusion_radius
      exclusion_radius=3.0,    # fine cells (Euclidean)
      scale_range=(0.8, 1.2),  # per-axis crop scale (resampling)
      max_shift=0.5,           # crop 2's centre: up to this fraction of crop 1 away per axis
      contrast=0.05,           # intensity jitter: x -> a x + b, a in 1 +- contrast,
      brightness=0.01,         # b in +- brightness (x in [0, 1]; 0.01 = 41 HU)
  )
  if arg.runlocal:
    c.batch_size = 4
    c.duration = "300st"
    c.log_every = 10
    runlocal_ct_volume_store(c.data)
    c.model.update(widths=(16, 32, 64), blocks=(1, 1, 1), stem_stride=2, fpn_width=32,
                   fine_stride=2, coarse_stride=8)
    c.optim.lr = 1e-3          # 300 steps: the recipe's 2e-4 barely moves in that time
    c.checkpoint.every = "100st"
  c.lock()
  return c
