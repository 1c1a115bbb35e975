"""The built sdist and wheel: the wheel installs into a fresh virtual
environment and works there without the source tree, and ships py.typed and
the Apache-2.0 LICENSE (sdist and wheel)."""

import math
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("build")


def test_wheel_builds_installs_and_runs(tmp_path):
  dist = tmp_path / "dist"
  built = subprocess.run(
    [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
     str(ROOT)],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert built.returncode == 0, built.stderr[-3000:]
  wheels = list(dist.glob("jepa_ema-*.whl"))
  sdists = list(dist.glob("jepa_ema-*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1
  names = zipfile.ZipFile(wheels[0]).namelist()
  assert "jepa_ema/py.typed" in names
  assert "jepa_ema/posthoc.py" in names and "jepa_ema/_kernel.py" in names
  assert not any(n.startswith(("tests/", "examples/")) for n in names)
  # The license pyproject.toml declares, in both distributions, verbatim.
  license_text = (ROOT / "LICENSE").read_bytes()
  assert b"Apache License" in license_text and b"Version 2.0" in license_text
  with zipfile.ZipFile(wheels[0]) as whl:
    shipped = [
      n for n in names if re.fullmatch(r"[^/]+\.dist-info/.*LICENSE", n)
    ]
    assert len(shipped) == 1, names
    assert whl.read(shipped[0]) == license_text
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert re.search(
      r"^License: Apache-2\.0$", whl.read(metadata).decode(), re.M
    )
  with tarfile.open(sdists[0]) as sdist:
    member = next(m for m in sdist.getnames() if m.endswith("/LICENSE"))
    extracted = sdist.extractfile(member)
    assert extracted is not None and extracted.read() == license_text

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                 timeout=300)  # fmt: skip
  py = venv / "bin" / "python"
  pip = subprocess.run(
    [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
     str(wheels[0])],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert pip.returncode == 0, pip.stderr[-3000:]
  # The runtime dependencies come from this environment's site-packages via
  # PYTHONPATH (which, unlike a site dir, does not run the .pth file of the
  # editable install): jepa_ema itself can only come from the wheel.
  deps = sysconfig.get_paths()["purelib"]
  code = (
    "import pathlib, jax.numpy as jnp, jepa_ema\n"
    "f = pathlib.Path(jepa_ema.__file__)\n"
    "assert 'venv' in str(f), f\n"
    "assert (f.parent / 'py.typed').exists()\n"
    "ema = jepa_ema.ema(jepa_ema.cosine_momentum(0.5, 1.0, total_steps=4))\n"
    "state = ema.init({'w': jnp.zeros(3)})\n"
    "for _ in range(3):\n"
    "  state = ema.update({'w': jnp.ones(3)}, state)\n"
    "print(jepa_ema.__version__, int(state.step), float(state.target['w'][0]))\n"
  )
  run = subprocess.run(
    [str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True,
    timeout=300, env={**os.environ, "PYTHONPATH": deps, "JAX_PLATFORMS": "cpu"},
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  version, step, value = run.stdout.split()
  declared = re.search(
    r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M
  )
  assert declared and version == declared.group(1) and step == "3"
  # From 0 toward 1 with m_t = 1 - 0.5 (1 + cos(pi t / 4)) / 2: 1 - prod(m_t).
  m = [1 - 0.5 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(3)]
  assert float(value) == pytest.approx(1 - m[0] * m[1] * m[2], abs=1e-6)
