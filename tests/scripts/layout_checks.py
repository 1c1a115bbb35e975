"""Run by tests/test_layout.py with 8 simulated CPU devices; prints JSON.

Every check of ``target_sharding=`` and ``memory_kind=`` that needs several
devices or host memory, in one process (the device count is fixed when jax
starts, and an offload error can abort the process instead of raising):
layouts and memory kinds after init (eager, jit, jit with out_shardings)
and after jitted donated updates, values bitwise those of the same EMA
without the option, and the collectives of the library's own compiled
updates, read from their HLO. Both kinds of mesh axes: Auto and Explicit.
"""

import json
import os
import re
import tempfile
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
HOST = "pinned_host"


def collectives(compiled) -> list[str]:
  """The kind of every collective instruction of ``compiled``, sorted."""
  return sorted(m.group(1) for m in COLLECTIVES.finditer(compiled.as_text()))


def bits(x) -> np.ndarray:
  a = np.atleast_1d(np.asarray(jax.device_get(x)))
  return a.view(np.uint8)


def bitwise(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(jax.device_get(x)).dtype == np.asarray(jax.device_get(y)).dtype
    and np.array_equal(bits(x), bits(y))
    for x, y in zip(la, lb)
  )


def layout(tree) -> list:
  """``[spec entries, memory kind]`` of every array leaf, in leaf order."""
  out = []
  for x in jax.tree.leaves(tree):
    s = x.sharding
    spec = list(s.spec) + [None] * (x.ndim - len(s.spec))
    out.append([[str(e) for e in spec], s.memory_kind])
  return out


def want(tree, spec_of, kind="device") -> list:
  return [
    [
      [str(e) for e in list(spec_of(x)) + [None] * (x.ndim - len(spec_of(x)))],
      kind,
    ]
    for x in jax.tree.leaves(tree)
  ]


def run_steps(update, params_seq, state):
  for p in params_seq:
    state = update(p, state)
  return state


out: dict = {"devices": len(jax.devices())}
out["memories"] = sorted(
  m.kind for m in jax.devices()[0].addressable_memories()
)

