"""The README's code runs, and the quickstart example does what it says."""

import pathlib
import re
import runpy
import sys

import jax
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.standard_promotion
def test_readme_quickstart_runs_and_tracks():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python code block"
  ns: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), ns)  # pylint: disable=exec-used
  params, opt_state = ns["params"], ns["opt_state"]
  x = jax.numpy.ones((4, 8))
  for _ in range(3):
    params, opt_state, loss = ns["train_step"](params, opt_state, x)
  assert np.isfinite(float(loss))
  state = opt_state[-1]
  assert int(state.step) == 3
  # The target lags the online params: it is neither the old nor the new params.
  target = ns["jepa_ema"].get_target(opt_state)
  assert not np.allclose(target["kernel"], params["kernel"])


def test_readme_options_block_runs():
  text = (ROOT / "README.md").read_text()
  block = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
           if "every=4, drift=True" in b][0]
  ns: dict = {}
  exec(compile(block, "README.md", "exec"), ns)  # pylint: disable=exec-used
  state, state16 = ns["state"], ns["state16"]
  assert int(state.step) == 8
  # after 8 steps of p <- 0.99 p, two every=4 updates: the target lags
  assert 0.0 < float(state.drift["global"]) < 0.1
  assert state16.target["encoder"]["w"].dtype == jax.numpy.bfloat16
  assert ns["teacher"]["encoder"]["w"].shape == (8, 8)


@pytest.mark.standard_promotion
def test_quickstart_example(capsys):
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    module = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
  finally:
    sys.path.pop(0)
  result = module["main"](["--steps", "120"])
  out = capsys.readouterr().out
  assert "momentum" in out and "EMA target loss" in out
  assert result["online_loss"] < 1e-2
  assert result["target_loss"] < 1e-1
  assert 0 < result["lag"] < 0.1


def _block(marker: str) -> str:
  text = (ROOT / "README.md").read_text()
  found = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
           if marker in b]
  assert len(found) == 1, marker
  return found[0]


def test_readme_scaling_block_runs():
  ns: dict = {"jepa_ema": __import__("jepa_ema"), "T": 1000, "base_lr": 1e-3}
  exec(compile(_block("scale_momentum(ref, 1024 / 256)"), "README.md", "exec"),
       ns)  # pylint: disable=exec-used
  assert ns["lr"] == pytest.approx(2e-3)
  np.testing.assert_allclose(float(ns["momentum"](0)), 0.996 ** 4, rtol=1e-6)


def test_readme_timm_block_runs():
  import jax.numpy as jnp
  ns: dict = {"jepa_ema": __import__("jepa_ema"), "jnp": jnp,
              "update_after_step": 3, "decay": 0.9999, "min_decay": 0.5,
              "inv_gamma": 1.0, "power": 0.75}
  exec(compile(_block("update_after_step"), "README.md", "exec"), ns)  # pylint: disable=exec-used
  timm = ns["timm"]
  assert [float(timm(t)) for t in range(4)] == [0.0] * 4  # copies u + 1 times
  assert float(timm(4)) == pytest.approx(max(1 - 2 ** -0.75, 0.5), abs=1e-7)


@pytest.mark.standard_promotion
def test_readme_posthoc_block_runs(tmp_path, monkeypatch):
  import jax.numpy as jnp
  monkeypatch.chdir(tmp_path)
  code = _block("PostHocSnapshots(").replace("every=1000", "every=10")
  code = code.replace("step=20_000", "step=20")
  ns: dict = {"jepa_ema": __import__("jepa_ema"), "jnp": jnp,
              "params": {"w": jnp.zeros(3)}, "data": range(40),
              "train_step": lambda p, b: {"w": p["w"] + 1.0}}
  exec(compile(code, "README.md", "exec"), ns)  # pylint: disable=exec-used
  assert len(ns["snaps"]) == 8  # steps 10, 20, 30, 40 x two widths
  assert ns["model"]["w"].shape == (3,)
  assert ns["x"].shape == (8,) and ns["x"].sum() == pytest.approx(1.0)
