"""The patch store from phantom CTs: prepared lazily from a config, the atlas's own patches
at its grid, a store of other options refused, a new subject mapped onto it."""

import numpy as np
import pytest

from anatjax.data import ct_patches, ct_prepare, registration, synthetic_ct
from anatjax.data.volume import resample


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  from configs import drasclr_cnn3d   # pylint: disable=g-import-not-at-top
  config = drasclr_cnn3d.get_config("runlocal")
  with config.unlocked():
    config.data.root = str(tmp_path_factory.mktemp("store"))
    config.data.update(num_examples=4, synthetic_size=48, spacing_mm=8.0, image_size=8,
                       patch_stride=6)
  messages = []
  root = ct_prepare.ensure_store(config.data, say=messages.append)
  return config, root, messages


def test_store_is_prepared_once_with_the_atlas_patches_at_its_grid(store):
  config, root, messages = store
  assert any("preparing it now" in m for m in messages)
  atlas = ct_patches.read_atlas(root)
  subjects = ct_patches.read_subjects(root)
  assert atlas.num_locations >= 3 and len(subjects) == 4 and atlas.patch_size == 8
  assert atlas.atlas_id in subjects
  image, labels = ct_prepare.load_volumes(f"{root}/{ct_prepare.ATLAS_VOLUMES}", "image",
                                          "labels")
  assert image.spacing == (8.0, 8.0, 8.0) and labels.array.max() > 0
  row = subjects.index(atlas.atlas_id)        # mapped by the identity: patch = its cube
  for location in (0, atlas.num_locations // 2, atlas.num_locations - 1):
    patches = np.load(ct_patches.location_file(root, location))
    z, y, x = atlas.corners[location]
    np.testing.assert_array_equal(patches[row], image.array[z:z + 8, y:y + 8, x:x + 8])
  # complete: used as it is the second time
  again = []
  assert ct_prepare.ensure_store(config.data, say=again.append) == root and not again


def test_store_of_other_options_is_refused(store):
  config, _, _ = store
  changed = config.data.copy_and_resolve_references()
  with changed.unlocked():
    changed.min_dice = 0.5
  with pytest.raises(ValueError, match="min_dice"):
    ct_prepare.ensure_store(changed)


def test_a_new_subject_maps_onto_the_store(store):
  _, root, _ = store
  ct = synthetic_ct.subject(7, 0, shape=(48, 48, 48))
  mapped = ct_prepare.map_to_store(root, resample(ct.image, 8.0))
  atlas = ct_patches.read_atlas(root)
  assert mapped["patches"].shape == (atlas.num_locations, 8, 8, 8)
  assert mapped["dice"] > 0.8
  inside = mapped["patches"][mapped["patches"] > -1024]   # (not the outside fill)
  assert np.mean((inside > -1000) & (inside < -500)) > 0.25   # lung parenchyma in them
  with pytest.raises(ValueError, match="resample it first"):
    ct_prepare.map_to_store(root, ct.image)
  assert isinstance(mapped["point_map"], registration.PointMap)
