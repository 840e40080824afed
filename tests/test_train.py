"""The trainer end to end on tiny variants of the real AFiRe config."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatjax import reporting, sharding, train
from configs import afire_vitb
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_of(summary):
  return jax.tree.map(np.asarray, jax.device_get(summary["state"]["params"]))


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def stop_at(monkeypatch, step):
  """Deliver SIGTERM while step `step` runs (deterministic stand-in for a preemption)."""
  calls = {"n": 0}
  original = sharding.global_batch

  def global_batch(batch, mesh):
    calls["n"] += 1
    if calls["n"] == step:
      signal.raise_signal(signal.SIGTERM)
    return original(batch, mesh)

  monkeypatch.setattr(sharding, "global_batch", global_batch)


def test_exact_resume_after_interrupt(tmp_path, monkeypatch):
  config = tiny_config()
  straight = train.train(config, str(tmp_path / "straight"))
  assert straight["step"] == 12 and straight["stopped_by"] is None

  stop_at(monkeypatch, 6)
  first = train.train(config, str(tmp_path / "interrupted"))
  assert first["stopped_by"] == "SIGTERM" and first["step"] == 6
  monkeypatch.undo()
  second = train.train(config, str(tmp_path / "interrupted"))
  assert second["start_step"] == 6 and second["step"] == 12
  assert_trees_equal(params_of(straight), params_of(second))
  logged = {r["step"]: r["loss"] for r in reporting.read_metrics(str(tmp_path / "straight"))}
  resumed = {r["step"]: r["loss"] for r in reporting.read_metrics(str(tmp_path / "interrupted"))}
  assert logged == resumed


def test_fsdp_on_8_devices_matches_1_device(tmp_path):
  assert jax.device_count() == 8
  one = train.train(tiny_config(duration="4st"), str(tmp_path / "one"))
  eight = train.train(tiny_config(duration="4st", mesh=dict(data=2, fsdp=4)),
                      str(tmp_path / "eight"))
  np.testing.assert_allclose([l for _, l in eight["losses"]],
                             [l for _, l in one["losses"]], atol=1e-5)
  params = eight["state"]["params"]
  kernel = params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert "fsdp" in kernel.sharding.spec
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  assert len(kernel.sharding.device_set) == 8


def test_loss_stops_run_on_nan_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(duration="40st")
  config.unlock()
  config.optim.base_lr = 1e30
  with pytest.raises(train.NonFiniteLoss, match=r"at step \d+"):
    train.train(config, str(tmp_path))
  # Whatever was saved holds finite parameters.
  for step in sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()):
    meta = json.loads((tmp_path / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    assert meta["step"] == step


def test_corrupt_latest_checkpoint_falls_back(tmp_path, monkeypatch):
  config = tiny_config()
  stop_at(monkeypatch, 10)  # stops after step 10; checkpoints at 4, 8, 10
  train.train(config, str(tmp_path))
  monkeypatch.undo()
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [4, 8, 10]
  for f in (ckpt_dir / "10" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "meta" not in f.name:
      f.write_bytes(b"\0" * 7)
  resumed = train.train(config, str(tmp_path))
  assert resumed["start_step"] == 8 and resumed["step"] == 12
  assert (ckpt_dir / "10.unreadable-0").is_dir()


def test_resume_with_another_config_is_refused(tmp_path):
  train.train(tiny_config(duration="4st"), str(tmp_path))
  changed = tiny_config(duration="4st")
  changed.unlock()
  changed.afire.student_temp = 0.2
  with pytest.raises(ValueError, match="allow_config_change"):
    train.train(changed, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["afire"]["student_temp"] == 0.1  # the run's own config, not the refused one
  changed.allow_config_change = True
  assert train.train(changed, str(tmp_path))["start_step"] == 4


def test_bad_config_fails_before_compiling(tmp_path):
  config = tiny_config()
  config.unlock()
  config.data.source = "synthetic_cx"
  with pytest.raises(ValueError, match="synthetic_cxr"):
    train.train(config, str(tmp_path))
  with pytest.raises(ValueError, match="Unknown config argument 'varient'.*variant"):
    afire_vitb.get_config("varient=S/16")
  with pytest.raises(AttributeError, match="base_lr"):
    tiny_config().optim.base_lrr = 1.0


def _run_main(args, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-m", "anatjax.main", *args], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_main_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  """The real command, with Grain worker processes, stopped by SIGTERM mid-run."""
  workdir = tmp_path / "run"
  args = ["--config=configs/afire_vitb.py:runlocal", f"--workdir={workdir}",
          "--config.duration=60st", "--config.data.image_size=32",
          "--config.model.variant=mu/8", "--config.model.depth=0",
          "--config.data.num_workers=1", "--config.mesh.data=1"]
  proc = _run_main(args)
  try:
    deadline = time.time() + 120
    while not (workdir / "metrics.jsonl").exists():
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, out
  assert "Stopped on SIGTERM" in out and "Run the same command again" in out
  stopped = int(out.split("Stopped on SIGTERM after step ")[1].split(";")[0])
  assert stopped < 60
  proc = _run_main(args)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "60/60 steps done" in out
  steps = [r["step"] for r in reporting.read_metrics(str(workdir))]
  assert steps == list(range(10, 61, 10))


def test_blank_images_use_fallback_texture_and_are_counted(tmp_path, monkeypatch):
  class Blank:
    def __len__(self):
      return 64

    def __getitem__(self, index):
      return {"image": np.zeros((32, 32), np.uint8)}

  monkeypatch.setattr(train.sources, "make_source", lambda data_config: Blank())
  result = train.train(tiny_config(duration="3st"), str(tmp_path))
  assert int(result["state"]["method_state"]["texture_fallbacks"]) == 3 * 16
  assert reporting.read_metrics(str(tmp_path))[-1]["texture_fallbacks_total"] == 48


def test_runlocal_recipe_loss_goes_down(tmp_path):
  """The real runlocal config (model, image size, batch, schedules), only shorter."""
  config = afire_vitb.get_config("runlocal")
  config.duration = "40st"
  config.data.num_workers = 0
  config.mesh.data = 1
  result = train.train(config, str(tmp_path))
  losses = np.array([l for _, l in result["losses"]])
  assert len(losses) == 40 and np.isfinite(losses).all()
  assert losses[-5:].mean() < losses[:5].mean() - 0.3, losses
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  for term in ("loss_cst", "loss_rec"):
    assert records[-1][term] < records[0][term], term


def test_main_names_the_closest_key_for_a_mistyped_override(tmp_path):
  proc = _run_main(["--config=configs/afire_vitb.py:runlocal", f"--workdir={tmp_path}",
                    "--config.optim.base_lrr=1"])
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode != 0
  assert 'Did you mean "base_lr"' in out and "Traceback" not in out
  assert not os.listdir(tmp_path)  # failed before creating anything


def test_gradient_accumulation_equals_the_large_batch_step(tmp_path):
  whole = train.train(tiny_config(duration="3st"), str(tmp_path / "whole"))
  micro = train.train(tiny_config(duration="3st", grad_accum_steps=4,
                                  mesh=dict(data=2, fsdp=2)), str(tmp_path / "micro"))
  np.testing.assert_allclose([l for _, l in micro["losses"]],
                             [l for _, l in whole["losses"]], rtol=1e-5)
  # Adam divides by sqrt(v): near-zero gradients turn float rounding into ~1e-6 moves.
  for a, b in zip(jax.tree.leaves(params_of(micro)), jax.tree.leaves(params_of(whole))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_step_is_traced_once_per_run(tmp_path, monkeypatch):
  """No retracing: the step is compiled ahead of time, once, and reused for every step."""
  from anatjax.methods import afire
  traces = {"n": 0}
  original = afire.make

  def counting_make(config, schedule):
    method = original(config, schedule)
    def prepare(*args):
      traces["n"] += 1
      return method.prepare(*args)
    return method._replace(prepare=prepare)

  monkeypatch.setattr(afire, "make", counting_make)
  result = train.train(tiny_config(duration="6st"), str(tmp_path))
  assert result["step"] == 6 and traces["n"] == 1


def test_bfloat16_compute_keeps_float32_state(tmp_path):
  config = tiny_config(duration="3st")
  config.unlock()
  config.model.dtype = "bfloat16"
  config.optim.mu_dtype = "bfloat16"
  low = train.train(config, str(tmp_path / "bf16"))
  full = train.train(tiny_config(duration="3st"), str(tmp_path / "f32"))
  state = low["state"]
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(state["method_state"]["teacher"])} == {
      np.dtype("float32")}
  moments = {"mu": set(), "nu": set()}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
    for name in moments:
      if f".{name}" in jax.tree_util.keystr(path):
        moments[name].add(leaf.dtype)
  assert moments == {"mu": {jnp.dtype("bfloat16")}, "nu": {np.dtype("float32")}}
  np.testing.assert_allclose([l for _, l in low["losses"]],
                             [l for _, l in full["losses"]], rtol=3e-2)


def test_init_from_exported_weights(tmp_path):
  from anatjax import export
  source = train.train(tiny_config(duration="2st"), str(tmp_path / "source"))
  weights = str(tmp_path / "encoder.safetensors")
  export.export_run(str(tmp_path / "source"), weights)
  config = tiny_config(duration="1st", seed=7, init_from=weights)
  config.unlock()
  config.optim.base_lr = 0.0  # the step then leaves the parameters where they started
  result = train.train(config, str(tmp_path / "init"))
  want = jax.device_get(source["state"]["method_state"]["teacher"]["encoder"])
  assert_trees_equal(params_of(result)["encoder"], want)
  assert_trees_equal(jax.device_get(result["state"]["method_state"]["teacher"]["encoder"]),
                     want)


def test_profile_of_chosen_steps_is_written(tmp_path):
  config = tiny_config(duration="4st")
  config.unlock()
  config.profile.start_step, config.profile.num_steps = 1, 2
  train.train(config, str(tmp_path))
  traces = list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
