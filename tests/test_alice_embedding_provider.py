"""Alice mining its pairs with provider (a) (alice.md 2.4): the fields of a tiny
anatomy_embedding run (trained for 2 steps on the same tiny store as Alice's) computed once
per store and reused, a partial or stale fields folder computed again, the training matcher
answering as the provider, Alice's host pipeline on them, and the config's errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from anatjax import config as config_lib
from anatjax.data import correspondence, ct_volumes, pipeline
from anatjax.methods import alice, anatomy_embedding

NUM_SUBJECTS = 4
STORE = dict(num_examples=NUM_SUBJECTS, synthetic_size=40, spacing_mm=(8.0, 8.0, 8.0),
             registration_iterations=5, num_workers=0)


def alice_config(root, **alice_keys):
  """Alice's runlocal on a 4-volume store at 8 mm, batch 4, one device."""
  from configs import alice_swin3d   # pylint: disable=g-import-not-at-top
  c = alice_swin3d.get_config("runlocal")
  with c.unlocked():
    c.data.update(root=str(root), **STORE)
    c.batch_size = 4
    c.mesh.data = 1
    c.alice.update(alice_keys)
  return c


def embedding_config(root):
  """The anatomy embedding on the same store: 16^3 crops, a two-stage network, 2 steps."""
  from configs import anatomy_embedding as recipe   # pylint: disable=g-import-not-at-top
  c = recipe.get_config("runlocal")
  with c.unlocked():
    c.data.update(root=str(root), image_size=16, **STORE)
    c.batch_size = 2
    c.duration = "2st"
    c.checkpoint.every = "2st"
    c.mesh.data = 1
    c.model.update(widths=(8, 16), blocks=(1, 1), stem_stride=2, fpn_width=8,
                   fine_stride=2, coarse_stride=4, fine_dim=8, coarse_dim=8)
    c.embedding.update(num_positives=20, hard_negatives=10, random_negatives=10)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(store, anatomy_embedding run dir, fields folder, what the first ensure_fields said)."""
  from anatjax import train   # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("alice_embedding")
  store = ct_volumes.ensure_store(alice_config(base / "store").data, say=lambda _: None)
  run_dir = str(base / "embedding")
  train.train(embedding_config(store), run_dir)
  said = []
  folder = ct_volumes.ensure_fields(store, run_dir, say=said.append)
  return store, run_dir, folder, said


def field_files(folder):
  return sorted(f for f in os.listdir(folder) if f.endswith(".npy"))


def test_fields_are_computed_once_per_store_and_run(run):
  store, run_dir, folder, said = run
  assert any("Computing the embedding fields of 4 volumes" in s for s in said)
  assert os.path.dirname(folder) == os.path.join(store, "fields")
  assert len(field_files(folder)) == 3 * NUM_SUBJECTS
  fine = np.load(ct_volumes.fields_path(folder, 0, "fine"), mmap_mode="r")
  assert isinstance(fine, np.memmap) and fine.dtype == np.float16
  np.testing.assert_allclose(np.linalg.norm(fine.astype(np.float32), axis=-1), 1, atol=2e-3)
  times = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in field_files(folder)}
  again = []
  assert ct_volumes.ensure_fields(store, run_dir, say=again.append) == folder and not again
  ct_volumes.main([f"--out={store}", f"--embedding_run={run_dir}"])   # the command: no work
  assert times == {f: os.stat(os.path.join(folder, f)).st_mtime_ns
                   for f in field_files(folder)}


def test_a_partial_or_stale_folder_is_refused_then_computed_again(run):
  store, run_dir, folder, _ = run
  marker = os.path.join(folder, ct_volumes.FIELDS_FILE)
  kept = np.load(ct_volumes.fields_path(folder, 1, "fine"))
  shutil.move(marker, marker + ".saved")                  # interrupted: no marker
  with pytest.raises(FileNotFoundError, match="no complete embedding fields"):
    ct_volumes.FieldCaches(folder)
  with open(marker + ".saved") as f:
    saved = json.load(f)
  with open(marker, "w") as f:                             # another step's fields
    json.dump(dict(saved, step=saved["step"] + 1), f)
  np.save(ct_volumes.fields_path(folder, 1, "fine"), np.zeros_like(kept))
  said = []
  assert ct_volumes.ensure_fields(store, run_dir, say=said.append) == folder
  assert any("partial or stale" in s for s in said)
  np.testing.assert_array_equal(np.load(ct_volumes.fields_path(folder, 1, "fine")), kept)
  with open(marker) as f:
    assert json.load(f) == saved


def test_the_training_matcher_answers_as_the_provider(run):
  store, run_dir, folder, _ = run
  provider, _ = anatomy_embedding.load_provider(run_dir)
  fields = ct_volumes.FieldCaches(folder)
  item = ct_volumes.VolumePairs(store)[2]
  mapped = fields.map(item)
  prepared = [provider.prepare(item[k].image) for k in ("a", "b")]
  points = correspondence.candidate_points(item["a"].image, np.random.default_rng(0), 16)
  want = provider.match_many(prepared[0], points, prepared[1])
  got = fields.matcher().match_many(mapped["a"], points, mapped["b"])
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert mapped["b"].image is item["b"].image
  assert isinstance(mapped["a"].fine, np.memmap)


def batches(source, method, count):
  ds = iter(pipeline.make_dataset(source, method.host_transforms, batch_size=4, seed=0))
  return [next(ds) for _ in range(count)]


def test_alice_host_pipeline_mines_with_the_embedding_provider(run):
  store, run_dir, _, _ = run
  config = alice_config(store, provider="embedding", embedding_run=run_dir)
  method = alice.make(config, config_lib.Schedule(4, 1, 10))
  assert isinstance(method.host_transforms[0], ct_volumes.FieldCaches)
  source = ct_volumes.VolumePairs(store)
  first, again = (batches(source, method, 2) for _ in range(2))
  for x, y in zip(first, again):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  batch = first[0]
  assert batch["crops"].shape == (4, 2, 32, 32, 32) and batch["crops"].dtype == np.int16
  assert batch["mask_cells"].shape == (4, 2, 4, 4) and batch["points"].shape == (4, 2, 3)
  assert np.all(batch["pair_score"][~batch["weak"]] > 0.7)
  assert np.all(np.abs(batch["pair_score"]) <= 1)
  affine = alice.make(alice_config(store), config_lib.Schedule(4, 1, 10))
  assert len(affine.host_transforms) == 1
  assert not np.array_equal(batches(source, affine, 1)[0]["points"], batch["points"])


def test_config_errors_name_the_keys(run, tmp_path):
  store, run_dir, _, _ = run
  schedule = config_lib.Schedule(4, 1, 10)
  # an Alice run stand-in: the embedding run with another method in its metadata
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  for meta in other.glob("checkpoints/*/meta/*"):
    text = meta.read_text()
    if '"anatomy_embedding"' in text:
      meta.write_text(text.replace('"anatomy_embedding"', '"alice"'))
  for keys, error, match in (
      (dict(provider="atlas"), ValueError, "alice.provider='atlas'"),
      (dict(provider="embedding"), ValueError, "needs alice.embedding_run"),
      (dict(embedding_run=run_dir), ValueError, "alice.embedding_run=.*embedding' only"),
      (dict(provider="embedding", embedding_run=str(other)), ValueError,
       "'alice' run, not an anatomy_embedding one"),
      (dict(provider="embedding", embedding_run=str(tmp_path / "none")), FileNotFoundError,
       "No checkpoint")):
    with pytest.raises(error, match=match):
      alice.make(alice_config(store, **keys), schedule)
