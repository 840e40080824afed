"""The Grain host pipeline with AFiRe's host transforms."""

import numpy as np

from anatjax.data import pipeline, transforms
from anatjax.data.lesions import LesionConfig


class ConstantImages:
  """Item i is a 32x32 image filled with the value i: constant images, the worst case
  for the lesion-texture search, and the index is readable from any pixel."""

  def __len__(self):
    return 64

  def __getitem__(self, index):
    return {"image": np.full((32, 32), index, np.uint8)}


def _dataset(source, batch_size=8, **kwargs):
  host = (transforms.Greyscale(32),
          transforms.SyntheticLesions(LesionConfig.for_image_size(32), patch_size=8))
  return pipeline.make_dataset(source, host, batch_size=batch_size, seed=3, **kwargs)


def test_batches_are_small_dtypes_and_constant_images_use_the_fallback_texture():
  batch = next(iter(_dataset(ConstantImages())))
  assert batch["x_clean"].dtype == np.uint8 and batch["x_clean"].shape == (8, 32, 32)
  assert batch["x_slm"].dtype == np.uint8 and batch["abn"].shape == (8, 16)
  assert batch["abn"].dtype == bool and batch["abn"].any(axis=1).all()
  assert batch["texture_fallback"].all()
  # Lesions only brighten; untouched tokens keep the clean pixels exactly.
  assert (batch["x_slm"] >= batch["x_clean"]).all()


def _passes(process_index, process_count, batch_size=8):
  """The first two passes over the 64 examples, as seen by one process."""
  it = iter(_dataset(ConstantImages(), process_index=process_index,
                     process_count=process_count, batch_size=batch_size))
  batches = 64 // process_count // batch_size
  return [np.concatenate([next(it)["x_clean"][:, 0, 0] for _ in range(batches)])
          for _ in range(2)]


def test_processes_read_disjoint_halves_of_one_global_stream():
  one = _passes(0, 1)
  two = [_passes(p, 2) for p in range(2)]
  for n in range(2):
    halves = [set(two[p][n]) for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == 32 and not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(range(64))
    # Global batch k is the same set of examples whatever the process count.
    for k in range(8):
      global_batch = set(one[n][8 * k:8 * k + 8])
      assert global_batch == set(two[0][n][4 * k:4 * k + 4]) | set(two[1][n][4 * k:4 * k + 4])
  assert not np.array_equal(np.sort(one[0][:8]), np.sort(one[1][:8]))  # reshuffled


def test_iterator_state_restores_the_exact_stream():
  it = iter(_dataset(ConstantImages()))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  again = iter(_dataset(ConstantImages()))
  again.set_state(state)
  for want in expected:
    got = next(again)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_greyscale_resizes_whole_image_and_converts_rgb():
  rgb = np.zeros((40, 60, 3), np.uint8)
  rgb[:, 30:] = 255
  out = transforms.Greyscale(32).map({"image": rgb})["image"]
  assert out.shape == (32, 32) and out.dtype == np.uint8
  assert out[:, :15].max() == 0 and out[:, 17:].min() == 255  # no crop, no aspect kept
