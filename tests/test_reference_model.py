"""The library against the float64 reference model (``tests/reference.py``).

One hypothesis test draws an option combination (one or several momenta,
schedules, ``every``, ``drift``, ``dtype``, stochastic rounding,
``skip_nonfinite``, a policy in each of its forms, ``ema`` or ``track_ema``
with write-back), a mixed tree (float32, bfloat16, float16, int32 and bool
leaves; 0-d and empty ones; a top-level dict, list or bare array), a params
trajectory (leaves that hold still, move, or are set to the target; NaN/Inf
injected when ``skip_nonfinite`` is drawn, NaN alone otherwise) and an
execution mode:

* ``eager``: ``ema.update`` / ``tx.update`` called as they are;
* ``jit``: ``jax.jit`` of the update (of the train step for ``track_ema``);
* ``donate``: the same with the state donated;
* ``checkpoint``: ``donate``, with the state written to msgpack bytes by
  ``flax.serialization`` and restored into NumPy arrays halfway through.

After ``init`` and after every call it compares: ``step``, ``skipped``, every
target leaf (``None`` where excluded, its dtype, its value), ``drift``
(recomputed or kept bitwise), the read-back momentum (``ema(...).momentum``
eagerly; also traced, ``jax.jit(ema.momentum)``, in the jitted modes),
``get_target(state[, i], online=params)`` and, for ``track_ema``, the params
after a write-back. The tolerances are derived in ``tests/reference.py``'s
docstring: per blend, ``u (|exact| + 3 min(m, 1-m) |o - t|)`` for float32
(``u = 2**-24``), plus ``dm |o - t|`` for the momentum's float32 error
(``dm = 0`` for a constant, ``2**-21`` for a schedule's formula, summed over
an ``every`` window plus half an ulp for its one rounding), plus half an ulp
of a bfloat16 / float16 target (a whole ulp when rounded stochastically);
drift within ``4 (n + 6) u`` relative; everything the docs call exact
bitwise. The known corners of issues 27 and 30 are ``@example`` s; they run
first, in every profile.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jepa_ema
from tests import reference as ref
from tests.reference import Options, Sched

DTYPES = {
  "f32": np.dtype(np.float32),
  "bf16": ref.BF16,
  "f16": ref.F16,
  "i32": np.dtype(np.int32),
  "bool": np.dtype(np.bool_),
}
SHAPES = [(), (0,), (3,), (2, 3)]
MODES = ["eager", "jit", "donate", "checkpoint"]


class TableSchedule:
  """A schedule reading a table of float32 values (out of [0, 1] or NaN on
  purpose): a schedule bug under ``jit``, where it is clipped (NaN: 1)."""

  def __init__(self, values: tuple):
    self.values = values

  def __call__(self, step: Any) -> jax.Array:
    table = jnp.asarray(self.values, jnp.float32)
    return table[jnp.asarray(step) % len(self.values)]

  def __repr__(self) -> str:
    return f"TableSchedule({self.values})"


class TableSched(Sched):
  """The reference side of :class:`TableSchedule`."""

  def build(self) -> Any:
    return TableSchedule(self.args)

  def m64(self, t: float) -> float:
    return ref.f32(self.args[int(t) % len(self.args)])

  def atol(self) -> float:
    return 0.0


def table(*values: float) -> Sched:
  return TableSched("table", tuple(values))


@dataclasses.dataclass(frozen=True)
class Case:
  opts: Options
  tree: Any  # nested dict / list of (dtype name, shape)
  seed: int = 0
  steps: int = 4
  mode: str = "jit"
  nan_at: tuple = ()  # steps whose params get a NaN (or Inf with skip)
  nan_leaf: int = 0  # which non-empty floating leaf (modulo their number)
  hold: float = 0.3  # probability that a leaf holds still in a step
  to_target: float = 0.15  # probability that a leaf is set to the target


# ------------------------------------------------------------- strategies

leaf_specs = st.tuples(st.sampled_from(list(DTYPES)), st.sampled_from(SHAPES))


@st.composite
def tree_specs(draw):
  top = draw(st.sampled_from(["dict"] * 6 + ["list", "leaf"]))
  if top == "leaf":
    return draw(leaf_specs)

  def entry():
    kind = draw(st.sampled_from(["leaf", "leaf", "dict", "list"]))
    if kind == "leaf":
      return draw(leaf_specs)
    if kind == "dict":
      keys = draw(st.sampled_from([["x"], ["x", "y"]]))
      return {k: draw(leaf_specs) for k in keys}
    return [draw(leaf_specs) for _ in range(draw(st.integers(1, 2)))]

  n = draw(st.integers(1, 4))
  if top == "list":
    return [entry() for _ in range(n)]
  return {k: entry() for k in ["a", "b", "c", "d"][:n]}


unit = st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999, 1.0]) | st.floats(0, 1)


@st.composite
def scheds(draw, jit_only: bool):
  kinds = [
    "number",
    "number",
    "constant",
    "linear",
    "cosine",
    "warmup",
    "tf_warmup",
    "exp_warmup",
    "power",
    "halflife",
    "scale",
    "optax_linear",
  ] + (["table"] if jit_only else [])
  kind = draw(st.sampled_from(kinds))
  if kind in ("number", "constant"):
    return Sched(kind, (draw(unit),))
  if kind in ("linear", "cosine"):
    total = draw(st.sampled_from([0, 3, 4.5, 100]))
    return Sched(kind, (draw(unit), draw(unit), total))
  if kind == "warmup":
    mx = draw(st.sampled_from([0.5, 0.9, 0.9999]))
    mn = draw(st.sampled_from([0.0, 0.3]))
    inv_gamma = draw(st.sampled_from([1.0, 2.5]))
    power = draw(st.sampled_from([2 / 3, 1.0]))
    return Sched(
      kind, (mx, mn, inv_gamma, power, draw(st.sampled_from([0, 2])))
    )
  if kind == "tf_warmup":
    return Sched(kind, (draw(st.sampled_from([0.5, 0.999])),))
  if kind == "exp_warmup":
    return Sched(kind, (draw(unit), draw(st.sampled_from([2.0, 2000.0]))))
  if kind == "power":
    return Sched(kind, (draw(st.sampled_from([1.0, 6.94])),))
  if kind == "halflife":
    return Sched(
      kind,
      (draw(st.sampled_from([2.0, 10.0])), draw(st.sampled_from([None, 0.5]))),
    )
  if kind == "scale":
    inner = draw(
      st.sampled_from([Sched("number", (0.9,)), Sched("linear", (0.5, 1.0, 6))])
    )
    return Sched(kind, (inner, draw(st.sampled_from([0.5, 2.0, 3.0]))))
  if kind == "optax_linear":
    return Sched(kind, (draw(unit), draw(unit), draw(st.sampled_from([3, 10]))))
  values = st.sampled_from([2.0, 0.5, -0.5, 1.5, 0.9, 0.0, 1.0, float("nan")])
  return table(*draw(st.lists(values, min_size=1, max_size=4)))


def top_keys(tree: Any) -> list:
  if isinstance(tree, dict):
    return sorted(tree)
  if isinstance(tree, list):
    return list(range(len(tree)))
  return []


actions = st.sampled_from(ref.ACTIONS)


@st.composite
def policies(draw, tree):
  form = draw(
    st.sampled_from(["none", "none", "one", "prefix", "callable", "by_path"])
  )
  keys = top_keys(tree)
  if form == "one" or (form in ("prefix", "callable") and not keys):
    return draw(actions)
  if form == "none":
    return None
  if form in ("prefix", "callable"):

    def sub(spec):
      if isinstance(spec, dict) and draw(st.booleans()):
        return {k: draw(actions) for k in spec}
      return draw(actions)

    prefix = (
      {k: sub(tree[k]) for k in keys}
      if isinstance(tree, dict)
      else [sub(tree[k]) for k in keys]
    )
    return (form, prefix)
  regexes = st.sampled_from(
    ["a", "x", r"\['b'\]", r"\[0\]", r"\['x'\]$", "y", "c|d", "^\\[1\\]"]
  )
  rules = draw(st.lists(st.tuples(regexes, actions), min_size=1, max_size=3))
  return ("by_path", tuple(rules), draw(actions))


def has_averaged_float(tree: Any, policy: Any) -> bool:
  params = build_params(tree, np.random.default_rng(0))
  acts = ref.resolve_policy(policy, params)
  return any(
    acts[p] == "average" and ref.is_float(np.asarray(x).dtype)
    for p, x in ref.flatten(params)
  )


@st.composite
def cases(draw):
  tree = draw(tree_specs())
  mode = draw(st.sampled_from(MODES))
  api = draw(st.sampled_from(["ema", "ema", "track_ema"]))
  n = draw(st.integers(1, 3))
  several = n > 1 or draw(st.booleans())
  every = draw(st.sampled_from([1, 1, 2, 3]))
  momenta = tuple(draw(scheds(jit_only=mode != "eager")) for _ in range(n))
  if every > 1:  # a NaN momentum inside a window: not modelled
    momenta = tuple(
      s if s.kind != "table" else table(*[v for v in s.args if v == v] or [0.5])
      for s in momenta
    )
  dtype = draw(st.sampled_from([None, None, "f32", "bf16", "f16"]))
  policy = draw(policies(tree))
  rounding = "nearest"
  if dtype in ("bf16", "f16") and has_averaged_float(tree, policy):
    rounding = draw(st.sampled_from(["nearest", "stochastic"]))
  skip = draw(st.booleans())
  wb_every, wb_m = None, 0.0
  if api == "track_ema" and draw(st.booleans()):
    wb_every = draw(st.integers(1, 3))
    wb_m = draw(st.sampled_from([0.0, 0.25, 0.5]))
  opts = Options(
    momenta=momenta,
    several=several,
    dtype=None if dtype is None else DTYPES[dtype],
    skip_nonfinite=skip,
    every=every,
    drift=draw(st.sampled_from([False, False, True, 1, 2])),
    rounding=rounding,
    policy=policy,
    api=api,
    write_back_every=wb_every,
    write_back_momentum=wb_m,
  )
  steps = draw(st.integers(1, 6))
  nan_at = ()
  if wb_every is None and draw(st.integers(0, 3)) == 0:
    nan_at = tuple(
      draw(st.lists(st.integers(0, steps - 1), max_size=2, unique=True))
    )
  return Case(
    opts,
    tree,
    seed=draw(st.integers(0, 2**16)),
    steps=steps,
    mode=mode,
    nan_at=nan_at,
    nan_leaf=draw(st.integers(0, 7)),
  )


# ---------------------------------------------------------------- harness


def random_leaf(rng, dtype: np.dtype, shape: tuple) -> np.ndarray:
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if dtype == np.int32:
    return rng.integers(-5, 6, shape).astype(np.int32)
  # magnitudes in [1/4, 4): no subnormals, no overflow in float16
  x = rng.choice([-1.0, 1.0], shape) * 2.0 ** rng.uniform(-2, 2, shape)
  return np.asarray(x).astype(dtype)


def build_params(tree: Any, rng) -> Any:
  if isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[0], str):
    return random_leaf(rng, DTYPES[tree[0]], tree[1])
  if isinstance(tree, dict):
    return {k: build_params(tree[k], rng) for k in tree}
  return [build_params(t, rng) for t in tree]


def next_params(case, rng, params, lib_target, step):
  """The params of the next call: each leaf holds still, moves, or is set
  to the target (where the target stores it in its dtype); NaN/Inf
  injected at ``case.nan_at``."""
  flat = dict(ref.flatten(params))
  out = {}
  for p, x in flat.items():
    r = rng.random()
    t = lib_target.get(p)
    if r < case.hold:
      out[p] = x
    elif (
      r < case.hold + case.to_target and t is not None and t.dtype == x.dtype
    ):
      out[p] = t.copy()
    else:
      out[p] = random_leaf(rng, x.dtype, x.shape)
  if step in case.nan_at:
    floats = [p for p, x in out.items() if ref.is_float(x.dtype) and x.size]
    if floats:
      p = floats[case.nan_leaf % len(floats)]
      x = out[p].copy()
      bad = [np.nan, np.inf, -np.inf] if case.opts.skip_nonfinite else [np.nan]
      x.reshape(-1)[rng.integers(x.size)] = bad[rng.integers(len(bad))]
      out[p] = x
  return ref.unflatten_like(params, out)


def to_np(tree: Any) -> dict:
  return {p: None if x is None else np.asarray(x) for p, x in ref.flatten(tree)}


def as_states(state: Any, several: bool) -> list:
  return list(state) if several else [state]


def roundtrip(state: Any) -> Any:
  """A checkpoint: msgpack bytes and back, restored as NumPy arrays."""
  return flax.serialization.from_bytes(
    state, flax.serialization.to_bytes(state)
  )


def check_states(case, model, states, expected, prev_drift, params, lib_read):
  opts = case.opts
  lib_targets = []
  for i, (s, e) in enumerate(zip(states, expected)):
    where = f"state {i}, step {e.step}"
    assert int(s.step) == e.step, (where, int(s.step))
    assert int(s.skipped) == e.skipped, (where, "skipped", int(s.skipped))
    got = to_np(s.target)
    assert set(got) == set(e.target), (where, set(got), set(e.target))
    for p, leaf in e.target.items():
      ref.check_leaf(got[p], leaf, f"{where}, target{ref.keystr(p)}")
    lib_targets.append(got)
  model.resync(lib_targets)
  for i, (s, ms) in enumerate(zip(states, model.states)):
    where = f"state {i}, step {ms.step}"
    if opts.drift is False:
      assert s.drift is None, where
      continue
    assert set(s.drift) == {"global", "per_module"}, where
    assert set(s.drift["per_module"]) == set(ms.drift["per_module"]), (
      where,
      set(s.drift["per_module"]),
      set(ms.drift["per_module"]),
    )
    lib = {"global": s.drift["global"], **s.drift["per_module"]}
    want = {"global": ms.drift["global"], **ms.drift["per_module"]}
    for name, x in lib.items():
      x = np.asarray(x)
      assert x.dtype == np.float32, (where, name, x.dtype)
      if not ms.drift_changed and prev_drift[i] is None:  # after init
        assert float(x) == want[name], (where, name, x)
        continue
      if not ms.drift_changed:  # kept bitwise (idle, skipped or not due)
        assert ref.bits(x) == ref.bits(prev_drift[i][name]), (
          f"{where}: drift[{name}] {x} should keep {prev_drift[i][name]}"
        )
        continue
      w = want[name]
      if np.isnan(w) or np.isinf(w):
        assert (np.isnan(w) and np.isnan(x)) or x == w, (where, name, x, w)
      else:
        rtol = ms.drift_rtol[name]
        assert abs(float(x) - w) <= rtol * w + 1e-30, (where, name, x, w)
    prev_drift[i] = {k: np.asarray(v) for k, v in lib.items()}
  # get_target(online=) after this call
  for i in range(len(states)):
    got = to_np(lib_read["get_target"](i, params))
    for p, leaf in model.get_target(i, params).items():
      ref.check_leaf(got[p], leaf, f"get_target({i}, online=){ref.keystr(p)}")
  return lib_targets


def run_case(case: Case) -> None:
  opts = case.opts
  rng = np.random.default_rng(case.seed)
  params = build_params(case.tree, rng)
  model = ref.Model(opts, params)
  kw = opts.library_kwargs()
  momentum = opts.library_momentum()
  jitted = case.mode != "eager"
  tables = any(s.kind == "table" for s in opts.momenta)
  ema_reader = jepa_ema.ema(
    momentum, **{k: v for k, v in kw.items() if not k.startswith("write")}
  )
  jit_momentum = jax.jit(ema_reader.momentum)

  def read_momentum(state):  # round 4: track_ema(...).momentum(opt_state)
    if opts.api == "track_ema" and hasattr(tx_inner, "momentum"):
      return tx_inner.momentum(state)
    return ema_reader.momentum(states_of(state))

  if opts.api == "ema":
    tx = tx_inner = jepa_ema.ema(momentum, **kw)
    states_of = lambda state: state  # noqa: E731
    if case.mode == "eager":
      call = tx.update
    elif case.mode == "jit":
      call = jax.jit(tx.update)
    else:
      call = tx.jit()
  else:
    tx_inner = jepa_ema.track_ema(momentum, **kw)
    tx = optax.chain(optax.identity(), tx_inner)
    states_of = lambda state: state[1]  # noqa: E731

    def train_step(params, updates, opt_state):
      out, opt_state = tx.update(updates, opt_state, params)
      return optax.apply_updates(params, out), opt_state

    if case.mode == "eager":
      call = train_step
    elif case.mode == "jit":
      call = jax.jit(train_step)
    else:
      call = jax.jit(train_step, donate_argnums=2)

  def get_target(i, online):
    index = i if opts.several else None
    return jepa_ema.get_target(state, index, online=online)

  lib_read = {"get_target": get_target}
  state = tx.init(jax.tree.map(jnp.asarray, params))
  states = as_states(states_of(state), opts.several)
  prev_drift = [None] * len(states)  # the library's last drift values
  lib_targets = check_states(
    case, model, states, model.init_expected(), prev_drift, params, lib_read
  )
  for step in range(case.steps):
    new = next_params(case, rng, params, lib_targets[0], step)
    if opts.api == "ema":
      post = new
      state = call(jax.tree.map(jnp.asarray, new), state)
      lib_params = None
    else:
      jp = jax.tree.map(jnp.asarray, params)
      updates = jax.tree.map(
        lambda q, p: q if p.dtype == jnp.bool_ else q - p,
        jax.tree.map(jnp.asarray, new),
        jp,
      )
      post = jax.tree.map(np.asarray, optax.apply_updates(jp, updates))
      lib_params, state = call(jp, updates, state)
      lib_params = jax.tree.map(np.asarray, lib_params)
    states = as_states(states_of(state), opts.several)
    read = None
    if not tables:
      read = read_momentum(state)
      read = [float(x) for x in (read if opts.several else [read])]
    if jitted:
      traced = jit_momentum(states_of(state))
      traced = [float(x) for x in (traced if opts.several else [traced])]
      read = traced if read is None else read
    expected = model.update(post, read)
    for i, e in enumerate(expected):
      got = read[i]
      assert abs(got - e.momentum) <= e.momentum_tol, (
        f"state {i}, update {step}: read-back momentum {got}, expected "
        f"{e.momentum} within {e.momentum_tol}"
      )
      if jitted and not tables:
        assert abs(traced[i] - e.momentum) <= e.momentum_tol + 2**-24, (
          f"state {i}, update {step}: traced read-back {traced[i]}, "
          f"expected {e.momentum}"
        )
    online = post if opts.api == "ema" else lib_params
    lib_targets = check_states(
      case, model, states, expected, prev_drift, online, lib_read
    )
    if opts.api == "track_ema":
      wb = model.write_back(step, post, params)
      flat = to_np(lib_params)
      for p, x in ref.flatten(post):
        leaf = ref.exact_leaf(np.asarray(x)) if wb is None else wb[p]
        ref.check_leaf(
          flat[p], leaf, f"params after update {step}{ref.keystr(p)}"
        )
      # the user repairs what a NaN update broke
      params = jax.tree.map(
        lambda x: (
          np.where(np.isfinite(x), x, 1).astype(x.dtype)
          if ref.is_float(x.dtype)
          else x
        ),
        lib_params,
      )
    else:
      params = new
    if case.mode == "checkpoint" and step == case.steps // 2:
      state = roundtrip(state)


# ------------------------------------------------------------------ tests

N, Y = Sched("number", (0.5,)), Sched("number", (0.9,))
MIXED = {
  "a": {"x": ("f32", (3,)), "y": ("bf16", (2, 3))},
  "b": ("f16", ()),
  "c": [("i32", (3,)), ("bool", (0,))],
  "d": ("f32", (0,)),
}


@settings(max_examples=settings.default.max_examples)
@given(case=cases())
# issue 30, 1: a skip leaves copied and integer leaves bitwise too
@example(
  case=Case(
    Options(
      (N,),
      skip_nonfinite=True,
      policy=("prefix", {"a": "average", "b": "copy", "c": "average"}),
    ),
    {"a": ("f32", (2,)), "b": ("f32", (2,)), "c": ("i32", ())},
    steps=3,
    mode="eager",
    nan_at=(1,),
    nan_leaf=1,
    hold=0.0,
    to_target=0.0,
  )
)
# issue 30, 2: drift is NaN when the measured params hold a NaN
@example(
  case=Case(
    Options((N,), drift=True),
    {"w": ("f32", (4,))},
    steps=2,
    mode="jit",
    nan_at=(0,),
    to_target=0.0,
  )
)
# issue 30, 3: track_ema averages the bf16 post-step params, under jit
@example(
  case=Case(
    Options((Sched("number", (0.0,)),), dtype=DTYPES["f32"], api="track_ema"),
    {"w": ("bf16", (64,))},
    steps=3,
    mode="jit",
    hold=0.0,
    to_target=0.0,
  )
)
# issue 30, decisions 5 and 6: per_module keys of a list and of copied
# entries; write-back counts target updates with every=k
@example(
  case=Case(
    Options(
      (Y,),
      every=2,
      drift=3,
      api="track_ema",
      policy=("prefix", ["average", "copy", "average"]),
      write_back_every=3,
      write_back_momentum=0.25,
    ),
    [("f32", (3,)), ("f32", (2,)), ("bf16", ())],
    steps=6,
    mode="donate",
  )
)
# decision 5: a bare array has no per_module entries
@example(
  case=Case(Options((Y,), drift=True), ("f32", (3,)), steps=2, mode="eager")
)
# decision 9: m = 0 rounded stochastically lands on a neighbour
@example(
  case=Case(
    Options(
      (Sched("number", (0.0,)), Y),
      several=True,
      dtype=ref.BF16,
      rounding="stochastic",
    ),
    MIXED,
    steps=3,
    mode="checkpoint",
  )
)
# issue 27: first match wins, get_target(online=) after updates (index=),
# write-back does not touch kept leaves, copy into a bfloat16 target
@example(
  case=Case(
    Options(
      (Y, N),
      several=True,
      dtype=ref.BF16,
      api="track_ema",
      policy=(
        "by_path",
        ((r"\['b'\]", "copy"), ("b|x", "keep"), ("d", "exclude")),
        "average",
      ),
      write_back_every=1,
      write_back_momentum=0.0,
    ),
    MIXED,
    steps=3,
    mode="jit",
    hold=0.0,
  )
)
# issue 27: traced momentum() with every=k between updates; the (2.0, 0.5)
# window clipped before its product; a NaN momentum counts as 1 and skips
@example(
  case=Case(Options((table(2.0, 0.5),), every=2, drift=True), MIXED, steps=5)
)
@example(
  case=Case(
    Options(
      (table(0.5, float("nan")), Y),
      several=True,
      policy=(
        "prefix",
        {"a": "average", "b": "copy", "c": "average", "d": "keep"},
      ),
      drift=True,
    ),
    MIXED,
    steps=4,
    mode="donate",
  )
)
# all four modes on the mixed tree with every option of ema()
@example(
  case=Case(
    Options(
      (
        Sched("cosine", (0.5, 1.0, 4.5)),
        Sched("warmup", (0.9999, 0.0, 1.0, 2 / 3, 0)),
      ),
      several=True,
      dtype=ref.F16,
      every=2,
      drift=2,
      skip_nonfinite=True,
      policy=(
        "prefix",
        {
          "a": {"x": "average", "y": "copy"},
          "b": "average",
          "c": "exclude",
          "d": "average",
        },
      ),
    ),
    MIXED,
    steps=6,
    mode="checkpoint",
    nan_at=(3, 5),
  )
)
def test_library_matches_the_reference_model(case):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PrecisionWarning, unusable donations
    run_case(case)
