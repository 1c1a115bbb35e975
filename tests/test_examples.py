"""The examples run and show what they claim: the demo (quick mode), its
checkpoint/resume (bit-identical, also after a killed run; clear errors for
corrupt or mismatched checkpoints), and each recipe."""

import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEMO = EXAMPLES / "ijepa_digits.py"

pytestmark = pytest.mark.standard_promotion  # flax / optax / sklearn inside


def load(name):
  return runpy.run_path(str(EXAMPLES / name))


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  res = load("ijepa_digits.py")["main"](
      ["--quick", "--out-dir", str(out), "--no-progress"])
  return res, out


def test_demo_quick_trains_and_writes_outputs(demo_result):
  res, out = demo_result
  assert set(res["runs"]) == {"ema", "no_ema"}
  steps = res["config"]["steps"]
  for name, run in res["runs"].items():
    loss = np.asarray(run["curves"]["loss"])
    assert loss.shape == (steps,) and np.all(np.isfinite(loss))
    assert loss[-20:].mean() < 0.5 * loss[:5].mean(), name  # loss falls
    # The target's step is the optimizer's step.
    assert run["ema_step"] == run["optimizer_step"] == run["train_step"] \
        == steps
  ema, no_ema = res["runs"]["ema"], res["runs"]["no_ema"]
  # With momentum 0.996 the target lags the online encoder; at 0 it is a copy.
  assert ema["target_online_rel_dist"] > 1e-3
  assert no_ema["target_online_rel_dist"] == 0.0
  # The drift logged by ema(drift=True) on every step: finite, positive with
  # a lagging target, per top-level module of the encoder.
  drift = np.asarray(ema["curves"]["drift"])
  # (step 0 has learning rate 0 in the warm-up: online == target there)
  assert drift.shape == (steps,) and np.all(drift[1:] > 0) and np.all(drift < 1)
  assert drift[-1] == np.float32(ema["target_online_rel_dist"])
  np.testing.assert_array_equal(no_ema["curves"]["drift"], 0.0)
  per = ema["target_online_rel_dist_per_module"]
  assert len(per) >= 3 and all(v > 0 for v in per.values())
  np.testing.assert_allclose(ema["curves"]["momentum"], 0.996, rtol=1e-6)
  np.testing.assert_array_equal(no_ema["curves"]["momentum"], 0.0)
  table = res["table"]
  assert set(table) >= {"random-init encoder", "raw pixels"}
  for metrics in table.values():
    assert 0.0 <= metrics["knn5"] <= 1.0 and metrics["eff_rank"] >= 1.0
  saved = json.loads((out / "ijepa_digits.json").read_text())
  assert saved["table"] == json.loads(json.dumps(table))
  png = (out / "ijepa_digits.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment sharing JAX's persistent compilation cache, so
  the reference, killed and resumed runs compile the train step once."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(cache)}


def _run_demo(args, env):
  return subprocess.run([sys.executable, str(DEMO), *args], env=env,
                        capture_output=True, text=True, timeout=240)


COMMON = ["--quick", "--steps", "60", "--runs", "ema", "--no-eval-baselines",
          "--no-progress", "--checkpoint-every", "10"]


def test_checkpoint_resume_after_kill_is_bit_identical(tmp_path, env):
  # Uninterrupted reference run.
  ref = _run_demo([*COMMON, "--checkpoint-dir", str(tmp_path / "a"),
                   "--out-dir", str(tmp_path / "out_a")], env)
  assert ref.returncode == 0, ref.stderr[-3000:]
  # The same run, killed (SIGKILL) once a few checkpoints exist ...
  proc = subprocess.Popen(
      [sys.executable, str(DEMO), *COMMON, "--checkpoint-dir",
       str(tmp_path / "b"), "--out-dir", str(tmp_path / "out_b"),
       "--step-delay", "0.05"], env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  state_dir = tmp_path / "b" / "ema" / "state"
  deadline = time.time() + 180
  while time.time() < deadline:
    steps = [int(p.name) for p in state_dir.glob("*") if p.name.isdigit()]
    if steps and max(steps) >= 20:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  # ... then resumed from the same directory.
  resumed = _run_demo([*COMMON, "--checkpoint-dir", str(tmp_path / "b"),
                       "--out-dir", str(tmp_path / "out_b")], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout
  a = json.loads((tmp_path / "out_a" / "ijepa_digits.json").read_text())
  b = json.loads((tmp_path / "out_b" / "ijepa_digits.json").read_text())
  ra, rb = a["runs"]["ema"], b["runs"]["ema"]
  assert ra["final_state_sha256"] == rb["final_state_sha256"]
  assert ra["curves"]["loss"] == rb["curves"]["loss"]
  assert ra["metrics"] == rb["metrics"]
  # Rerunning a finished run resumes at the end and changes nothing.
  again = _run_demo([*COMMON, "--checkpoint-dir", str(tmp_path / "b"),
                     "--out-dir", str(tmp_path / "out_c")], env)
  assert again.returncode == 0 and "resumed from step 60" in again.stdout
  c = json.loads((tmp_path / "out_c" / "ijepa_digits.json").read_text())
  assert c["runs"]["ema"]["final_state_sha256"] == ra["final_state_sha256"]


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path):
  demo = load("ijepa_digits.py")
  args = ["--quick", "--steps", "20", "--runs", "ema", "--no-eval-baselines",
          "--no-progress", "--checkpoint-every", "10", "--checkpoint-dir",
          str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out")]
  demo["main"](args)
  # A different configuration in the same directory: refused, not restarted.
  with pytest.raises(demo["CheckpointError"], match="different configuration"):
    demo["main"]([*args, "--lr", "5e-4"])
  # Damage every file of the checkpoints: refused with the path and step.
  state_dir = tmp_path / "ck" / "ema" / "state"
  damaged = 0
  for f in state_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
      damaged += 1
  assert damaged
  with pytest.raises(demo["CheckpointError"], match="cannot restore step 20"):
    demo["main"](args)
  # A corrupt config file is reported too.
  (tmp_path / "ck" / "ema" / "config.json").write_text("{not json")
  with pytest.raises(demo["CheckpointError"], match="corrupt"):
    demo["main"](args)


@pytest.mark.parametrize("name", ["recipe_nnx.py", "recipe_linen.py",
                                  "recipe_equinox.py",
                                  "recipe_multisteps.py"])
def test_recipe(name, capsys):
  result = load(name)["main"]()  # each recipe asserts its own result
  assert capsys.readouterr().out.strip()
  assert result


def test_target_masks_are_blocks_with_context_left():
  import jax
  import jax.numpy as jnp
  demo = load("ijepa_digits.py")
  one = np.asarray(demo["sample_target_masks"](jax.random.key(0), 512, 1))
  counts = one.sum(1)
  assert one.shape == (512, 16) and counts.min() >= 4 and counts.max() <= 9
  assert set(np.unique(counts)) <= {4, 6, 9}  # h x w with h, w in {2, 3}
  grid = one.reshape(-1, 4, 4)
  rows, cols = grid.any(2).sum(1), grid.any(1).sum(1)
  np.testing.assert_array_equal(rows * cols, counts)  # a filled rectangle
  many = np.asarray(demo["sample_target_masks"](jax.random.key(1), 512, 6))
  assert many.sum(1).max() <= 15  # at least one context token
  assert (many.sum(1) > counts).mean() > 0.5  # unions grow
