"""Quality figures of CT slices: panels (BGR uint8 images) enlarged to a readable size with
nearest-neighbour pixels, bottom-padded to one height and written side by side."""

from __future__ import annotations

import numpy as np


def save_side_by_side(panels, path: str, min_size: int = 256, gap: int = 4) -> None:
  """Each panel scaled by the integer factor that brings its longer side near `min_size`
  (voxels stay visible as blocks), then written left to right with `gap` black columns."""
  import cv2  # pylint: disable=g-import-not-at-top
  scaled = []
  for panel in panels:
    scale = max(1, min_size // max(panel.shape[:2]))
    scaled.append(cv2.resize(panel, None, fx=scale, fy=scale,
                             interpolation=cv2.INTER_NEAREST))
  height = max(p.shape[0] for p in scaled)
  scaled = [cv2.copyMakeBorder(p, 0, height - p.shape[0], 0, gap, cv2.BORDER_CONSTANT)
            for p in scaled]
  cv2.imwrite(path, np.concatenate(scaled, 1))
