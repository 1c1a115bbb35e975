"""Run with 8 simulated devices: posthoc_reconstruct keeps each leaf's
sharding and needs no communication. Prints RESULT {json}."""

import json

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jepa_ema

mesh = jax.make_mesh((4, 2), ("data", "model"))
specs = {"w": P("data", "model"), "b": P("model"), "r": P()}
shardings = {k: NamedSharding(mesh, v) for k, v in specs.items()}
rng = np.random.default_rng(0)


def snapshot(seed):
  r = np.random.default_rng(seed)
  tree = {
    "w": r.normal(size=(16, 8)).astype(np.float32),
    "b": r.normal(size=(8,)).astype(np.float32),
    "r": r.normal(size=(3,)).astype(np.float32),
  }
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


snaps = [
  (s, sig, snapshot(i))
  for i, (s, sig) in enumerate(
    [(50, 0.05), (100, 0.05), (50, 0.10), (100, 0.10)]
  )
]
out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07)
x = jepa_ema.posthoc_coefficients(
  [s for s, _, _ in snaps], [r for _, r, _ in snaps], sigma_rel=0.07
)
want = {
  k: sum(
    float(w) * np.asarray(t[k], np.float64) for w, (_, _, t) in zip(x, snaps)
  )
  for k in specs
}
hlo = (
  jax.jit(lambda a, b: jax.tree.map(lambda u, v: u + 0.5 * v, a, b))
  .lower(snaps[0][2], snaps[1][2])
  .compile()
  .as_text()
)
print(
  "RESULT "
  + json.dumps(
    {
      "devices": jax.device_count(),
      "keeps": all(
        out[k].sharding.is_equivalent_to(shardings[k], out[k].ndim)
        for k in specs
      ),
      "values_ok": all(
        np.allclose(np.asarray(out[k]), want[k], atol=1e-5) for k in specs
      ),
      "collectives": [
        c
        for c in (
          "all-reduce",
          "all-gather",
          "all-to-all",
          "collective-permute",
        )
        if c in hlo
      ],
    }
  )
)
