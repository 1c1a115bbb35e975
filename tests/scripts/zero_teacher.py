"""Run by tests/test_layout.py with 8 simulated CPU devices; prints JSON.

The round-4 layout checks, for Auto and Explicit mesh axes: the ZeRO helper
``sharded_over`` (leaves that divide and leaves that do not, params already
partly sharded, a given mesh), a data-parallel teacher forward pass reading
a ZeRO-style (and a host-memory) target through ``get_target(online=)``,
eagerly and inside ``jit``, ``state_shardings`` of abstract and concrete
states, and an orbax round trip of a ZeRO-style plus host-memory state
restored in its layout.
"""

import json
import os
import sys
import tempfile

assert "xla_force_host_platform_device_count=8" in os.environ.get(
  "XLA_FLAGS", ""
), "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jepa_ema

HOST = "pinned_host"
HAS_HOST = HOST in {m.kind for m in jax.devices()[0].addressable_memories()}


def spec(x) -> list:
  """The spec of ``x`` (a sharding or an array) padded to its rank, as JSON."""
  sh = x if isinstance(x, jax.sharding.Sharding) else x.sharding
  if sh is None:
    return None
  entries = list(sh.spec)
  ndim = len(x.shape) if hasattr(x, "shape") else len(entries)
  entries += [None] * (ndim - len(entries))
  return [list(e) if isinstance(e, tuple) else e for e in entries]


def typed_spec(x) -> list:
  """The spec in ``x``'s type (inside jit), padded to its rank."""
  entries = list(jax.typeof(x).sharding.spec)
  return entries + [None] * (x.ndim - len(entries))


def bitwise(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.array_equal(
      np.atleast_1d(np.asarray(jax.device_get(x))).view(np.uint8),
      np.atleast_1d(np.asarray(jax.device_get(y))).view(np.uint8),
    )
    for x, y in zip(la, lb)
  )


def helper_checks(kind) -> dict:
  out: dict = {}
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind,) * 2)
  put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(*s)))
  rng = np.random.default_rng(0)
  rand = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {
    "w": put(rand(16, 6)),  # replicated, divides: P('data', None)
    "b": put(rand(10)),  # 10 % 4: keeps P()
    "k": put(rand(3, 8)),  # the first dimension that divides: P(None, 'data')
    "m": put(rand(8, 12), None, "model"),  # partly sharded: P('data', 'model')
    "q": put(rand(12, 8), "data", None),  # already over data: as it is
    "s": put(rand()),  # a scalar: as it is
  }
  helper = jepa_ema.sharded_over("data")
  out["specs"] = {
    k: (None if s is None else spec(s)) for k, s in helper(params).items()
  }
  ema = jepa_ema.ema(0.9, target_sharding=helper)
  plain = jepa_ema.ema(0.9)
  eager = ema.init(params)
  jitted = jax.jit(ema.init, out_shardings=ema.state_shardings(params))(params)
  out["init_eager"] = {k: spec(v) for k, v in eager.target.items()}
  out["init_jit"] = {k: spec(v) for k, v in jitted.target.items()}
  update = jax.jit(ema.update, donate_argnums=1)
  plain_update = jax.jit(plain.update)
  ref = plain.init(params)
  state = jitted
  for i in range(3):
    p = jax.tree.map(lambda x: x + 0.5 * (i + 1), params)
    state = update(p, state)
    ref = plain_update(p, ref)
  out["after_updates"] = {k: spec(v) for k, v in state.target.items()}
  out["bitwise"] = bitwise(state.target, ref.target)
  # Memory per device: a (16, 6) leaf costs 1/4 of it on each device.
  out["w_shard_shape"] = list(
    state.target["w"].addressable_shards[0].data.shape
  )
  # A mesh given explicitly, over both axes at once.
  both = jepa_ema.sharded_over(("data", "model"), mesh=mesh)
  out["specs_both"] = {
    k: (None if s is None else spec(s)) for k, s in both(params).items()
  }
  out["equal_and_hashable"] = jepa_ema.sharded_over("data") == helper and hash(
    jepa_ema.sharded_over("data")
  ) == hash(helper)
  try:
    jepa_ema.sharded_over("batch")(params)
    out["unknown_axis"] = None
  except ValueError as e:
    out["unknown_axis"] = str(e)
  # The case: 8 data-parallel devices, replicated params.
  mesh8 = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  p8 = {
    "w": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh8, P())),
    "b": jax.device_put(jnp.ones(10), NamedSharding(mesh8, P())),
  }
  s8 = jepa_ema.ema(0.9, target_sharding=jepa_ema.sharded_over("data")).init(p8)
  out["eight_bytes_per_device"] = {
    k: int(v.addressable_shards[0].data.nbytes) for k, v in s8.target.items()
  }
  return out


