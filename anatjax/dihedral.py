"""The 8 orientations of a square grid (the dihedral group D4): mirror bits and quarter turns.

LD (shared/methods/ld.md 2.2 step 3 and 3.1) gives view 2 of each image an extra orientation
o = (mirror, quarter_turns): mirror left-right when mirror = 1, then rotate by 90 degrees x
quarter_turns counter-clockwise in the (H, W) plane (`np.rot90`'s sense on an image array).
The host applies o to the view-2 image (`apply`, per example, static ints, NumPy); the method
undoes it on the device on the 8x8 patch grid, per example, with o coming in the batch
(`undo_batch`). Both sides need the same convention, so it lives here, at the top of the
package, rather than in `data/` (host) or `methods/` (device).

Element index = 4 * mirror + quarter_turns, 0..7. With `ld.view2_ops = "rot4"` (the
reference's 4 orientations, defect D1) the host draws only mirror = 0; nothing here changes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ELEMENTS = tuple((mirror, turns) for mirror in (0, 1) for turns in range(4))


def inverse(mirror: int, quarter_turns: int) -> tuple[int, int]:
  """The element that undoes (mirror, quarter_turns).

  Undoing means rotating by -quarter_turns first, then mirroring if mirror = 1 (spec 3.1).
  A mirrored element is its own inverse (mirror . rot(-k) = rot(k) . mirror), a pure rotation
  is undone by the opposite rotation.
  """
  return (1, quarter_turns % 4) if mirror else (0, -quarter_turns % 4)


def apply(x, mirror: int, quarter_turns: int, axes: tuple[int, int] = (-3, -2)):
  """Mirror the `axes[1]` (width) axis if mirror = 1, then rotate quarter_turns x 90 degrees
  counter-clockwise in the `axes` plane. NumPy in, NumPy out (host); other arrays use jnp.

  The default axes are (H, W) of a [..., H, W, C] array. Rotations by an odd number of
  quarter turns swap H and W, so non-square arrays change shape.
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  if mirror:
    x = xp.flip(x, axis=axes[1])
  return xp.rot90(x, quarter_turns % 4, axes=axes)


def undo(x, mirror: int, quarter_turns: int, axes: tuple[int, int] = (-3, -2)):
  """The inverse of `apply`: undo(apply(x, m, k), m, k) == x."""
  return apply(x, *inverse(mirror, quarter_turns), axes=axes)


def _undo_gather_table(grid: int) -> np.ndarray:
  """[8, grid*grid]: for element e, the source cell (row-major) of each output cell when
  undoing e, found by undoing e on a grid of cell indices."""
  cells = np.arange(grid * grid).reshape(grid, grid)
  return np.stack([undo(cells, m, k, axes=(0, 1)).reshape(-1) for m, k in ELEMENTS])


def undo_batch(grids, mirror, quarter_turns):
  """Undo each example's own orientation on a batch of square grids, on the device.

  grids [N, G, G, ...] (e.g. the [N, 8, 8, D] patch embeddings), mirror [N] in {0, 1},
  quarter_turns [N] in {0..3} (any integer dtype, traced values allowed) -> [N, G, G, ...]
  with undo(grids[n], mirror[n], quarter_turns[n]) for every n. One gather with a static
  table, rather than a switch over 8 branches. Values outside those ranges are not checked
  here (they come from the host pipeline): quarter_turns is taken mod 4, mirror as != 0.
  """
  grids = jnp.asarray(grids)
  batch, rows, cols = grids.shape[:3]
  if rows != cols:
    raise ValueError(f"undo_batch needs square grids (a quarter turn of a non-square grid "
                     f"changes its shape), got {rows}x{cols}")
  element = 4 * (jnp.asarray(mirror) != 0).astype(jnp.int32) + jnp.asarray(
      quarter_turns).astype(jnp.int32) % 4
  sources = jnp.asarray(_undo_gather_table(rows))[element]               # [N, G*G]
  flat = grids.reshape(batch, rows * cols, *grids.shape[3:])
  sources = sources.reshape(batch, rows * cols, *([1] * (flat.ndim - 2)))
  return jnp.take_along_axis(flat, sources, axis=1).reshape(grids.shape)
