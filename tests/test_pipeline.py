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


def _dataset(source, **kwargs):
  host = (transforms.Greyscale(32),
          transforms.SyntheticLesions(LesionConfig.for_image_size(32), patch_size=8))
  return pipeline.make_dataset(source, host, batch_size=8, seed=3, **kwargs)


def test_batches_are_small_dtypes_and_constant_images_use_the_fallback_texture():
  batch = next(iter(_dataset(ConstantImages())))
  assert batch["x_clean"].dtype == np.uint8 and batch["x_clean"].shape == (8, 32, 32)
  assert batch["x_slm"].dtype == np.uint8 and batch["abn"].shape == (8, 16)
  assert batch["abn"].dtype == bool and batch["abn"].any(axis=1).all()
  assert batch["texture_fallback"].all()
  # Lesions only brighten; untouched tokens keep the clean pixels exactly.
  assert (batch["x_slm"] >= batch["x_clean"]).all()


def test_processes_read_disjoint_halves_and_each_pass_is_reshuffled():
  seen = []
  for process in range(2):
    it = iter(_dataset(ConstantImages(), process_index=process, process_count=2))
    first_pass = [b["x_clean"][:, 0, 0] for b in (next(it) for _ in range(4))]
    second_pass = [b["x_clean"][:, 0, 0] for b in (next(it) for _ in range(4))]
    values = np.concatenate(first_pass)
    assert len(set(values)) == 32  # one pass = this process's 32 examples, once each
    assert sorted(values) == sorted(np.concatenate(second_pass))
    assert not np.array_equal(values, np.concatenate(second_pass))
    seen.append(set(values))
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 64


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
