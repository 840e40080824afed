r"""LD (local discrimination) on the small VGG-BN U-Net, in two stages
(anatjax/methods/ld.py; shared/methods/ld.md; Chen et al., TPAMI 2023).

The default is the published radiograph recipe: 512 px images (data.image_size; the spec
stores NIH ChestX-ray8 at 512) cropped to 448, B = 4 samples of two images per step
(batch_size = 8 images -> 20 network inputs: two views each and 4 mixup images), Adam at
lr 1e-3 without weight decay, halved every 10k steps; stage 1 (patch discrimination +
hypersphere mixup) 20k steps, stage 2 (+ 10 x region discrimination + 0.1 x entropy,
K = 16 soft regions) 80k steps from the stage-1 run.

  # 2 CPU cores: both stages at 64 px, a few minutes each
  python -m anatjax.main --config=configs/ld_unet.py:runlocal --workdir=runs/ld1
  python -m anatjax.main --config=configs/ld_unet.py:stage=2,runlocal \
      --config.ld.init_from_run=runs/ld1 --workdir=runs/ld2
  # the published recipe (accelerators):
  python -m anatjax.main --config=configs/ld_unet.py:stage=1 --workdir=runs/ld1
  python -m anatjax.main --config=configs/ld_unet.py:stage=2 \
      --config.ld.init_from_run=runs/ld1 --workdir=runs/ld2

Arguments: stage=1|2, runlocal (80 px synthetic radiographs cropped to 64, batch 8,
a few hundred steps), fundus (3-channel colour images: data.source=image_folder; set
data.root), shape_guided (with stage=2: K = 8, B = 3 and the adversarial shape prior on
cluster channel 0; reference shapes from ld.shape.masks_dir or the phantom's lungs;
runlocal: 192 px cropped to 160, the discriminator's smallest input, 100 steps).

  python -m anatjax.main --config=configs/ld_unet.py:stage=2,shape_guided,runlocal \
      --config.ld.init_from_run=runs/ld1 --workdir=runs/ld_shape

What to expect from runlocal on 2 CPU cores: stage 1 about 4 minutes, loss 13.8 -> 4.8;
stage 2 about 5 minutes, loss 31.1 -> 7.3, about 12 of the 16 clusters in use per image
(metric clusters_used).

Larger batches change the method (more negatives, centres over more images): keep
batch_size = 8 for faithful runs and scale it only as an explicit experiment.
"""

from anatjax.config import parse_arg
from configs.common import pretraining_config


def get_config(arg=None):
  arg = parse_arg(arg, stage=1, runlocal=False, fundus=False, shape_guided=False)
  c = pretraining_config("ld", "")
  c.batch_size = 8                 # images = 2 x B samples (B = 4)
  c.duration = "20000st" if arg.stage == 1 else "80000st"
  c.data.image_size = 512
  c.data.num_workers = 4
  c.model = dict(
      channels=3 if arg.fundus else 1,
      dtype="auto",                # convolutions: bfloat16 on GPU/TPU; losses in float32
  )
  c.checkpoint.every = "1000st"
  c.ld = dict(
      stage=arg.stage,
      init_from_run="",            # stage 2: the stage-1 run's workdir
      num_clusters=16,             # K soft regions (8 for the shape-guided variant)
      embedding_dim=32,            # D
      crop_size=448,               # the network's input: random resized crops of the image
      grid=8,                      # patch grid for patch discrimination (8 x 8 cells)
      temperature=0.1,             # ISC (patch discrimination, mixup)
      region_temperature=0.2,      # region discrimination
      w_pd=1.0, w_mix=1.0, w_rd=10.0, w_ent=0.1,
      w_area=0.0,                  # the reference's unused area prior
      lr=1e-3,
      lr_halve_every="10000st",
      # Views (anatjax/data/ld_views.py)
      base_scale=(0.9, 1.0),
      base_rotation=180.0,         # degrees, shared by both views
      view_rotation=2.0,           # degrees, per view
      colour_jitter=(0.4, 0.4, 0.4, 0.02),   # brightness, contrast, saturation, hue
      p_greyscale=0.2,
      view2_ops="d4",              # d4 (mirror + quarter turns) | rot4 (reference parity)
      lam_range=(0.2, 0.8),        # mixup weight
      # Shape-guided variant (spec 7.2): an adversarial shape prior on one cluster channel
      shape=dict(
          enabled=False,
          masks_dir="",            # reference masks (binary images); '' = the phantom's
          structure="lungs",       # ... masks of this structure (synthetic_cxr.STRUCTURES)
          num_reference=10,        # reference shapes in the bank
          reference_seed=1,        # which synthetic patients give them
          channel=0,               # the cluster channel that must look like them
          slope=0.2,               # discriminator LeakyReLU (1.0: the reference's identity)
          w_adv=1.0,
          lr_scale=0.05,           # discriminator lr = this x the network's
          max_cut=0.1,             # reference augmentation: crop up to this of each side
      ),
  )
  if arg.shape_guided:
    if arg.stage != 2:
      raise ValueError("shape_guided is a stage-2 variant: use stage=2,shape_guided")
    c.batch_size = 6               # B = 3 samples
    c.ld.num_clusters = 8
    c.ld.shape.enabled = True
  if arg.fundus:
    c.data.source = "image_folder"
  if arg.runlocal:
    c.duration = "300st"
    c.log_every = 10
    c.data.image_size = 80
    c.data.num_examples = 256
    c.data.num_workers = 1
    c.ld.crop_size = 64
    if arg.shape_guided:           # the discriminator needs at least 160 px, where
      c.data.image_size, c.ld.crop_size = 192, 160   # 2 CPU cores do ~1 image/s
      c.duration = "100st"
    c.ld.lr_halve_every = "150st"
    c.checkpoint.every = "100st"
  c.lock()
  return c
