"""Shared test configuration.

Every test runs under JAX's *strict* dtype promotion (no implicit promotion
between e.g. bfloat16 and float32), so the library has to cast explicitly.
Tests that drive optax / flax internals, which rely on standard promotion,
are marked ``@pytest.mark.standard_promotion``.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from hypothesis import settings

# Scripts run in subprocesses by the tests (e.g. with 8 simulated devices).
collect_ignore = ["scripts"]

# Property tests (hypothesis) run under one of two profiles, chosen by the
# environment variable HYPOTHESIS_PROFILE (default "ci"):
#
# * "ci": 60 examples per test, derandomized. Hypothesis then seeds each
#   test from the test's own name and code, so a run is reproducible, but
#   the examples are a fixed, small sample: a renamed copy of a test draws
#   others. A known corner is therefore never left to the draw: each one is
#   pinned with ``@example`` (overflow, subnormals, signed zeros: see
#   tests/test_update.py and tests/test_inputs.py), and explicit examples run
#   first, in every profile. A failing example is printed and fails the run;
#   the profile never suppresses or skips one (no ``suppress_health_check``,
#   no database of known failures: ``database=None``).
# * "thorough": 20,000 random (not derandomized) examples per test, for a
#   search run by hand: HYPOTHESIS_PROFILE=thorough pytest -k property
#   (HYPOTHESIS_MAX_EXAMPLES sets another number).
settings.register_profile(
  "ci", max_examples=60, deadline=None, derandomize=True, database=None
)
settings.register_profile(
  "thorough",
  max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20000")),
  deadline=None,
  database=None,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
  if request.node.get_closest_marker("standard_promotion"):
    yield
    return
  with jax.numpy_dtype_promotion("strict"):
    yield


SCRIPTS = pathlib.Path(__file__).parent / "scripts"


@pytest.fixture(scope="session")
def on_eight_devices():
  """``run(script_name, *args) -> dict``: runs ``tests/scripts/<script_name>``
  with 8 simulated CPU devices and returns the JSON of its last ``RESULT``
  line (the device count is fixed when jax starts, hence the subprocess)."""

  def run(name: str, *args: str) -> dict:
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    proc = subprocess.run(
      [sys.executable, str(SCRIPTS / name), *args],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])

  return run


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """Returns ``f`` or ``jax.jit(f, static_argnames=...)`` (both paths)."""

  def wrap(f, **jit_kwargs):
    return jax.jit(f, **jit_kwargs) if request.param else f

  return wrap
