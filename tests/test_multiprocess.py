"""JAX's own distributed runtime: 2 processes x 4 CPU devices (gloo) update a
globally sharded target with no cross-process traffic and the same values as
a single-device run. Every subprocess has a timeout, so CI never hangs."""

import json
import os
import pathlib
import socket
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "multiprocess_ema.py"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_four_devices_each():
  port = free_port()
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
  }
  procs = [
    subprocess.Popen(
      [sys.executable, str(SCRIPT), str(i), str(port)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=180)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for code, out, err in outs:
    assert code == 0, err[-4000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT ") :]))
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    assert r["collectives"] == []  # no cross-device/process traffic
    assert r["shardings_kept"]
    assert r["step"] == 3
    assert r["local_shards"] == 3 * 4  # 3 leaves x 4 local devices
    assert r["identical"], r["max_err"]  # bitwise equal to one device