for axes in ("auto", "explicit"):
  kind_ = AxisType.Auto if axes == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind_,) * 2)
  rep = NamedSharding(mesh, P())
  by_data = NamedSharding(mesh, P("data"))
  r: dict = {}
  out[axes] = r

  def put(tree, spec):
    return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree
    )

  rng = np.random.default_rng(0)
  raw = {
    "enc": {
      "w": rng.normal(size=(16, 8)).astype(np.float32),
      "b": rng.normal(size=(8,)).astype(np.float32),
    },
    "head": rng.normal(size=(8, 4)).astype(np.float32),
  }
  params = put(raw, P())  # data parallel: replicated
  seq = [
    jax.tree.map(lambda x, i=i: x * (1.0 + 0.1 * i) + 0.01 * i, params)
    for i in range(1, 5)
  ]

  # ---------------------------------------------- ZeRO-style: target/8
  forms = {
    "sharding": by_data,
    "prefix": {"enc": by_data, "head": NamedSharding(mesh, P(None, "model"))},
    "callable": lambda p: jax.tree.map(lambda _: by_data, p),
  }
  spec_of = {
    "sharding": lambda x: P("data"),
    "prefix": None,
    "callable": lambda x: P("data"),
  }
  ref = jepa_ema.ema(jepa_ema.cosine_momentum(0.9, 1.0, total_steps=10))
  ref_state = run_steps(jax.jit(ref.update), seq, ref.init(params))
  for name, ts in forms.items():
    e = jepa_ema.ema(
      jepa_ema.cosine_momentum(0.9, 1.0, total_steps=10), target_sharding=ts
    )
    expected = (
      [  # leaf order: enc.b, enc.w, head
        [["data"], "device"],
        [["data", "None"], "device"],
        [["None", "model"], "device"],
      ]
      if name == "prefix"
      else want(params, spec_of[name])
    )
    s_eager = e.init(params)
    s_jit = jax.jit(e.init)(params)
    sh = e.state_shardings(params)
    s_out = jax.jit(e.init, out_shardings=sh)(params)
    sh2 = jepa_ema.state_shardings(
      params, jax.eval_shape(e.init, params), target_sharding=ts
    )
    r[f"zero_{name}_init"] = [
      layout(s_eager.target) == expected,
      layout(s_jit.target) == expected,
      layout(s_out.target) == expected,
    ]
    r[f"zero_{name}_state_shardings"] = [
      jax.tree.leaves(sh.target) == jax.tree.leaves(sh2.target),
      layout(s_eager.target) == layout(s_out.target),
      jepa_ema.state_shardings(params, s_eager).target
      == jax.tree.map(lambda x: x.sharding, s_eager.target),
    ]
    upd = jax.jit(e.update, donate_argnums=1)
    r[f"zero_{name}_collectives"] = collectives(
      upd.lower(seq[0], s_out).compile()
    )
    s = run_steps(upd, seq, s_out)
    r[f"zero_{name}_keeps"] = layout(s.target) == expected
    r[f"zero_{name}_bitwise"] = bitwise(s, ref_state)
    per_device = sum(
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(s.target)
    )
    full = sum(x.nbytes for x in jax.tree.leaves(s.target))
    r[f"zero_{name}_bytes_per_device"] = [per_device, full]
  # Eagerly, too (ema.update outside jit), against the eager reference.
  e = jepa_ema.ema(
    jepa_ema.cosine_momentum(0.9, 1.0, total_steps=10), target_sharding=by_data
  )
  s = run_steps(e.update, seq, e.init(params))
  r["zero_eager_bitwise"] = bitwise(
    s, run_steps(ref.update, seq, ref.init(params))
  )
  r["zero_eager_keeps"] = layout(s.target) == want(params, lambda x: P("data"))

  # The new target read whole in the same jitted step (a teacher reading it
  # replicated): on Auto axes only the update's own constraint keeps the
  # returned target in its layout (without it XLA replicates it).
  e = jepa_ema.ema(0.9, target_sharding=by_data)
  s0 = jax.jit(e.init, out_shardings=e.state_shardings(params))(params)

  def read_whole(t):
    if axes == "auto":
      return jax.lax.with_sharding_constraint(t, rep)
    return jax.sharding.reshard(t, rep)

  def step_reading(p, s, e=e):
    s = e.update(p, s)
    return s, jax.tree.map(lambda t: read_whole(t) * 2.0, s.target)

  s1, _ = jax.jit(step_reading, donate_argnums=1)(seq[0], s0)
  r["zero_read_whole_keeps"] = layout(s1.target) == want(
    params, lambda x: P("data")
  )

  # Params sharded over "model", target over both axes: still inside.
  params_m = {
    "enc": {
      "w": put(raw["enc"]["w"], P(None, "model")),
      "b": put(raw["enc"]["b"], P("model")),
    },
    "head": put(raw["head"], P(None, "model")),
  }
  both = {
    "enc": {
      "w": NamedSharding(mesh, P("data", "model")),
      "b": NamedSharding(mesh, P(("model", "data"))),
    },
    "head": NamedSharding(mesh, P("data", "model")),
  }
  e = jepa_ema.ema(0.9, target_sharding=both)
  s0 = jax.jit(e.init, out_shardings=e.state_shardings(params_m))(params_m)
  upd = jax.jit(e.update, donate_argnums=1)
  on_m = jax.tree.map(lambda x: x * 2.0, params_m)
  r["finer_collectives"] = collectives(upd.lower(on_m, s0).compile())
  ref_m = jepa_ema.ema(0.9)
  r["finer_bitwise"] = bitwise(
    upd(on_m, s0), jax.jit(ref_m.update)(on_m, ref_m.init(params_m))
  )

  # Coarser: sharded params, replicated target: an all-gather per leaf.
  params_s = {
    "enc": {
      "w": put(raw["enc"]["w"], P("data", "model")),
      "b": put(raw["enc"]["b"], P("model")),
    },
    "head": put(raw["head"], P("data")),
  }
  e = jepa_ema.ema(0.9, target_sharding=rep)
  s0 = jax.jit(e.init, out_shardings=e.state_shardings(params_s))(params_s)
  upd = jax.jit(e.update, donate_argnums=1)
  on_s = jax.tree.map(lambda x: x * 2.0, params_s)
  r["coarser_collectives"] = collectives(upd.lower(on_s, s0).compile())
  s1 = upd(on_s, s0)
  r["coarser_keeps"] = layout(s1.target) == want(params, lambda x: P())
  r["coarser_bitwise"] = bitwise(
    s1, jax.jit(ref_m.update)(on_s, ref_m.init(params_s))
  )

  # ------------------------------------ policy, track_ema, every option
  policy = {"enc": {"w": "average", "b": "copy"}, "head": "exclude"}
  opts = dict(
    every=2,
    drift=True,
    skip_nonfinite=True,
    dtype=jnp.bfloat16,
    rounding="stochastic",
    key=3,
    policy=policy,
  )
  m2 = (0.9, jepa_ema.power_momentum(sigma_rel=0.1))
  ref = jepa_ema.ema(m2, **opts)
  ref_states = run_steps(jax.jit(ref.update), seq, ref.init(params))
  no_drift = lambda t: jax.tree.map(
    lambda st: st._replace(drift=None),
    t,
    is_leaf=lambda x: isinstance(x, jepa_ema.EmaState),
  )
  for name, kw in {
    "options_zero": dict(target_sharding=by_data),
    "options_host": dict(memory_kind=(None, HOST)),
    "options_both": dict(target_sharding=by_data, memory_kind=HOST),
  }.items():
    e = jepa_ema.ema(m2, **opts, **kw)
    sh = e.state_shardings(params)
    s = jax.jit(e.init, out_shardings=sh)(params)
    init_layout = [layout(st.target) for st in s]
    upd = jax.jit(e.update, donate_argnums=1)
    r[f"{name}_collectives"] = sorted(
      set(collectives(upd.lower(seq[0], s).compile()))
    )
    layouts = [init_layout]
    for p in seq:
      s = upd(p, s)
      layouts.append([layout(st.target) for st in s])
    kinds = kw.get("memory_kind", None)
    kinds = kinds if isinstance(kinds, tuple) else (kinds, kinds)
    spec = P("data") if "target_sharding" in kw else P()
    stored = {"enc": params["enc"]}  # "head" is excluded: None in the target
    expected = [want(stored, lambda x: spec, k or "device") for k in kinds]
    r[f"{name}_layouts_ok"] = all(lay == expected for lay in layouts)
    r[f"{name}_excluded_is_none"] = all(st.target["head"] is None for st in s)
    # drift: float sums over differently laid out slices, reduced in another
    # order: equal to rounding; everything else bitwise.
    r[f"{name}_bitwise"] = bitwise(no_drift(s), no_drift(ref_states))
    r[f"{name}_drift_close"] = all(
      np.allclose(jax.device_get(a), jax.device_get(b), rtol=1e-5)
      for a, b in zip(
        jax.tree.leaves([st.drift for st in s]),
        jax.tree.leaves([st.drift for st in ref_states]),
      )
    )

  # track_ema in an optax chain: the whole train step.
  def chain(**kw):
    return optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.99, **kw))

  def train(tx):
    def step(params, opt_state):
      grads = jax.tree.map(lambda p: 2.0 * p, params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))

  tx_ref = chain()
  p_ref, o_ref = jax.tree.map(jnp.copy, params), tx_ref.init(params)
  for _ in range(3):
    p_ref, o_ref = train(tx_ref)(p_ref, o_ref)
  for name, kw in {
    "track_zero": dict(target_sharding=by_data),
    "track_host": dict(memory_kind=HOST),
  }.items():
    tx = chain(**kw)
    p, o = jax.tree.map(jnp.copy, params), jax.jit(tx.init)(params)
    step = train(tx)
    r[f"{name}_collectives"] = collectives(step.lower(p, o).compile())
    for _ in range(3):
      p, o = step(p, o)
    t = jepa_ema.get_target(o)
    spec = P("data") if "target_sharding" in kw else P()
    r[f"{name}_keeps"] = layout(t) == want(
      params, lambda x: spec, kw.get("memory_kind", "device")
    )
    r[f"{name}_bitwise"] = bitwise(t, jepa_ema.get_target(o_ref)) and bitwise(
      p, p_ref
    )

  # -------------------------------------------------- bad target shardings
  errors = {}
  few = jax.make_mesh(
    (4,), ("data",), axis_types=(kind_,), devices=jax.devices()[:4]
  )
  for name, ts, p in [
    ("no_such_key", {"enc": by_data, "tail": by_data}, params),
    (
      "not_divisible",
      by_data,
      {**params, "odd": put(np.ones(6, np.float32), P())},
    ),
    ("too_many_dims", NamedSharding(mesh, P("data", None, None)), params),
    ("other_devices", NamedSharding(few, P("data")), params),
    ("memory_kind_in_sharding", by_data.with_memory_kind(HOST), params),
  ]:
    try:
      jepa_ema.ema(0.9, target_sharding=ts).init(p)
      errors[name] = None
    except (ValueError, TypeError) as e:
      errors[name] = f"{type(e).__name__}: {e}"
  r["errors"] = errors

