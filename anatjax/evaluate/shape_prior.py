"""Protocol: what the shape-guided LD variant segments without any label (spec 7.2, test).

The run's network in inference mode on the test images; its prior channel c
(ld.shape.channel) is scored against the structure whose shapes were the reference
(ld.shape.structure) with the Dice of each image, two ways:
  assignment     A_c > 0.5;
  pixel-region   the image's own region embeddings r_k = L2norm(mean_p A_k(p) v(p)),
                 S_k(p) = softmax_k(v(p) . r_k / 0.2), prediction S_c > 0.5.
(On fundus photographs the spec restricts both to the field of view; radiographs have
none.) The run must be a shape-guided LD run: its config says which channel and shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from anatjax import losses
from anatjax.data.synthetic_cxr import structure_mask
from anatjax.evaluate import features, unet_transfer
from anatjax.methods.ld import image_input
from anatjax.models.unet import LDUNet

PREDICTIONS = ("assignment", "pixel_region")


def predictions(variables, num_clusters: int, channel: int, images, channels: int,
                batch_size: int, temperature: float = 0.2) -> dict[str, np.ndarray]:
  """{"assignment", "pixel_region"}: bool [N, S, S] predictions of channel `channel`."""
  model = LDUNet(num_clusters=num_clusters)

  @jax.jit
  def predict(x):
    v, a = model.apply(variables, x, train=False)
    regions = losses.region_embeddings(v, a)                        # [N, K, D]
    logits = jnp.einsum("nhwd,nkd->nhwk", v, regions) / temperature
    return a[..., channel] > 0.5, jax.nn.softmax(logits, -1)[..., channel] > 0.5

  out = {name: [] for name in PREDICTIONS}
  for start, stop in features.batches(len(images), batch_size):
    x = image_input(features.pad_to(images[start:stop], batch_size), channels)
    for name, value in zip(PREDICTIONS, predict(x)):
      out[name].append(np.asarray(value)[:stop - start])
  return {name: np.concatenate(v) for name, v in out.items()}


def load_encoder(init: str, config, step: int | None = None):
  """unet_transfer.load_encoder, for shape-guided LD runs only."""
  encoder = unet_transfer.load_encoder(init, config, step)
  if not encoder.info.get("shape"):
    raise ValueError(f"--init={init}: protocol ld_shape scores a shape-guided LD run "
                     "(configs/ld_unet.py:stage=2,shape_guided)")
  return encoder


def run_protocol(config, encoder, splits, out_dir: str, log=print) -> dict:
  del out_dir
  shape = encoder.info["shape"]
  test = splits["test"]
  whole = dict(encoder.clusters)
  num_clusters = whole.pop("num_clusters")
  found = predictions(whole, num_clusters, shape["channel"], test.images, encoder.channels,
                      config.batch_size)
  truth = structure_mask(test.anatomy, shape["structure"])
  records = []
  for name, predicted in found.items():
    dice = unet_transfer.image_dice(predicted.astype(np.float32), truth)
    records.append(dict(method=name, metric="dice", cls=shape["structure"], seed=None,
                        label_fraction=0.0, value=float(dice.mean()),
                        std_over_images=float(dice.std())))
    log(f"  {name:12s}: Dice {dice.mean():.4f} ± {dice.std():.4f} against "
        f"{shape['structure']} (channel {shape['channel']})")
  return {"records": records, "notes": [], "figures": {}}
