"""Writes post-hoc snapshots at every step (tests/test_posthoc.py).

``posthoc_writer.py DIR STEPS [KILL]``: ``STEPS`` training steps, one save
of both widths per step. With ``KILL`` = ``STEP-INDEX`` (as in the folder
names, e.g. ``4-1``), the process SIGKILLs itself inside that save, right
before its metadata is written: its array data are on disk, its meta.json is
not, as a ``kill -9`` there would leave it. The hook wraps the library's
metadata writer from here; the library has none.
"""

import os
import signal
import sys

import jax.numpy as jnp

import jepa_ema
from jepa_ema import posthoc

directory, steps = sys.argv[1], int(sys.argv[2])
kill = (
  tuple(int(v) for v in sys.argv[3].split("-")) if len(sys.argv) > 3 else None
)
write_json = posthoc._write_json  # an AttributeError if it is renamed


def killing_write_json(path, obj):
  if path.name == posthoc._META and (obj["step"], obj["index"]) == kill:
    print(f"killed before {path}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  write_json(path, obj)


posthoc._write_json = killing_write_json
sigmas = (0.05, 0.10)
snaps = jepa_ema.PostHocSnapshots(directory, sigmas, every=1)
ema = snaps.ema()
params = {f"w{i}": jnp.zeros((256, 256)) for i in range(16)}
state = ema.init(params)
for step in range(steps):
  params = {k: v + 1.0 for k, v in params.items()}
  state = ema.update(params, state)
  print(f"step {step + 1} wrote {snaps.maybe_save(state)}", flush=True)
