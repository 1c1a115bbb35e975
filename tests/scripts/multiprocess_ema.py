"""One of 2 processes x 4 CPU devices under jax.distributed (run by
tests/test_multiprocess.py). Usage: multiprocess_ema.py PROCESS_ID PORT."""

import json
import re
import sys

import jax

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
  coordinator_address=f"127.0.0.1:{port}",
  num_processes=2,
  process_id=process_id,
  initialization_timeout=60,
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import jepa_ema  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()
assert len(jax.local_devices()) == 4
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
shapes = {"w": (64, 16), "b": (32,), "v": (8, 8, 4)}
specs = {"w": P("data", None), "b": P("data"), "v": P(None, "data", None)}


def full(seed, shape):  # the same global values in every process
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def global_tree(seed):
  out = {}
  for i, (k, shape) in enumerate(shapes.items()):
    values = full(seed * 10 + i, shape)
    out[k] = jax.make_array_from_callback(
      shape, NamedSharding(mesh, specs[k]), lambda idx, v=values: v[idx]
    )
  return out


params, online = global_tree(0), global_tree(1)
ema = jepa_ema.ema(jepa_ema.cosine_momentum(0.9, 1.0, total_steps=10))
state = jax.jit(ema.init, out_shardings=jepa_ema.state_shardings(params))(
  params
)
update = jax.jit(ema.update, donate_argnums=1)
hlo = update.lower(online, state).compile().as_text()
collectives = sorted(
  set(
    re.findall(
      r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
      r"(?:-start)?\(",
      hlo,
    )
  )
)
for _ in range(3):
  state = update(online, state)

# The same three jitted steps on one device of this process, unsharded.
ref_update = jax.jit(ema.update)
ref_state = ema.init(
  {k: jnp.asarray(full(i, s)) for i, (k, s) in enumerate(shapes.items())}
)
ref_online = {
  k: jnp.asarray(full(10 + i, s)) for i, (k, s) in enumerate(shapes.items())
}
for _ in range(3):
  ref_state = ref_update(ref_online, ref_state)

identical, max_err, kept = True, 0.0, True
for k in shapes:
  arr = state.target[k]
  kept &= arr.sharding.is_equivalent_to(params[k].sharding, arr.ndim)
  ref = np.asarray(ref_state.target[k])
  for shard in arr.addressable_shards:  # only this process's data
    got = np.asarray(shard.data)
    identical &= bool(np.array_equal(got, ref[shard.index]))
    max_err = max(max_err, float(np.max(np.abs(got - ref[shard.index]))))
print(
  "RESULT "
  + json.dumps(
    {
      "process": process_id,
      "collectives": collectives,
      "identical": identical,
      "max_err": max_err,
      "shardings_kept": bool(kept),
      "step": int(np.asarray(state.step.addressable_shards[0].data)),
      "local_shards": sum(
        len(state.target[k].addressable_shards) for k in shapes
      ),
    }
  )
)
jax.distributed.shutdown()
