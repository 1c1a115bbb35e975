"""The layouts the policy x target_sharding pins of tests/test_combinations.py
check, on 8 simulated devices with Auto and Explicit axes (run by the
``on_eight_devices`` fixture; prints one ``RESULT`` JSON line)."""

import json

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jepa_ema

out = {}
for axes in ("auto", "explicit"):
  kind = AxisType.Auto if axes == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind,) * 2)
  rep = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  raw = {k: rng.normal(size=(8, 4)).astype(np.float32) for k in "abcd"}
  params = jax.tree.map(lambda x: jax.device_put(x, rep), raw)
  specs = {
    "a": P("data"),
    "b": P(None, "model"),
    "c": P("data", "model"),
    "d": P("model"),
  }
  ts = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  r = out[axes] = {}
  for name, policy in {
    "exclude_first": {
      "a": "exclude",
      "b": "average",
      "c": "copy",
      "d": "average",
    },
    "exclude_middle": {
      "a": "average",
      "b": "exclude",
      "c": "keep",
      "d": "average",
    },
  }.items():
    plain = jepa_ema.ema(0.9, policy=policy)
    e = jepa_ema.ema(0.9, policy=policy, target_sharding=ts)
    kept = [k for k in "abcd" if policy[k] != "exclude"]

    def norm(spec, ndim=2):
      return [str(x) for x in list(spec) + [None] * (ndim - len(spec))]

    def specs_of(state):
      return {k: norm(state.target[k].sharding.spec) for k in kept}

    want = {k: norm(specs[k]) for k in kept}
    states = {"eager": e.init(params), "jit": jax.jit(e.init)(params)}
    s = states["jit"]
    p = params
    ref = plain.init(params)
    for _ in range(3):
      p = jax.tree.map(lambda x: x * 1.5 + 0.25, p)
      s = jax.jit(e.update, donate_argnums=1)(p, s)
      ref = jax.jit(plain.update)(p, ref)
    states["update"] = s
    r[name] = {
      "specs": {k: specs_of(v) == want for k, v in states.items()},
      "got": {k: specs_of(v) for k, v in states.items()},
      "want": want,
      "excluded_none": all(
        v.target[k] is None
        for v in states.values()
        for k in "abcd"
        if k not in kept
      ),
      "bitwise": all(
        np.array_equal(np.asarray(s.target[k]), np.asarray(ref.target[k]))
        for k in kept
      ),
      "state_shardings": {
        k: norm(sh.spec)
        for k, sh in e.state_shardings(params).target.items()
        if sh is not None
      }
      == want,
    }
    teacher = jepa_ema.get_target(s, online=p)
    r[name]["get_target_layout"] = all(
      teacher[k].sharding.is_equivalent_to(p[k].sharding, 2) for k in "abcd"
    )
    r[name]["get_target_values"] = all(
      np.array_equal(
        np.asarray(teacher[k]), np.asarray(s.target[k] if k in kept else p[k])
      )
      for k in "abcd"
    )
print("RESULT " + json.dumps(out))
