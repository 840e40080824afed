"""How busy XLA was in a profile trace: `python -m anatjax.profile_report WORKDIR/profile`.

A run with `--config.profile.num_steps=N` writes a JAX profiler trace, including a
Perfetto JSON (`perfetto_trace.json.gz`), to WORKDIR/profile. This command reads the newest
one below the given folder (or the file itself) and reports, over the span from the start
of the first XLA execution to the end of the last, the fraction covered by the union of
the execution intervals (`--event`, default `ThunkExecutor::Execute`: XLA:CPU's; nested
and concurrent intervals count once) and the largest gaps between them. A gap is time in
which XLA had nothing to run: the host was late with the next step (its batch, its
dispatch) or the loop blocked on a result. `data_wait` in metrics.jsonl says which of the
two it was.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os

import numpy as np

XLA_CPU_EXECUTE = "ThunkExecutor::Execute"


def trace_file(path: str) -> str:
  """`path` itself, or the newest perfetto_trace.json.gz below the folder `path`."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(
        f"no perfetto_trace.json.gz below {path}: profile a run with "
        "--config.profile.start_step=S --config.profile.num_steps=N and pass WORKDIR/profile")
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def merged_intervals(events, name: str = XLA_CPU_EXECUTE) -> np.ndarray:
  """The union of the complete ('X') events called `name`, as sorted disjoint
  [start, end) rows in microseconds."""
  rows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                if e.get("ph") == "X" and e.get("name") == name)
  merged = []
  for start, end in rows:
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return np.asarray(merged, np.float64).reshape(-1, 2)


def busy_report(intervals: np.ndarray, top: int = 5) -> dict:
  """Span, busy fraction and the `top` largest gaps (ms) of merged intervals."""
  if not len(intervals):
    raise ValueError("the trace has no execution event of that name: is it an XLA trace "
                     "of training steps? (see --event)")
  span = intervals[-1, 1] - intervals[0, 0]
  busy = float(np.sum(intervals[:, 1] - intervals[:, 0]))
  gaps = np.sort(intervals[1:, 0] - intervals[:-1, 1])[::-1]
  return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "busy_fraction": busy / span,
          "executions": len(intervals), "largest_gaps_ms": [g / 1e3 for g in gaps[:top]]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="WORKDIR/profile (the newest trace below it) or a "
                      "perfetto_trace.json.gz")
  parser.add_argument("--event", default=XLA_CPU_EXECUTE,
                      help="the name of the execution events (default: XLA:CPU's)")
  parser.add_argument("--top", type=int, default=5, help="how many of the largest gaps")
  args = parser.parse_args(argv)
  path = trace_file(args.path)
  report = busy_report(merged_intervals(load_events(path), args.event), args.top)
  print(f"{path}\n{report['executions']} separate execution intervals over "
        f"{report['span_ms']:.1f} ms: XLA busy {100 * report['busy_fraction']:.1f} %; "
        "largest gaps " + ", ".join(f"{g:.2f}" for g in report["largest_gaps_ms"]) + " ms")


if __name__ == "__main__":
  main()
