"""Writes post-hoc snapshots in a loop until killed (tests/test_posthoc.py)."""

import sys

import jax.numpy as jnp

import jepa_ema

directory = sys.argv[1]
sigmas = (0.05, 0.10)
ema = jepa_ema.ema(tuple(jepa_ema.power_momentum(sigma_rel=s) for s in sigmas))
snaps = jepa_ema.PostHocSnapshots(directory, sigmas, every=1)
params = {f"w{i}": jnp.zeros((256, 256)) for i in range(16)}
state = ema.init(params)
for step in range(10_000):
  params = {k: v + 1.0 for k, v in params.items()}
  state = ema.update(params, state)
  snaps.maybe_save(state)
  print(f"saved {step + 1}", flush=True)
