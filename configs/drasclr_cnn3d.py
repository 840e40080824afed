r"""DrasCLR on lung-CT patches at atlas locations with the location-conditioned 3D CNN
(anatjax/methods/drasclr.py; shared/methods/drasclr.md; Yu et al., MedIA 2024).

The default is the published recipe: 1 mm isotropic CT, 32^3 patches on a 26-voxel atlas
grid (the cubes over the smallest lung-fraction threshold that leaves < 1000), global
batch 128 of one location, MoCo with a 4096-key queue per location, m = 0.999,
tau = 0.2, patch + neighbour InfoNCE (beta = 1), SGD lr 0.01 (cosine per epoch, momentum
0.9, weight decay 1e-4), 20 epochs, BatchNorm in ghost groups of 32 (shuffle-BN).

  # 2 CPU cores: 48 phantom subjects at 4 mm, 16^3 patches (the store is prepared
  # on the first run, a few minutes, and cached)
  python -m anatjax.main --config=configs/drasclr_cnn3d.py:runlocal --workdir=runs/drasclr
  # the recipe on your CT folder (NIfTI files and/or DICOM series), store prepared first:
  python -m anatjax.data.ct_prepare --volumes=/data/ct --out=/data/ct_store --workers=16
  python -m anatjax.main --config=configs/drasclr_cnn3d.py --config.data.root=/data/ct_store \
      --config.data.volumes=/data/ct --workdir=runs/drasclr

The store's options (data.volumes ... data.min_dice) must match those it was prepared
with; a store is refused otherwise. What to expect from runlocal on 2 CPU cores: the store
(71 locations) in ~3.5 min, then 426 steps in 10-15 min; the logged loss rises as the
per-location queues fill with real keys (README.md explains), patch top-1 ~0.35.
"""

from anatjax.config import parse_arg
from configs.common import pretraining_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = pretraining_config("drasclr", "")
  c.batch_size = 128
  c.duration = "20ep"
  c.data = dict(
      source="ct_patches",
      root="",                 # the patch store; '' = a cache folder named by the options
      # What the store is made of (anatjax/data/ct_prepare.py):
      volumes="synthetic_ct",  # or a folder of NIfTI files / DICOM series
      num_examples=512,        # synthetic subjects
      source_seed=0,
      synthetic_size=128,      # the phantom's voxels per axis before resampling
      lung_masks="",           # folder of label maps (1 right, 2 left); '' = classical
      spacing_mm=1.0,
      image_size=32,           # patch edge in voxels
      patch_stride=26,
      max_patches=1000,        # the lung-fraction threshold rises until fewer cubes pass
      atlas="",                # subject id; '' = the median total lung volume
      loc_norm="max",          # max (the reference) | minmax
      map_point="centre",      # centre | corner (reference parity)
      min_dice=0.8,            # registration QC: lung Dice with the atlas
      # How training reads it:
      location_order="sequential",   # sequential (the reference) | shuffled per epoch
      neighbour_tie_break="index",   # index (lower index wins) | random per step
      repeats_per_epoch=1,
      num_workers=4,
      max_bad_fraction=0.01,
  )
  c.model = dict(dtype="auto")   # convolutions: bfloat16 on GPU/TPU; BN, mixing, losses f32
  c.checkpoint.every = "1ep"
  c.drasclr = dict(
      num_experts=8,
      projection_dim=128,
      queue_size=4096,         # K keys per location; a multiple of batch_size
      momentum=0.999,          # key encoder
      temperature=0.2,
      beta=1.0,                # neighbour InfoNCE weight
      neighbour_warmup_epochs=0,
      bn_mode="ghost",         # ghost (shuffle-BN emulation) | global
      ghost=32,                # samples per BatchNorm group (the reference's per-GPU batch)
      lr=0.01,
      sgd_momentum=0.9,
      weight_decay=1e-4,
      noise_std_fixed=False,   # augmentation noise sigma = 50 instead of U(0, 50)
  )
  if arg.runlocal:
    c.batch_size = 16
    c.duration = "2ep"
    c.log_every = 10
    c.data.num_examples = 48
    c.data.synthetic_size = 96
    c.data.spacing_mm = 4.0
    c.data.image_size = 16
    c.data.patch_stride = 13
    c.data.num_workers = 1
    c.drasclr.queue_size = 64
    c.drasclr.ghost = 16         # one group: 8 samples are too few at the 1-voxel layers
    c.checkpoint.every = "1ep"
  c.lock()
  return c
