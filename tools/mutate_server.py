"""A warm Python for ``tools/mutate.py``: imports once, forks per test run.

Started by ``mutate.py`` in a worker's copy of the repository, with that
copy's environment. It imports the heavy libraries the tests use (never
``jepa_ema``, which each run must import afresh from the mutated copy, and
never starting a JAX backend, which would make forking unsafe), then reads
one JSON request per line on stdin::

  {"args": ["-x", "-q", ..., "tests/test_x.py::test_y"], "timeout": 60.0}

For each it forks a child that runs ``pytest.main(args)`` with its output
in a file, in a process group of its own, and answers one JSON line on
stdout: ``{"rc": 0, "seconds": 4.2, "output": "..."}`` (``rc`` is
``"timeout"`` when the child ran past ``timeout``; its group is killed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

# The imports every test run pays for; none of them starts a backend.
import chex  # noqa: F401
import hypothesis  # noqa: F401
import jax
import jax.numpy  # noqa: F401
import numpy  # noqa: F401
import optax  # noqa: F401
import pytest

try:
  import flax.nnx  # noqa: F401
except ImportError:  # the NNX tests skip themselves without flax
  pass

from jax._src import xla_bridge

if xla_bridge._backends:  # a backend's threads would not survive a fork
  raise SystemExit("a backend started at import: forking is unsafe")
if "jepa_ema" in sys.modules:
  raise SystemExit("jepa_ema imported by the server: mutants would be stale")
del jax


def _run(args: list[str], timeout: float) -> dict[str, object]:
  out = tempfile.NamedTemporaryFile(prefix="mutate_run_", delete=False)
  out.close()
  t0 = time.monotonic()
  pid = os.fork()
  if pid == 0:  # the child: one pytest session, then out
    os.setpgrp()
    fd = os.open(out.name, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
      rc = int(pytest.main(args))
    except BaseException:  # noqa: BLE001
      rc = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
  rc: int | str = "timeout"
  while time.monotonic() - t0 < timeout:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      rc = os.waitstatus_to_exitcode(status)
      break
    time.sleep(0.05)
  else:
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    os.waitpid(pid, 0)
  seconds = time.monotonic() - t0
  with open(out.name, errors="replace") as f:
    output = f.read()
  os.unlink(out.name)
  return {"rc": rc, "seconds": seconds, "output": output[-20000:]}


def main() -> None:
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    reply = _run(request["args"], float(request["timeout"]))
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
