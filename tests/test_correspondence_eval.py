"""The correspondence-accuracy command: errors against hand computations, and the command
end to end on two tiny phantom pairs."""

import json

import numpy as np

from anatjax.data import correspondence, registration
from anatjax.evaluate import correspondence as evaluation


def test_a_volume_matched_to_itself_has_no_error_and_full_agreement():
  image, labels = evaluation.phantom(5, 0, 48, 8.0)
  cache = correspondence.AffineCache(image, correspondence.body_mask(image).array,
                                     registration.PointMap(np.eye(3), np.zeros(3)))
  matcher = correspondence.AffineMatcher()
  errors = evaluation.centroid_errors(matcher, cache, cache, labels, labels)
  assert set(errors) == set(evaluation.ORGANS)
  for matched, same_point in errors.values():
    # the centroid rounded to its voxel: at most half a voxel diagonal away
    assert matched <= 0.5 * 8.0 * np.sqrt(3) + 1e-6 and matched == same_point
  liver = np.argwhere(labels == evaluation.synthetic_ct.LABEL_NAMES.index("liver"))[0]
  assert evaluation.organ_agreement(labels, liver, labels, liver) == (1, 1)
  assert evaluation.organ_agreement(labels, [0, 0, 0], labels, liver) == (0, 0)


def test_command_writes_results_and_figure(tmp_path):
  evaluation.main([f"--out={tmp_path}", "--num_pairs=2", "--synthetic_size=48",
                   "--spacing_mm=8", "--iterations=30", "--mined_per_pair=4"])
  results = json.loads((tmp_path / "results.json").read_text())
  organs = results["organs"]
  assert set(organs) == set(evaluation.ORGANS)
  matched = np.mean([r["matched_mm_mean"] for r in organs.values()])
  same_point = np.mean([r["same_point_mm_mean"] for r in organs.values()])
  assert matched < same_point
  assert results["mining"]["pairs"] == 8 and 0 <= results["mining"]["weak_rate"] <= 1
  assert (tmp_path / "matches.png").stat().st_size > 0
  assert "| liver |" in (tmp_path / "results.md").read_text()
