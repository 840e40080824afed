"""`python -m anatjax.profile_report`: the busy fraction of a trace against hand-computed
intervals, and its search for the newest trace below a profile folder."""

import gzip
import json
import os

import numpy as np
import pytest

from anatjax import profile_report

NAME = profile_report.XLA_CPU_EXECUTE


def event(ts, dur, name=NAME, tid=1):
  return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}


def write_trace(path, events):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_union_of_nested_and_concurrent_executions():
  events = [
      event(0, 100), event(10, 20, tid=2),         # nested in the first: counts once
      event(90, 30, tid=3),                        # overlaps its end: union [0, 120)
      event(150, 50),                              # gap 30
      event(200, 10),                              # touches: union [150, 210)
      event(300, 100),                             # gap 90
      event(120, 25, name="Python dispatch"),      # other events are not executions
      {"ph": "i", "name": NAME, "ts": 5},          # nor are instant events
  ]
  intervals = profile_report.merged_intervals(events)
  np.testing.assert_array_equal(intervals, [[0, 120], [150, 210], [300, 400]])
  report = profile_report.busy_report(intervals, top=5)
  busy = 120 + 60 + 100
  assert report["busy_fraction"] == pytest.approx(busy / 400)
  assert report["busy_ms"] == pytest.approx(busy / 1e3)
  assert report["largest_gaps_ms"] == pytest.approx([0.09, 0.03])
  assert report["executions"] == 3


def test_command_reads_the_newest_trace_below_a_folder(tmp_path, capsys):
  old = tmp_path / "plugins" / "profile" / "run1" / "perfetto_trace.json.gz"
  new = tmp_path / "plugins" / "profile" / "run2" / "perfetto_trace.json.gz"
  write_trace(str(old), [event(0, 10)])
  write_trace(str(new), [event(0, 40), event(50, 50)])
  os.utime(old, (1, 1))
  profile_report.main([str(tmp_path)])
  out = capsys.readouterr().out
  assert str(new) in out and "XLA busy 90.0 %" in out and "10.00 ms" not in out
  with pytest.raises(ValueError, match="no execution event"):
    profile_report.main([str(new), "--event", "GpuExecute"])
  with pytest.raises(FileNotFoundError, match="profile.num_steps"):
    profile_report.main([str(tmp_path / "plugins" / "none")])