# ------------------------------------------- memory kinds (one device too)
one = jax.devices()[0]
single = {
  "w": jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4), one),
  "n": jax.device_put(np.int32(3), one),  # non-floating: taken from online
  "k": jax.device_put(np.arange(4, dtype=np.int32), one),
}
steps = [
  {
    "w": single["w"] * (1.0 + 0.5 * i),
    "n": jnp.int32(3 + i),
    "k": single["k"] + i,
  }
  for i in range(1, 7)
]
host: dict = {}
out["host"] = host
for name, (momenta, kw) in {
  "every1": (0.9, dict()),
  "every3": (0.9, dict(every=3)),
  "several": ((0.9, 0.99, 0.999), dict(memory_kind=(HOST, None, HOST))),
  "several_every2": ((0.9, 0.99), dict(every=2)),
}.items():
  kinds = kw.pop("memory_kind", HOST)
  e = jepa_ema.ema(momenta, memory_kind=kinds, **kw)
  ref = jepa_ema.ema(momenta, **kw)
  n = len(momenta) if isinstance(momenta, tuple) else 1
  kinds = kinds if isinstance(kinds, tuple) else (kinds,) * n
  as_tuple = lambda s: (s,) if isinstance(s, jepa_ema.EmaState) else s
  ok_kinds = lambda s: all(
    x.sharding.memory_kind == (k or "device")
    for st, k in zip(as_tuple(s), kinds)
    for x in jax.tree.leaves(st.target)
  )
  s_eager = e.init(single)
  s_jit = jax.jit(e.init)(single)
  s = jax.jit(e.init, out_shardings=e.state_shardings(single))(single)
  checks = [ok_kinds(s_eager), ok_kinds(s_jit), ok_kinds(s)]
  upd = jax.jit(e.update, donate_argnums=1)
  rs = ref.init(single)
  for p in steps:
    s = upd(p, s)
    rs = jax.jit(ref.update)(p, rs)
    checks.append(ok_kinds(s) and bitwise(s, rs))
  host[f"{name}_checks"] = checks
  host[f"{name}_small_on_device"] = all(
    x.sharding.memory_kind == "device"
    for st in as_tuple(s)
    for x in jax.tree.leaves(st._replace(target=None))
  )
  host[f"{name}_steps"] = [int(st.step) for st in as_tuple(s)]

