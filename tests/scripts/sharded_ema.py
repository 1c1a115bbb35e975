"""Run by tests/test_sharding.py with 8 simulated CPU devices; prints JSON."""

import json
import os
import re
import warnings

assert "xla_force_host_platform_device_count=8" in os.environ.get(
  "XLA_FLAGS", ""
), "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jepa_ema

COLLECTIVES = re.compile(
  r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
  r"(-start)?\("
)


def collectives(compiled) -> list[str]:
  """The kind of every collective instruction of ``compiled``, sorted: one
  entry per instruction, so the list's length is their count."""
  return sorted(m.group(1) for m in COLLECTIVES.finditer(compiled.as_text()))


def scalar_collectives(compiled) -> bool:
  """Whether every collective instruction of ``compiled`` moves scalars only
  (its result type, possibly a tuple, has no dimensions)."""
  types = re.findall(
    r"= (\S.*?) " + COLLECTIVES.pattern, compiled.as_text(), re.MULTILINE
  )
  return all(not any(re.findall(r"\[([^\]]+)\]", t[0])) for t in types)


def same(a, b) -> bool:
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


import sys

AXES = sys.argv[1] if len(sys.argv) > 1 else "auto"
mesh = jax.make_mesh(
  (4, 2),
  ("data", "model"),
  axis_types=(
    (AxisType.Auto,) * 2 if AXES == "auto" else (AxisType.Explicit,) * 2
  ),
)
specs = {
  "qkv": P("data", "model"),
  "proj": P("model", "data"),
  "bias": P("model"),
  "norm": P(),
  "emb": P(None, "data"),
}
shapes = {
  "qkv": (64, 32),
  "proj": (32, 64),
  "bias": (32,),
  "norm": (16,),
  "emb": (8, 64),
}
params = {
  k: jax.device_put(
    jax.random.normal(jax.random.key(i), shapes[k]),
    NamedSharding(mesh, specs[k]),
  )
  for i, k in enumerate(shapes)
}
online = jax.tree.map(lambda x: x + 1.0, params)
out = {"devices": len(jax.devices())}

ema = jepa_ema.ema(jepa_ema.cosine_momentum(total_steps=100))
# init, eagerly and under jit (no out_shardings): the target is placed like
# the params.
s_eager = ema.init(params)
s_jit = jax.jit(ema.init)(params)
out["init_eager_keeps"] = all(
  same(s_eager.target[k], params[k]) for k in params
)
out["init_jit_keeps"] = all(same(s_jit.target[k], params[k]) for k in params)
shardings = jepa_ema.state_shardings(params)
s_out = jax.jit(ema.init, out_shardings=shardings)(params)
out["init_out_shardings_keeps"] = all(
  same(s_out.target[k], params[k]) for k in params
)
out["state_shardings_match"] = (
  all(shardings.target[k] == params[k].sharding for k in params)
  and shardings.step.spec == P()
)

# update: shardings kept, no collectives in the compiled program.
update = ema.jit()
compiled = jax.jit(ema.update, donate_argnums=1).lower(online, s_jit).compile()
out["update_collectives"] = collectives(compiled)
new = update(online, s_jit)
out["update_keeps"] = all(same(new.target[k], params[k]) for k in params)
out["update_values_ok"] = bool(
  all(
    jnp.allclose(
      new.target[k], 0.996 * params[k] + 0.004 * online[k], atol=1e-6
    )
    for k in params
  )
)
fn = jepa_ema.make_ema_update(0.9)
out["make_ema_update_collectives"] = collectives(
  fn.lower(dict(params), online, 0).compile()
)
t2 = fn(jax.tree.map(jnp.copy, params), online, 0)
out["make_ema_update_keeps"] = all(same(t2[k], params[k]) for k in params)

# skip_nonfinite needs a scalar reduction over all devices (the NaN check).
skipper = jepa_ema.ema(0.9, skip_nonfinite=True)
s_skip = skipper.init(params)
c_skip = jax.jit(skipper.update).lower(online, s_skip).compile()
out["skip_nonfinite_collectives"] = collectives(c_skip)
out["skip_nonfinite_scalar"] = scalar_collectives(c_skip)
out["sharded_leaves"] = sum(any(e is not None for e in specs[k]) for k in specs)
# ... and it sees a NaN or an Inf in any leaf, on whichever device holds it.
skip_update = jax.jit(skipper.update)
s_good = skip_update(online, s_skip)
skips_ok = int(s_good.skipped) == 0 and all(
  jnp.allclose(s_good.target[k], 0.9 * params[k] + 0.1 * online[k], atol=1e-6)
  for k in params
)
for i, k in enumerate(params):
  value = jax.device_get(online[k]).copy()
  value.reshape(-1)[-1] = (np.nan, np.inf)[i % 2]
  bad = {**online, k: jax.device_put(value, online[k].sharding)}
  s_bad = skip_update(bad, s_skip)
  skips_ok &= int(s_bad.skipped) == 1 and all(
    bool(jnp.array_equal(s_bad.target[j], s_skip.target[j])) for j in params
  )
out["skip_nonfinite_values_ok"] = bool(skips_ok)