def teacher_checks(kind) -> dict:
  out: dict = {}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  rep = NamedSharding(mesh, P())
  params = {  # a linear layer of 32 inputs, 64 outputs, stored (out, in)
    "w": jax.device_put(jnp.arange(64 * 32.0).reshape(64, 32) / 2048, rep),
    "b": jax.device_put(jnp.ones(64), rep),
  }
  x = jax.device_put(
    jnp.linspace(-1, 1, 16 * 32).reshape(16, 32), NamedSharding(mesh, P("data"))
  )
  forward = lambda p, x: x @ p["w"].T + p["b"]
  want = np.asarray(forward(params, x))
  kinds = {"zero": None}
  if HAS_HOST:
    kinds["zero_host"] = HOST
  for name, memory in kinds.items():
    ema = jepa_ema.ema(
      0.9,
      target_sharding=jepa_ema.sharded_over("data"),
      memory_kind=memory,
      policy={"w": "average", "b": "exclude"},
    )
    state = jax.jit(ema.init, out_shardings=ema.state_shardings(params))(params)
    r: dict = {"stored": spec(state.target["w"])}
    r["stored_memory"] = state.target["w"].sharding.memory_kind
    # The stored target as it is, in the data-parallel forward pass.
    try:
      full = jepa_ema.policy.fill(state.target, params)
      jax.block_until_ready(jax.jit(forward)(full, x))
      r["raw_forward"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      r["raw_forward"] = type(e).__name__
    teacher = jepa_ema.get_target(state, online=params)
    r["eager_layout"] = spec(teacher["w"])
    r["eager_memory"] = teacher["w"].sharding.memory_kind
    r["eager_b_is_online"] = teacher["b"] is params["b"]
    r["stored_unchanged"] = spec(state.target["w"]) == r["stored"]
    r["eager_forward"] = bool(
      np.array_equal(np.asarray(jax.jit(forward)(teacher, x)), want)
    )

    @jax.jit
    def step(state, params, x):
      teacher = jepa_ema.get_target(state, online=params)
      layout = typed_spec(teacher["w"]) if kind == AxisType.Explicit else None
      return forward(teacher, x), layout

    y, layout = step(state, params, x)
    r["jit_forward"] = bool(np.array_equal(np.asarray(y), want))
    # On Auto axes XLA picks the layout, and may sum the contraction in
    # another order: the same values to rounding.
    r["jit_forward_max_rel"] = float(
      np.max(np.abs(np.asarray(y) - want)) / np.max(np.abs(want))
    )
    r["jit_out"] = spec(y)

    def typed(state, params):
      teacher = jepa_ema.get_target(state, online=params)
      return str(jax.typeof(teacher["w"]).sharding.spec), str(
        getattr(jax.typeof(teacher["w"]), "memory_space", None)
      )

    if kind == AxisType.Explicit:
      # The layout and memory the teacher has inside jit, read at trace time.
      seen: list = []
      jax.jit(lambda s, p: seen.append(typed(s, p)) or 0)(state, params)
      r["jit_typed"] = list(seen[0])
    out[name] = r
  return out


def state_shardings_checks(kind) -> dict:
  out: dict = {}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  rep = NamedSharding(mesh, P())
  params = {"w": jax.device_put(jnp.ones((16, 4)), rep)}
  ema = jepa_ema.ema(0.9, target_sharding=NamedSharding(mesh, P("data")))
  abstract = jax.eval_shape(ema.init, params)
  got = jepa_ema.state_shardings(params, abstract)
  known = ema.state_shardings(params)
  out["abstract_spec"] = spec(got.target["w"])
  out["abstract_is_concrete_mesh"] = isinstance(
    got.target["w"].mesh, jax.sharding.Mesh
  )
  out["method_spec"] = spec(known.target["w"])
  out["keywords_spec"] = spec(
    jepa_ema.state_shardings(
      params, abstract, target_sharding=NamedSharding(mesh, P("data"))
    ).target["w"]
  )
  state = jax.jit(ema.init, out_shardings=known)(params)
  concrete = jepa_ema.state_shardings(params, state)
  out["concrete_spec"] = spec(concrete.target["w"])
  out["concrete_step_is_its_own"] = concrete.step == state.step.sharding
  return out


def checkpoint_checks(kind) -> dict:
  import orbax.checkpoint as ocp

  out: dict = {}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  rep = NamedSharding(mesh, P())
  params = {
    "w": jax.device_put(jnp.arange(64 * 4.0).reshape(64, 4), rep),
    "b": jax.device_put(jnp.ones(10), rep),
  }
  ema = jepa_ema.ema(
    (0.99, jepa_ema.power_momentum(sigma_rel=0.1)),
    target_sharding=jepa_ema.sharded_over("data"),
    memory_kind=(None, HOST),
  )
  shardings = ema.state_shardings(params)
  state = jax.jit(ema.init, out_shardings=shardings)(params)
  update = jax.jit(ema.update, donate_argnums=1)
  for i in range(3):
    state = update(jax.tree.map(lambda x: x * (i + 2), params), state)
  path = tempfile.mkdtemp() + "/ema"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(ema.init, params),
      shardings,
    )
    restored = ckptr.restore(path, abstract)
  out["bitwise"] = bitwise(restored, state)
  out["layout"] = [
    [
      spec(s.target["w"]),
      s.target["w"].sharding.memory_kind,
      spec(s.target["b"]),
    ]
    for s in restored
  ]
  out["same_shardings"] = [
    a.sharding.is_equivalent_to(b.sharding, a.ndim)
    and a.sharding.memory_kind == b.sharding.memory_kind
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state))
  ]
  # And it keeps training in place from there.
  again = update(params, restored)
  out["updates_after_restore"] = [
    s.target["w"].sharding.memory_kind for s in again
  ]
  return out


def main() -> None:
  out: dict = {"devices": jax.device_count(), "host_memory": HAS_HOST}
  for name, kind in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
    out[name] = {
      "helper": helper_checks(kind),
      "teacher": teacher_checks(kind),
      "state_shardings": state_shardings_checks(kind),
    }
    if HAS_HOST:
      out[name]["checkpoint"] = checkpoint_checks(kind)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
