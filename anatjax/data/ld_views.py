"""LD's per-image views (shared/methods/ld.md 2.2), made in Grain workers.

One source image becomes two views of one shared base augmentation:
  base     horizontal then vertical flip (p = 0.5 each), a rotation U(-180, 180) degrees
           about the centre (nearest neighbour, fill 0, no expansion), and a random
           resized crop to size x size (area U(0.9, 1.0), aspect log-uniform in
           [3/4, 4/3], bilinear);
  view     per view: a rotation jitter U(-2, 2) degrees (nearest, fill 0), colour jitter
           (brightness, contrast, saturation 0.4, hue 0.02, in random order; a
           radiograph has only brightness and contrast to change), greyscale with p = 0.2
           (colour images), float in [0, 1];
  view 2   also gets an orientation o = (mirror, quarter turns) of the dihedral group
           (anatjax/dihedral.py; `view2_ops="rot4"` draws rotations only, the reference's
           four orientations), carried in the batch so that the method can undo it on
           the patch grid.
The spec's sample is a pair of images (I1, I2) with a mixup weight lambda ~ U(0.2, 0.8):
here every image draws its own lambda, and the method pairs image j of a batch of 2B
with image B + j and uses the first one's lambda (anatjax/methods/ld.py). Emits float32
`view1`, `view2` [size, size, C], int8 `mirror`, `turns`, float32 `lam`.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import grain
import numpy as np

from anatjax import dihedral
from anatjax.data import decode
from anatjax.data.synthetic_cxr import SyntheticCXR, structure_mask
from anatjax.data.views import random_resized_crop

VIEW2_OPS = ("d4", "rot4")


def rotate(image, degrees: float):
  """Rotation about the image centre, counter-clockwise, nearest neighbour, fill 0, the
  output the input's size (torchvision's rotate with its defaults)."""
  height, width = image.shape[:2]
  matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
  return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _grey(x):
  """[H, W, 3] -> [H, W, 1] luminance (ITU-R 601, as torchvision's rgb_to_grayscale)."""
  return (0.299 * x[..., :1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3])


@dataclasses.dataclass(frozen=True)
class ColourJitter:
  """torchvision's ColorJitter on float [H, W, C] in [0, 1]: factors drawn in
  [1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], a hue shift in [-h, h] turns, applied
  in a random order, each clipped to [0, 1]. Saturation and hue act on colour only."""
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.02

  def __call__(self, x, rng: np.random.Generator):
    colour = x.shape[-1] == 3
    for op in rng.permutation(4):
      if op == 0:
        x = x * rng.uniform(1 - self.brightness, 1 + self.brightness)
      elif op == 1:
        mean = float((_grey(x) if colour else x).mean())
        x = (x - mean) * rng.uniform(1 - self.contrast, 1 + self.contrast) + mean
      elif op == 2:
        factor = rng.uniform(1 - self.saturation, 1 + self.saturation)
        x = (x - _grey(x)) * factor + _grey(x) if colour else x
      else:
        shift = rng.uniform(-self.hue, self.hue)
        if colour:
          hsv = cv2.cvtColor(np.float32(x), cv2.COLOR_RGB2HSV)   # hue in degrees
          hsv[..., 0] = (hsv[..., 0] + 360.0 * shift) % 360.0
          x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
      x = np.clip(x, 0.0, 1.0)
    return x


class LDViews(grain.transforms.RandomMap):
  """`image` (uint8 [H, W] or [H, W, 3]) -> LD's two views (see the module docstring)."""

  def __init__(self, size: int, channels: int, *, base_scale=(0.9, 1.0),
               base_rotation: float = 180.0, view_rotation: float = 2.0,
               jitter: ColourJitter = ColourJitter(), p_greyscale: float = 0.2,
               view2_ops: str = "d4", lam_range=(0.2, 0.8)):
    if view2_ops not in VIEW2_OPS:
      raise ValueError(f"config ld.view2_ops={view2_ops!r}: use one of {VIEW2_OPS}")
    if channels not in (1, 3):
      raise ValueError(f"LD views: {channels} channels; use 1 (radiographs) or 3 (fundus)")
    self.size, self.channels = size, channels
    self.base_scale, self.base_rotation = tuple(base_scale), base_rotation
    self.view_rotation, self.jitter, self.p_greyscale = view_rotation, jitter, p_greyscale
    self.view2_ops, self.lam_range = view2_ops, tuple(lam_range)

  def _image(self, element):
    image = np.asarray(element["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] != self.channels:
      if self.channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
      else:
        image = np.repeat(image, 3, axis=-1)
    return image

  def _view(self, base, rng: np.random.Generator):
    x = rotate(base, rng.uniform(-self.view_rotation, self.view_rotation))
    x = x.reshape(self.size, self.size, self.channels).astype(np.float32) / 255.0
    x = self.jitter(x, rng)
    if self.channels == 3 and rng.random() < self.p_greyscale:
      x = np.repeat(_grey(x), 3, axis=-1)
    return x.astype(np.float32)

  def random_map(self, element, rng: np.random.Generator):
    image = self._image(element)
    if rng.random() < 0.5:
      image = image[:, ::-1]
    if rng.random() < 0.5:
      image = image[::-1]
    image = rotate(np.ascontiguousarray(image),
                   rng.uniform(-self.base_rotation, self.base_rotation))
    base = random_resized_crop(image, rng, self.size, self.base_scale,
                               interpolation=cv2.INTER_LINEAR)
    view1, view2 = self._view(base, rng), self._view(base, rng)
    mirror = int(rng.random() < 0.5) if self.view2_ops == "d4" else 0
    turns = int(rng.integers(0, 4))
    return {"view1": view1,
            "view2": np.ascontiguousarray(dihedral.apply(view2, mirror, turns)),
            "mirror": np.int8(mirror), "turns": np.int8(turns),
            "lam": np.float32(rng.uniform(*self.lam_range))}


class ShapeReferences(grain.transforms.RandomMap):
  """Adds `shape_masks` float32 [2, size, size, 1]: for each of the image's two views a
  reference shape of the shape-guided variant (spec 7.2), drawn from `bank` (uint8
  [R, H, W], nonzero = inside) and augmented: horizontal and vertical flips (p = 0.5
  each), a rotation U(0, 360) degrees, a random crop removing up to `max_cut` of each
  side, a bilinear resize to size x size, binarised at > 0.1."""

  def __init__(self, bank: np.ndarray, size: int, max_cut: float = 0.1):
    if bank.ndim != 3 or not len(bank):
      raise ValueError(f"shape references: expected masks [R, H, W], got {bank.shape}")
    self.bank, self.size, self.max_cut = np.asarray(bank > 0, np.float32), size, max_cut

  def _one(self, rng: np.random.Generator):
    mask = self.bank[rng.integers(len(self.bank))]
    if rng.random() < 0.5:
      mask = mask[:, ::-1]
    if rng.random() < 0.5:
      mask = mask[::-1]
    height, width = mask.shape
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2),
                                     rng.uniform(0.0, 360.0), 1.0)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), matrix, (width, height),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    top, bottom = (int(rng.uniform(0, self.max_cut) * height) for _ in range(2))
    left, right = (int(rng.uniform(0, self.max_cut) * width) for _ in range(2))
    mask = mask[top:height - bottom, left:width - right]
    mask = cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
    return (mask > 0.1).astype(np.float32)[..., None]

  def random_map(self, element, rng: np.random.Generator):
    return {**element, "shape_masks": np.stack([self._one(rng), self._one(rng)])}


def shape_bank(masks_dir: str, structure: str, count: int, size: int,
               seed: int) -> np.ndarray:
  """uint8 [R, H, W] reference shapes: the first `count` mask images (sorted names) of
  `masks_dir`, or, without one, `structure` masks of `count` synthetic patients drawn
  with `seed` (other patients than the training images': the "other modality")."""
  if masks_dir:
    names = sorted(n for n in os.listdir(masks_dir) if decode.is_image_file(n))[:count]
    if not names:
      raise FileNotFoundError(f"config ld.shape.masks_dir={masks_dir!r}: no mask images")
    masks = []
    for name in names:
      mask = cv2.imread(os.path.join(masks_dir, name), cv2.IMREAD_GRAYSCALE)
      if mask is None:
        raise ValueError(f"{os.path.join(masks_dir, name)}: not a readable mask image")
      masks.append(cv2.resize((mask > 0).astype(np.uint8), (size, size),
                              interpolation=cv2.INTER_NEAREST))
    return np.stack(masks)
  phantoms = SyntheticCXR("pretrain", image_size=size, num_examples=count, seed=seed)
  return np.stack([structure_mask(phantoms[i]["anatomy"], structure) for i in range(count)])
