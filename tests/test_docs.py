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
