r"""Alice on CT volumes with the 3-D Swin encoder of MONAI's SwinUNETR
(anatjax/methods/alice.py; shared/methods/alice.md; Jiang et al., ICCV 2023).

The default is the spec's recipe: CTs at 2 x 1.5 x 1.5 mm (z, y, x), 64^3 crops around
matched points of two patients (provider (b): affine maps to an atlas, mined on the host),
column masks (12 of 4 x 4), Swin feature size 48, head 384 -> 2048 -> 256 -> 512, CASA
8 x 64, global batch 64 pairs, 1000 epochs, AdamW 5e-4 x B / 256 after 50 warm-up epochs,
cosine to 1e-6, weight decay 0.04 -> 0.4, teacher EMA 0.996 -> 1, teacher temperature
0.008 -> 0.01 over 30 epochs, last layers frozen in epoch 0.

  # 2 CPU cores: 32 phantom CTs at 4 mm, 32^3 crops, a small Swin (feature size 12); the
  # volume store is prepared on the first run (~5 min) and cached; 240 steps, ~13 min
  python -m anatjax.main --config=configs/alice_swin3d.py:runlocal --workdir=runs/alice
  # the recipe on your CT folder (NIfTI files and/or DICOM series), store prepared first:
  python -m anatjax.data.ct_volumes --volumes=/data/flare22 --out=/data/flare_store --workers=16
  python -m anatjax.main --config=configs/alice_swin3d.py --config.data.root=/data/flare_store \
      --config.data.volumes=/data/flare22 --workdir=runs/alice
  # pairs from provider (a), an anatomy_embedding run (configs/anatomy_embedding.py:runlocal
  # uses this store); its fields are computed once per store on the first such run
  python -m anatjax.main --config=configs/alice_swin3d.py:runlocal --workdir=runs/alice_a \
      --config.alice.provider=embedding --config.alice.embedding_run=runs/embedding
  # the teacher's Swin into MONAI's SwinUNETR.swinViT (README: fine-tuning in MONAI)
  python -m anatjax.export --workdir=runs/alice --out=alice_swinvit.safetensors

The store's options (data.volumes ... data.registration_iterations) must match those it
was prepared with; a store is refused otherwise.

runlocal hides 4 of the 16 mask columns (alice.mask_fraction=0.25), not the spec's 12: at
this size (32 volumes, batch 8, 240 steps) the distillation collapses with the 12 hidden
columns - the teacher's CLS outputs become the same for every crop and the centring makes
them uniform (`teacher_entropy` -> log out_dim) - while with 4 it learns: CLS loss 4.4 at
step 10, over steps 200-240 CLS loss 1.73, teacher entropy 0.31, arg-max agreement 0.53
(README.md; `--config.alice.mask_fraction=0.75` for the spec's masks).
"""

from anatjax.config import parse_arg
from configs.common import (ct_volume_store, dino_optim, pretraining_config,
                            runlocal_ct_volume_store)


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = pretraining_config("alice", "")
  c.batch_size = 64              # pairs (each item is two crops of two patients)
  c.duration = "1000ep"
  c.data = ct_volume_store(spacing_mm=(2.0, 1.5, 1.5), image_size=64)
  c.model = dict(
      feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
      patch_size=2, downsample="mergingv2",
      drop_path_rate=0.1,      # student only, linear over the blocks
      head_width=384, head_hidden_dim=2048, bottleneck_dim=256, out_dim=512,
      dtype="auto",            # matmuls: bfloat16 on GPU/TPU; norms, softmax, losses f32
  )
  c.optim = dino_optim()
  c.optim.warmup = "50ep"
  c.checkpoint.every = "10ep"
  c.alice = dict(
      provider="affine",       # affine (provider (b)) | embedding (provider (a))
      embedding_run="",        # provider (a): an anatomy_embedding run's workdir
      score_mode="inside",     # provider (b)'s score: inside (B's body) | ncc
      mask_mode="columns",     # columns (12 of 4 x 4 through z) | blocks3d (48 of 4^3)
      mask_fraction=0.75,      # of the mask cells hidden from the student (0 = none)
      partner="next",          # next (the spec) | self (ablation: both views from A at p)
      student_temp=0.1,
      teacher_temp=0.01,
      warmup_teacher_temp=0.008,
      warmup_teacher_temp_epochs=30,
      centre_momentum=0.9,
      teacher_momentum=0.996,
      freeze_last_layer="1ep",
      cls_weight=1.0,
      patch_weight=1.0,
      rec_weight=10.0,         # lambda_3, applied as lambda_3 / 2 to the voxel MSE
      casa=dict(num_heads=8, head_dim=64, ffn_dim=2048, dropout=0.1,
                teacher_dropout=False),   # True: the reference's dropout in the target
  )
  if arg.runlocal:
    c.batch_size = 8
    c.duration = "60ep"        # 4 steps per epoch: 240 steps
    c.log_every = 10
    runlocal_ct_volume_store(c.data)
    # 4^3 windows: 7^3 ones cost ~5x the time and 6 GB of temporaries at 32^3 crops
    c.model.update(feature_size=12, window_size=4, head_width=96, head_hidden_dim=256, bottleneck_dim=64,
                   out_dim=128)
    c.alice.casa.update(num_heads=4, head_dim=32, ffn_dim=256)
    c.alice.mask_fraction = 0.25   # the spec's 0.75 collapses at this size (docstring)
    c.alice.warmup_teacher_temp_epochs = 10
    c.optim.warmup = "5ep"
    c.optim.base_lr = 0.016    # peak 5e-4 at batch 8 (the linear scaling gives 1.6e-5)
    c.checkpoint.every = "20ep"
  c.lock()
  return c