# The options of ema(): every=k, several momenta, drift, stochastic bf16.
bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
bf16_online = jax.tree.map(lambda x: x.astype(jnp.bfloat16), online)
OPTIONS = {
  "every": (
    jepa_ema.ema(jepa_ema.cosine_momentum(total_steps=50), every=4),
    params,
    online,
  ),
  "several": (jepa_ema.ema((0.9, 0.99, 0.999)), params, online),
  "drift": (jepa_ema.ema(0.9, drift=True), params, online),
  "stochastic": (
    jepa_ema.ema(0.999, rounding="stochastic", key=7),
    bf16_params,
    bf16_online,
  ),
  "all": (
    jepa_ema.ema(
      (0.9, 0.99),
      every=2,
      drift=True,
      dtype=jnp.bfloat16,
      rounding="stochastic",
    ),
    params,
    online,
  ),
}
for name, (opt_ema, p0, o0) in OPTIONS.items():
  # The documented way: the state's structure from eval_shape, its
  # shardings from the params', used as out_shardings of a jitted init.
  shard = jepa_ema.state_shardings(p0, jax.eval_shape(opt_ema.init, p0))
  s0 = jax.jit(opt_ema.init, out_shardings=shard)(p0)
  states = (s0,) if isinstance(s0, jepa_ema.EmaState) else s0
  out[f"{name}_state_shardings_match"] = all(
    sh.target[k] == p0[k].sharding
    for sh in ((shard,) if isinstance(shard, jepa_ema.EmaState) else shard)
    for k in p0
  )
  upd = jax.jit(opt_ema.update, donate_argnums=1)
  c_opt = upd.lower(o0, s0).compile()
  out[f"{name}_collectives"] = collectives(c_opt)
  out[f"{name}_scalar"] = scalar_collectives(c_opt)
  s1 = s0
  for _ in range(4):
    s1 = upd(o0, s1)
  s1s = (s1,) if isinstance(s1, jepa_ema.EmaState) else s1
  out[f"{name}_keeps"] = all(
    same(st.target[k], p0[k]) for st in s1s for k in p0
  )
  if name not in ("stochastic", "all"):
    continue
  # The same computation on one device gives the same bits (the rounding
  # noise depends on the element position, not on the layout).
  one = jax.devices()[0]
  p1 = jax.device_put(jax.device_get(p0), one)
  o1 = jax.device_put(jax.device_get(o0), one)
  r = jax.jit(opt_ema.init)(p1)
  for _ in range(4):
    r = jax.jit(opt_ema.update)(o1, r)
  # (drift: float sums, reduced in another order: equal to rounding)
  no_drift = lambda t: jax.tree.map(
    lambda st: st._replace(drift=None),
    t,
    is_leaf=lambda x: isinstance(x, jepa_ema.EmaState),
  )
  out[f"{name}_equals_single_device"] = all(
    bool(jnp.array_equal(jax.device_get(a), jax.device_get(b)))
    for a, b in zip(jax.tree.leaves(no_drift(s1)), jax.tree.leaves(no_drift(r)))
  ) and all(
    bool(jnp.allclose(jax.device_get(a), jax.device_get(b), rtol=1e-5))
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(r))
  )

# track_ema in an optax chain, whole train step.
tx = optax.chain(optax.adam(1e-3), jepa_ema.track_ema(0.99))
opt_state = tx.init(params)


def train(params, opt_state):
  grads = jax.tree.map(lambda p: 2.0 * p, params)  # elementwise "gradient"
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


tstep = jax.jit(train, donate_argnums=(0, 1))
out["track_ema_collectives"] = collectives(
  tstep.lower(params, opt_state).compile()
)
p2, o2 = tstep(jax.tree.map(jnp.copy, params), opt_state)
target = jepa_ema.get_target(o2)
out["track_ema_keeps"] = all(same(target[k], params[k]) for k in params)

# A mismatch: the same values laid out differently.
other_specs = {
  "qkv": P("model", "data"),
  "proj": P("data", "model"),
  "bias": P("data"),
  "norm": P("data"),
  "emb": P("data", None),
}
other = {
  k: jax.device_put(v, NamedSharding(mesh, other_specs[k]))
  for k, v in online.items()
}
if AXES == "auto":
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jepa_ema.ema_update(params, other, 0, 0.9)
    fn2 = jepa_ema.make_ema_update(0.9, donate=False)
    fn2(params, other, 0)
  out["mismatch_warnings"] = [
    str(w.message)
    for w in caught
    if issubclass(w.category, jepa_ema.ShardingMismatchWarning)
  ]
  out["mismatch_collectives"] = collectives(
    fn2.lower(params, other, 0).compile()
  )
else:  # explicit axes: a clear error, eagerly and under jit
  errors = []
  for call in (
    lambda: jepa_ema.ema_update(params, other, 0, 0.9),
    lambda: jax.jit(ema.update)(other, s_jit),
    lambda: jepa_ema.make_ema_update(0.9)(dict(params), other, 0),
  ):
    try:
      call()
      errors.append(None)
    except ValueError as e:
      errors.append(str(e))
  out["mismatch_errors"] = errors
fn2 = jepa_ema.make_ema_update(0.9, donate=False)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  jepa_ema.ema_update(params, online, 0, 0.9)
  for _ in range(3):
    fn2(params, online, 0)
out["matched_warnings"] = [str(w.message) for w in caught]
print("RESULT " + json.dumps(out))
