"""The fields every pretraining config shares (configs/<method>_<model>.py build on them):
run control, the data block, the encoder, mesh, checkpoints and profiling. Each recipe adds
its method's block, its optimiser and its decoder or head sizes."""

import ml_collections


def file_source_fields() -> dict:
  """The data fields of real sources (anatjax/data/radiographs.py, decode.py,
  bad_files.py), shared by the pretraining and the evaluation configs."""
  return dict(
      selection="all",         # all | normal_frontal (No Finding and a PA/AP view)
      uncertain="zeros",       # CheXpert-style uncertain (-1) labels: zeros | ones | ignore
      mimic_labels="chexpert", # mimic_cxr_jpg's label CSV: chexpert | negbio
      split_file="",           # split_list: the `relative_path l0 ... lN` file
      split_labels="",         # split_list label order: '' (unnamed) or a CLASS_NAMES key
      intensity="minmax",      # per image: minmax | percentile (between `percentiles`)
      percentiles=(0.5, 99.5),
      geometry="resize",       # resize (whole image, no crop) | pad | crop
      max_bad_fraction=0.01,   # stop before training if more listed files are missing
  )


def pretraining_config(method: str, variant: str) -> ml_collections.ConfigDict:
  """The shared fields at the full (accelerator) size, unlocked for the recipe to extend."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.batch_size = 1024
  c.grad_accum_steps = 1         # >1: sum gradients over this many micro-batches per step
  c.duration = "400ep"
  c.log_every = 50
  c.allow_config_change = False
  c.init_from = ""               # start the encoder from these weights (.safetensors/.npz/.pt)

  c.data = dict(
      source="synthetic_cxr",  # or a collection of anatjax/data/radiographs.py
      root="",                 # real sources: the folder the collection was downloaded to
      image_size=224,
      num_examples=81_117,     # synthetic patients; ignored by real sources
      source_seed=0,           # which synthetic patients
      repeats_per_epoch=1,     # an epoch shows each image this many times
      num_workers=2,           # Grain worker processes per host
      **file_source_fields(),
  )
  c.model = dict(
      variant=variant,
      depth=0,                 # 0: the variant's depth
      channels=3,              # greyscale replicated to 3 channels, ImageNet-normalised
      dtype="auto",            # matmuls: bfloat16 on GPU/TPU, float32 on CPU
      remat="none",            # none | full | dots: recompute activations to save memory
      scan_layers=False,       # scan over blocks: faster compiles of deep models
  )
  c.mesh = dict(data=-1, fsdp=1)
  c.sharding_rules = ((".*", "fsdp"),)
  c.checkpoint = dict(every="20ep", keep=3, async_save=True)
  c.profile = dict(start_step=0, num_steps=0)  # num_steps > 0: trace to WORKDIR/profile
  return c


def make_runlocal(c: ml_collections.ConfigDict) -> None:
  """The shared part of `runlocal`: a 4-block ViT-Ti/8 on 64 px images, batch 32,
  200 steps on 256 synthetic patients: minutes on 2 CPU cores."""
  c.batch_size = 32
  c.duration = "200st"
  c.log_every = 10
  c.data.image_size = 64
  c.data.num_examples = 256
  c.data.num_workers = 1
  c.model.variant = "Ti/8"
  c.model.depth = 4
  c.checkpoint.every = "100st"


def ct_volume_store(spacing_mm, image_size: int) -> dict:
  """The data block of a volume-store method (Alice, its correspondence embedding;
  anatjax/data/ct_volumes.py) at the given spacing (z, y, x) and crop edge."""
  return dict(
      source="ct_volumes",
      root="",                 # the volume store; '' = a cache folder named by the options
      # What the store is made of (anatjax/data/ct_volumes.py):
      volumes="synthetic_ct",  # or a folder of NIfTI files / DICOM series
      num_examples=2000,       # synthetic subjects
      source_seed=0,
      synthetic_size=256,      # the phantom's voxels per axis before resampling
      spacing_mm=tuple(spacing_mm),
      atlas="",                # subject id; '' = the median body volume
      registration_iterations=300,
      # How training reads it:
      image_size=image_size,   # the crop edge in voxels
      repeats_per_epoch=1,
      num_workers=8,
      max_bad_fraction=0.01,
  )


def runlocal_ct_volume_store(data: ml_collections.ConfigDict) -> None:
  """The store of every volume-store `runlocal` (one cached store serves them all): 32
  phantoms of 80^3 at 4 mm, 100 registration iterations, 32^3 crops, one worker."""
  data.update(num_examples=32, synthetic_size=80, spacing_mm=(4.0, 4.0, 4.0),
              registration_iterations=100, image_size=32, num_workers=1)


def dino_optim() -> dict:
  """DINO's AdamW recipe (AFiRe trains with it too; anatjax.optim.dino_adamw): lr 5e-4 x
  batch/256 after 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4 (cosine),
  per-tensor gradient clipping at 3.0."""
  return dict(
      base_lr=5e-4, base_batch_size=256, warmup="10ep", min_lr=1e-6,
      weight_decay=0.04, weight_decay_end=0.4, clip_norm=3.0,
      b1=0.9, b2=0.999, eps=1e-8,
      mu_dtype="float32",      # Adam's first moment: float32 or bfloat16 (memory)
  )
