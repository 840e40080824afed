"""Prepared datasets: `prepare` writes a source's items to ArrayRecord shards, skipping and
listing bad files; the `prepared` source reads back exactly the original items, feeds the
Grain pipeline, and refuses folders and options that do not match."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from anatjax.data import bad_files, pipeline, prepared, sources, transforms
from anatjax.data.prepare import prepare
from test_sources import FIXTURES, SIZE, data_config, make, read_fixture_entries, stand_in, \
    write_csv


@pytest.fixture
def nih_root(tmp_path):
  """An NIH tree: the first 5 images of the fixture box list (boxes) and 3 without boxes,
  at the release's 1024 px; one image corrupt, one missing."""
  root = tmp_path / "nih"
  root.mkdir()
  shutil.copy(os.path.join(FIXTURES, "BBox_List_2017.head100.csv"), root)
  with open(os.path.join(FIXTURES, "BBox_List_2017.head100.csv"), newline="") as f:
    boxed = [row[0] for row in list(csv.reader(f))[1:6]]
  unboxed = [r["Image Index"] for r in read_fixture_entries()[:3]]
  names = boxed + unboxed
  write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "View Position"],
            [[n, "Atelectasis|Mass" if i % 2 else "No Finding", "PA"]
             for i, n in enumerate(names)])
  for i, name in enumerate(names[:-1]):  # the last one is missing
    stand_in(root / "images" / name, seed=i, shape=(1024, 1024))
  corrupt = root / "images" / names[2]
  corrupt.write_bytes(corrupt.read_bytes()[:1000])
  return root, str(corrupt), str(root / "images" / names[-1])


def assert_same_items(got, want):
  assert set(got) == set(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_prepared_items_equal_the_original_and_bad_files_are_listed(nih_root, tmp_path):
  root, corrupt, missing = nih_root
  out = tmp_path / "prepared"
  metadata = prepare(data_config(source="nih_cxr14", root=str(root)), "pretrain", str(out),
                     shard_size=3, say=lambda _: None)
  assert metadata["count"] == 6 and len(metadata["shards"]) == 3
  assert metadata["class_names"] == list(make("nih_cxr14", root).class_names)
  assert metadata["skipped"]["count"] == 2
  assert bad_files.BadFileLog(str(out)).entries() == {
      missing: "missing", corrupt: "corrupt or truncated image data"}

  original = make("nih_cxr14", root)
  readable = [p for p in range(len(original)) if original.index.paths[p] != corrupt]
  source = make("prepared", out)
  assert isinstance(source, prepared.PreparedSource) and len(source) == len(readable) == 6
  for position, original_position in enumerate(readable):
    want = original[original_position]
    want["index"] = np.int64(position)  # a source's index is the position in it
    assert_same_items(source[position], want)
  assert source[0]["boxes"].shape == (1, 4) and source[0]["box_classes"][0] == 0


def test_worker_processes_write_the_same_shards(tmp_path):
  config = data_config(source="synthetic_cxr", num_examples=5)
  one, two = tmp_path / "in_process", tmp_path / "workers"
  prepare(config, "labelled", str(one), shard_size=2, say=lambda _: None)
  prepare(config, "labelled", str(two), shard_size=2, workers=2, say=lambda _: None)
  for name in json.loads((one / "prepared.json").read_text())["shards"]:
    assert (one / name).read_bytes() == (two / name).read_bytes()
  generated = sources.make_source(config, "labelled")
  source = sources.make_source(data_config(source="prepared", root=str(two),
                                           num_examples=5), "labelled")
  for i in range(5):
    assert_same_items(source[i], generated[i])  # anatomy, finding masks, boxes too


def test_grain_pipeline_reads_a_prepared_folder_in_a_worker(tmp_path):
  out = tmp_path / "prepared"
  prepare(data_config(source="synthetic_cxr", num_examples=6), "pretrain", str(out),
          say=lambda _: None)
  source = make("prepared", out, num_examples=6)
  iterator = iter(pipeline.make_dataset(source, (transforms.Greyscale(SIZE),),
                                        batch_size=4, seed=0, num_workers=1))
  batches = [next(iterator) for _ in range(3)]
  iterator.close()
  assert all(b["image"].shape == (4, SIZE, SIZE) and b["image"].dtype == np.uint8
             for b in batches)


def test_mismatched_options_and_missing_or_foreign_folders_fail_clearly(tmp_path):
  out = tmp_path / "prepared"
  prepare(data_config(source="synthetic_cxr", num_examples=2), "pretrain", str(out),
          say=lambda _: None)
  with pytest.raises(ValueError, match=r"data.image_size=64 but .* prepared at "
                                       r"image_size=32"):
    make("prepared", out, num_examples=2, image_size=64)
  with pytest.raises(ValueError, match=r"data.num_examples=3 \(prepared with 2\)"):
    make("prepared", out, num_examples=3)
  with pytest.raises(ValueError, match="split 'labelled'"):
    make("prepared", out, split="labelled", num_examples=2)
  with pytest.raises(FileNotFoundError, match="is not a folder; expected a folder "
                                              "written by `python -m anatjax.data.prepare"):
    make("prepared", tmp_path / "nowhere")
  stand_in(tmp_path / "photos" / "a.png")
  with pytest.raises(FileNotFoundError, match="has no prepared.json"):
    make("prepared", tmp_path / "photos")
  with pytest.raises(FileExistsError, match="not a preparation .*'a.png'"):
    prepare(data_config(source="synthetic_cxr", num_examples=2), "pretrain",
            str(tmp_path / "photos"), say=lambda _: None)
  (out / "prepared.json").write_text(json.dumps({"format": "something else"}))
  with pytest.raises(ValueError, match="format 'something else'"):
    make("prepared", out)


def test_records_hold_numeric_arrays_only():
  item = {"image": np.arange(6, dtype=np.uint8).reshape(2, 3), "index": np.int64(7),
          "known": np.array([True, False]), "boxes": np.ones((0, 4), ">f4")}
  back = prepared.decode_item(prepared.encode_item(item))
  assert_same_items(back, {**item, "boxes": item["boxes"].astype("<f4")})
  assert type(back["index"]) is np.int64 and back["image"].flags.writeable
  with pytest.raises(ValueError, match="'name' has dtype object"):
    prepared.encode_item({"name": np.array(["a"], object)})


def test_the_command_prepares_and_measures(tmp_path):
  out = tmp_path / "prepared"
  result = subprocess.run(
      [sys.executable, "-m", "anatjax.data.prepare", "--source=synthetic_cxr",
       f"--out={out}", "--image_size=32", "--workers=0", "--measure_items=2",
       "--config=configs/afire_vitb.py:runlocal", "--config.data.num_examples=3"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=120)
  assert result.returncode == 0, result.stderr
  assert "prepared ArrayRecord" in result.stdout
  metadata = json.loads((out / "prepared.json").read_text())
  assert metadata["count"] == 3 and metadata["options"]["image_size"] == 32
  assert metadata["reading_speed"]["speedup"] > 0