# A state in device memory (e.g. restored without its memory kind) is moved
# to its memory kind by the jitted update, on update and idle steps alike.
e = jepa_ema.ema(0.9, every=3, memory_kind=HOST)
ref = jepa_ema.ema(0.9, every=3)
s, rs = ref.init(single), ref.init(single)
checks = []
try:
  for p in steps[:4]:
    s = jax.jit(e.update)(p, s)
    rs = jax.jit(ref.update)(p, rs)
    checks.append(
      all(x.sharding.memory_kind == HOST for x in jax.tree.leaves(s.target))
      and bitwise(s, rs)
    )
except Exception as err:  # pylint: disable=broad-except
  checks.append(f"{type(err).__name__}: {str(err)[:200]}")
host["from_device_checks"] = checks
# jax.device_put to device memory brings an offloaded target back.
back = jax.device_put(s.target, jax.memory.Space.Device)
host["brought_back"] = [
  x.sharding.memory_kind for x in jax.tree.leaves(back)
] == ["device"] * len(jax.tree.leaves(back)) and bitwise(back, s.target)

# PostHocSnapshots saves offloaded targets unchanged.
sigmas = (0.05, 0.10)
e = jepa_ema.ema(
  tuple(jepa_ema.power_momentum(sigma_rel=s) for s in sigmas),
  memory_kind=HOST,
)
p0 = {"w": jnp.linspace(0.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
s = e.init(p0)
with tempfile.TemporaryDirectory() as d:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    snaps = jepa_ema.PostHocSnapshots(d, sigmas, every=2)
    upd = jax.jit(e.update, donate_argnums=1)
    saved = []
    for i in range(4):
      s = upd({"w": p0["w"] * (i + 2), "b": p0["b"] * i}, s)
      if snaps.maybe_save(s, e):
        saved.append([jax.device_get(st.target) for st in s])
    host["posthoc_kinds"] = sorted(
      {x.sharding.memory_kind for st in s for x in jax.tree.leaves(st.target)}
    )
    loaded = [(step, sig, load()) for step, sig, load in snaps]
  host["posthoc_count"] = [len(loaded), 2 * len(saved)]
  expected = [t for group in saved for t in group]
  host["posthoc_unchanged"] = all(
    bitwise(got, want_) for (_, _, got), want_ in zip(loaded, expected)
  )

print("RESULT " + json.dumps(out))
