r"""The SynthCXR benchmark: AFiRe against MAE, DINO and no pretraining, side by side.

Pretrains each method (configs/<method>_vitb.py) with the same small encoder, the same
synthetic normal radiographs, batch and number of steps, then runs every evaluation
protocol (configs/eval/{cxr_probe,localisation,anatomy,segmentation}.py) on each trained
encoder and on a randomly initialised one (anatjax/evaluate/benchmark.py).

  # 2 CPU cores (see BUILD.md for the measured time):
  python -m anatjax.evaluate --config=configs/eval/synthcxr_benchmark.py
  # shorter or longer pretraining, more seeds:
  python -m anatjax.evaluate --config=configs/eval/synthcxr_benchmark.py:steps=300,num_seeds=2

Arguments: steps=N (pretraining steps per method), num_seeds=N (evaluation seeds), tiny
(the smallest end-to-end run; numbers meaningless). Writes OUT/results.md (the table),
OUT/results.json (every record, with its encoder), OUT/figures/ (probe AUROC vs label
fraction for all encoders; token t-SNE maps, anomaly maps and segmentations side by side)
and each run and evaluation under OUT/ (default OUT: workdirs/eval/synthcxr_benchmark).
An interrupted benchmark continues where it stopped when run again.
"""

import ml_collections

from anatjax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, steps=600, num_seeds=1, tiny=False)
  c = ml_collections.ConfigDict()
  c.protocol = "benchmark"
  c.seeds = tuple(range(arg.num_seeds))
  # One encoder for every method and for the random baseline: the runlocal size.
  c.model = dict(variant="Ti/8", depth=4, image_size=64)
  c.methods = (("afire", "afire_vitb:runlocal"), ("mae", "mae_vitb:runlocal"),
               ("dino", "dino_vitb:runlocal"))
  steps = 4 if arg.tiny else arg.steps
  warmup = f"{max(1, steps // 10)}st"
  c.pretrain = dict(
      duration=f"{steps}st",
      batch_size=32,
      num_examples=1024,       # synthetic normal patients
      num_workers=1,
      # Durations in steps, so that every method warms up alike whatever its epoch is.
      overrides=dict(
          afire=dict(optim=dict(warmup=warmup), afire=dict(freeze_prototypes=warmup)),
          mae=dict(optim=dict(warmup=warmup)),
          dino=dict(optim=dict(warmup=warmup),
                    dino=dict(freeze_last_layer=warmup,
                              warmup_teacher_temp_duration=f"{max(1, steps // 3)}st")),
      ),
  )
  size = "tiny" if arg.tiny else "runlocal"
  c.protocols = tuple(f"eval/{p}:{size}" for p in ("cxr_probe", "localisation", "anatomy",
                                                   "segmentation"))
  if arg.tiny:
    c.model = dict(variant="mu/8", depth=0, image_size=32)
    c.pretrain.update(batch_size=16, num_examples=64, num_workers=0)
    c.pretrain.overrides.afire.model = dict(num_prototypes=8, head_hidden_dim=32,
                                            head_bottleneck_dim=16,
                                            decoder=dict(width=16, depth=1, num_heads=2,
                                                         mlp_dim=32))
    c.pretrain.overrides.mae.model = dict(decoder=dict(width=16, depth=1, num_heads=2,
                                                       mlp_dim=32))
    c.pretrain.overrides.dino.model = dict(out_dim=32, head_hidden_dim=32,
                                           head_bottleneck_dim=16)
    c.pretrain.overrides.dino.dino.update(num_local_crops=2, local_size=16)
  c.lock()
  return c
