"""Run with 8 simulated devices: posthoc_reconstruct keeps each leaf's
sharding and needs no communication. Prints RESULT {json}.

The communication check reads what ``posthoc_reconstruct`` itself compiles:
XLA dumps every program it compiles (after SPMD partitioning, where the
collectives appear) to a fresh directory, and the programs dumped during the
call are the ones the reconstruction ran.
"""

import json
import os
import pathlib
import re
import shutil
import tempfile

DUMP = pathlib.Path(tempfile.mkdtemp(prefix="sharded_posthoc_hlo_"))
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
)

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jepa_ema

# A cache hit would skip the compilation, and with it the dump.
jax.config.update("jax_enable_compilation_cache", False)

COLLECTIVES = re.compile(
  r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
  r"(-start)?\("
)


def compiled_programs() -> set[pathlib.Path]:
  return set(DUMP.glob("*after_optimizations.txt"))


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
x = jepa_ema.posthoc_coefficients(
  [s for s, _, _ in snaps], [r for _, r, _ in snaps], sigma_rel=0.07
)
jax.block_until_ready(snaps)
before = compiled_programs()
out = jax.block_until_ready(jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07))
programs = sorted(compiled_programs() - before)
want = {
  k: sum(
    float(w) * np.asarray(t[k], np.float64) for w, (_, _, t) in zip(x, snaps)
  )
  for k in specs
}
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
      # The names of the programs the call compiled, and the number of
      # collective instructions in them (all programs together).
      "programs": [p.name for p in programs],
      "collectives": sum(
        len(COLLECTIVES.findall(p.read_text())) for p in programs
      ),
    }
  )
)
shutil.rmtree(DUMP)
