"""Host transforms that make augmented views of a greyscale image (the MAE and DINO
baselines): random resized crops, flips, intensity jitter, blur and solarisation.

They run in Grain workers with Grain's per-example generator, take the uint8 [H, W] image
that `transforms.Greyscale` emits and emit uint8 crops: the device normalises.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import grain
import numpy as np


def random_resized_crop(image, rng: np.random.Generator, size: int,
                        scale: tuple[float, float], ratio=(3 / 4, 4 / 3),
                        interpolation=cv2.INTER_CUBIC):
  """A random box of `scale` x the image's area and aspect ratio in `ratio` (log-uniform),
  resized to [size, size] (bicubic by default: MAE, DINO; LD's is bilinear); the whole
  image when ten draws do not fit.

  The sampling rule of torchvision's RandomResizedCrop, which MAE, DINO and LD use.
  """
  height, width = image.shape[:2]
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      image = image[top:top + h, left:left + w]
      break
  return cv2.resize(image, (size, size), interpolation=interpolation)


@dataclasses.dataclass(frozen=True)
class Photometric:
  """DINO's photometric augmentations for one kind of view, greyscale edition: with
  probability `p_jitter` brightness and contrast factors in [1 - jitter, 1 + jitter]
  (random order), Gaussian blur with sigma in `blur_sigma` with probability `p_blur`,
  solarisation (pixels >= 128 inverted) with probability `p_solarize`. (Colour
  saturation, hue and random greyscale have nothing to act on in a radiograph.)"""
  p_jitter: float = 0.8
  jitter: float = 0.4
  p_blur: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  p_solarize: float = 0.0

  def __call__(self, crop, rng: np.random.Generator):
    x = crop.astype(np.float32)
    if rng.random() < self.p_jitter:
      brightness, contrast = rng.uniform(1 - self.jitter, 1 + self.jitter, size=2)
      for op in rng.permutation(2):
        x = x * brightness if op == 0 else (x - x.mean()) * contrast + x.mean()
        x = np.clip(x, 0, 255)
    if rng.random() < self.p_blur:
      x = cv2.GaussianBlur(x, (0, 0), sigmaX=rng.uniform(*self.blur_sigma))
    x = np.rint(np.clip(x, 0, 255)).astype(np.uint8)
    if rng.random() < self.p_solarize:
      x = np.where(x >= 128, 255 - x, x).astype(np.uint8)
    return x


def _flip(crop, rng: np.random.Generator, p: float):
  return crop[:, ::-1] if rng.random() < p else crop


class RandomResizedCrop(grain.transforms.RandomMap):
  """`image` -> one random resized crop (MAE: scale 0.2-1, horizontal flip p=0.5)."""

  def __init__(self, size: int, scale=(0.2, 1.0), p_flip: float = 0.5):
    self.size, self.scale, self.p_flip = size, tuple(scale), p_flip

  def random_map(self, element, rng: np.random.Generator):
    crop = random_resized_crop(element["image"], rng, self.size, self.scale)
    return {"image": np.ascontiguousarray(_flip(crop, rng, self.p_flip))}


class MultiCrop(grain.transforms.RandomMap):
  """`image` -> DINO's views: `global` [2, S, S] and `local` [n, s, s], uint8.

  Global crops cover `global_scale` of the image, local crops `local_scale`; every view
  is flipped with p=0.5 and jittered; the first global view is always blurred, the second
  rarely but may be solarised, local views are blurred half the time (DINO's recipe).
  """

  def __init__(self, global_size: int, local_size: int, num_local: int,
               global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), p_flip: float = 0.5):
    self.global_size, self.local_size, self.num_local = global_size, local_size, num_local
    self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
    self.p_flip = p_flip
    self.global_looks = (Photometric(p_blur=1.0), Photometric(p_blur=0.1, p_solarize=0.2))
    self.local_look = Photometric(p_blur=0.5)

  def _view(self, image, rng, size, scale, look):
    crop = _flip(random_resized_crop(image, rng, size, scale), rng, self.p_flip)
    return look(crop, rng)

  def random_map(self, element, rng: np.random.Generator):
    image = element["image"]
    global_views = [self._view(image, rng, self.global_size, self.global_scale, look)
                    for look in self.global_looks]
    local_views = [self._view(image, rng, self.local_size, self.local_scale,
                              self.local_look) for _ in range(self.num_local)]
    out = {"global": np.stack(global_views)}
    if self.num_local:
      out["local"] = np.stack(local_views)
    return out
