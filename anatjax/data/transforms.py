"""Host-side Grain transforms: per-example work done in the data workers, not on device.

Everything emitted is uint8 or bool: what crosses the worker boundary stays small, and the
device converts and normalises (see DESIGN.md: float32 images through Grain workers were
15x slower than uint8 here).
"""

from __future__ import annotations

import cv2
import grain
import numpy as np

from anatjax.data import lesions


class Greyscale(grain.transforms.Map):
  """A source item's `image` -> uint8 [size, size] greyscale `image`, nothing else.

  Resizes the whole image bilinearly without keeping the aspect ratio and without cropping
  (AFiRe: a grid position must keep meaning the same anatomy). size=None keeps the
  image's size, for views that crop and resize afterwards (from the full resolution).
  """

  def __init__(self, size: int | None):
    self.size = size

  def map(self, element):
    image = np.asarray(element["image"])
    if image.ndim == 3:
      image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.shape[-1] == 3 else image[..., 0]
    if image.dtype != np.uint8:
      raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if self.size is not None and image.shape != (self.size, self.size):
      image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
    return {"image": image}


class SyntheticLesions(grain.transforms.RandomMap):
  """AFiRe's synthetic lesion mask: clean image -> (lesioned image, token lesion flags).

  Grain hands each example its own generator, derived from the pipeline seed and the
  example's position in the repeated stream, so every pass over the data paints fresh
  lesions and any example can be regenerated exactly.
  """

  def __init__(self, config: lesions.LesionConfig, patch_size: int):
    self.config = config
    self.patch_size = patch_size

  def random_map(self, element, rng: np.random.Generator):
    clean = element["image"]
    texture, fallback = lesions.lesion_texture(clean, self.config.crop_radius)
    slm, _, abn = lesions.synthesize(clean, texture, rng, self.config, self.patch_size)
    return {"x_clean": clean, "x_slm": slm, "abn": abn,
            "texture_fallback": np.bool_(fallback)}
