"""The fields every evaluation config shares (configs/eval/<protocol>.py build on them).

Arguments every protocol takes (after the colon, comma-separated):
  variant=B/16   the encoder built for --init=random or a weights file (a run's own
                 config says what its encoder is)
  num_seeds=N    seeds 0..N-1 (label subsets, probe/fine-tune/k-means randomness)
  source=NAME    a real collection instead of the synthetic data (cxr_probe and
                 localisation), e.g. source=nih_cxr14 with --config.data.root=DIR: every
                 image of its splits (runlocal / tiny: a seeded subset)
  runlocal       a small run for 2 CPU cores: Ti/8 (4 blocks) at 64 px, the size of
                 configs/afire_vitb.py:runlocal, few hundred images
  tiny           the smallest run that exercises everything (tests; numbers meaningless)
"""

import ml_collections

from anatjax.config import parse_arg
from configs.common import file_source_fields


def base_config(protocol: str, arg, **extra_args):
  """(config, parsed arguments): the shared fields at the full (accelerator) size."""
  arg = parse_arg(arg, variant="B/16", num_seeds=1, runlocal=False, tiny=False,
                  source="synthetic_cxr", **extra_args)
  c = ml_collections.ConfigDict()
  c.protocol = protocol
  c.seed = 0                     # the random encoder's initialisation (--init=random)
  c.seeds = tuple(range(arg.num_seeds))
  c.which = "auto"               # a run's encoder: auto (the teacher where there is one) |
                                 # teacher | student; also picks in teacher-student files
  c.batch_size = 128             # feature extraction and evaluation batch

  # The encoder for --init=random or a weights file; a run's checkpoint brings its own.
  c.model = dict(variant=arg.variant, depth=0, channels=3, image_size=224, dtype="auto")
  c.data = dict(
      source=arg.source,         # synthetic_cxr, or a labelled collection of
                                 # anatjax/data/radiographs.py (anatjax/evaluate/real_data.py)
      root="",                   # real collections: the folder they were downloaded to
      source_seed=0,             # which synthetic patients (the "labelled" split)
      image_size=0,              # 0: the encoder's own (pre)training size
      # Synthetic: disjoint index ranges, in order. Real: N > 0 keeps a seeded random N
      # of the split's images, 0 all of them.
      num_train=8000, num_val=1000, num_test=1000,
      subsets_dir="",            # read label subsets (split files) from here, named:
      subset_pattern="train_{percent}pct_seed{seed}.txt",
      # Real collections: where splits come from, which findings, decoding.
      split_files=dict(train="", val="", test=""),  # split files (labels from the file)
      val_fraction=0.1,          # of the train patients, where the collection has no val
      test_fraction=0.2,         # ... and no test split (carved by patient)
      split_seed=0,              # carving and subsampling
      classes="",                # '' all, a CLASS_NAMES key, or comma-separated names
      cache_dir="",              # keep decoded splits here (.npz) for the next evaluation
      num_workers=0,             # decoding threads; 0: one per CPU core
      **file_source_fields(),
  )
  if arg.source != "synthetic_cxr":
    c.data.num_train = c.data.num_val = c.data.num_test = 0
  # Linear probes on frozen features (also the token probe and the localisation probe).
  c.linear = dict(features="mean", steps=1000, batch_size=1024, lr=1e-2,
                  weight_decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2))
  # Full fine-tuning: AdamW, lr = base_lr x batch / 256, warm-up then cosine, layer decay;
  # head_init='probe' starts the head at the linear probe (LP-FT), 'zeros' from scratch.
  c.finetune = dict(epochs=10, min_steps=100, batch_size=64, base_lr=1e-3,
                    warmup_fraction=0.1, layer_decay=0.75, weight_decay=0.05, num_evals=5,
                    head_init="probe")

  if arg.runlocal or arg.tiny:
    c.batch_size = 64
    c.model.variant = "Ti/8"
    c.model.depth = 4
    c.model.image_size = 64
    c.data.num_train, c.data.num_val, c.data.num_test = 512, 256, 512  # real: subsets
    c.linear.batch_size = 256
    c.finetune.update(epochs=6, min_steps=24, batch_size=32, num_evals=3)
  if arg.tiny:
    c.batch_size = 32
    c.model.variant = "mu/8"
    c.model.depth = 0
    c.model.image_size = 32
    c.data.num_train, c.data.num_val, c.data.num_test = 96, 48, 64
    c.linear.steps = 40
    c.linear.batch_size = 64
    c.linear.weight_decays = (1e-4, 1e-2)
    c.finetune.update(epochs=1, min_steps=4, batch_size=16, num_evals=2)
  return c, arg
