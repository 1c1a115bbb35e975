"""The options of ema() / track_ema(): every=k with the product momentum,
several momenta in one state, the drift metric, stochastic bfloat16 rounding.
Each against a hand-rolled float64 reference or a closed form, one compile
per configuration, in-place updates and checkpoint round trips (sharding:
tests/test_sharding.py)."""

import functools
import math

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from inputs_table import run_to_one, stochastic_mean_bound

import jepa_ema

SCHEDULES = [
  0.9,
  jepa_ema.cosine_momentum(0.8, 1.0, total_steps=30),
  jepa_ema.linear_momentum(0.5, 0.99, total_steps=20),
  jepa_ema.warmup_momentum(power=3 / 4),
]
IDS = ["float", "cosine", "linear", "warmup"]


def params_seq(n, seed=0):
  """A trajectory of param trees (two top-level modules, an int counter)."""
  key = jax.random.key(seed)
  out, p = (
    [],
    {
      "enc": {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)},
      "pred": {"w": jnp.full((5,), 2.0)},
      "n": jnp.array(0),
    },
  )
  for i in range(n):
    key, k1, k2 = jax.random.split(key, 3)
    p = {
      "enc": {
        "w": p["enc"]["w"] + 0.1 * jax.random.normal(k1, (4, 3)),
        "b": p["enc"]["b"] + 0.05,
      },
      "pred": {"w": p["pred"]["w"] * 0.97 + 0.1 * jax.random.normal(k2, (5,))},
      "n": jnp.array(i + 1),
    }
    out.append(p)
  return out


def m64(schedule, s):
  """The float32 momentum at step s, as float64 (what the library sees)."""
  m = schedule(s) if callable(schedule) else schedule
  return np.float64(np.float32(m))


def reference(schedule, init, seq, every):
  """float64: update at steps s with s % every == every - 1, with the product
  of the momenta of the window s - every + 1 .. s."""
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), init)
  for s, p in enumerate(seq):
    if s % every != every - 1:
      continue
    m = np.prod([m64(schedule, j) for j in range(s - every + 1, s + 1)])
    ref = jax.tree.map(
      lambda t, o: (
        (m * t + (1 - m) * np.asarray(o, np.float64))
        if np.issubdtype(np.asarray(o).dtype, np.floating)
        else np.asarray(o)
      ),
      ref,
      p,
    )
  return ref


def assert_close(tree, ref, rtol=2e-6, atol=2e-6):
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), b, rtol=rtol, atol=atol
    )


# ---------------------------------------------------------------- every=k


@pytest.mark.parametrize("every", [1, 2, 3, 5])
@pytest.mark.parametrize("momentum", SCHEDULES, ids=IDS)
def test_every_matches_float64_product_momentum(momentum, every, maybe_jit):
  seq = params_seq(23)  # ends mid-window for every = 2, 3, 5
  ema = jepa_ema.ema(momentum, every=every)
  update = maybe_jit(ema.update)
  state = ema.init(seq[0])
  for p in seq:
    state = update(p, state)
  assert int(state.step) == len(seq)
  assert_close(state.target, reference(momentum, seq[0], seq, every))
  assert (
    int(state.target["n"]) == (len(seq) // every) * every
    if every > 1
    else int(seq[-1]["n"])
  )


@functools.partial(jax.jit, static_argnums=1)
def _window_momentum_seen(table, every):
  """The window momentum ``ema(every=k)`` applies, read off exactly: a
  target of 1 moved towards 0 becomes the momentum M bitwise (``1 - (1 - M)``
  is exact for M >= 1/2, ``0 + M * 1`` below). Jitted with the table as an
  argument: one compilation per window length."""
  ema = jepa_ema.ema(lambda step: table[step], every=every)
  zero = {"w": jnp.float32(0.0)}
  state = jax.lax.fori_loop(
    0, every, lambda _, s: ema.update(zero, s), ema.init({"w": jnp.float32(1)})
  )
  return state.target["w"]


# Correctly rounded wherever it matters: below 2**-24, 1 - M rounds to 1 in
# float32, so the update copies the online values whatever M is (and M is
# not observable); below 2**-100 the product also loses its precision (its
# low part is subnormal, which XLA:CPU flushes).
window_tables = st.integers(1, 64).flatmap(
  lambda k: st.lists(st.floats(0.0, 1.0, width=32), min_size=k, max_size=k)
)


@given(table=window_tables)
@example(table=[0.9999] * 8)
@example(table=[1.0] * 5)
@example(table=[1.0, 0.0, 1.0])
@example(table=[0.5] * 24)  # exact: 2**-24
@example(table=[1.0 - 2.0**-24] * 3)  # the largest momentum below 1
@example(table=[0.3, 0.2, 0.7, 0.01])  # below 1/2: 353 ulps off before
@example(table=[0.999, 0.5000001, 0.75, 0.9, 0.6, 0.99, 0.8, 0.51])
def test_every_window_momentum_is_the_product_to_one_rounding(table):
  """The window's momentum is the exact product of the float32 momenta,
  rounded once to float32: within half an ulp (up to 2**-40 relative)."""
  exact = float(np.prod(np.asarray(table, np.float32).astype(np.float64)))
  assume(exact == 0.0 or exact >= 2.0**-24)
  got = float(
    _window_momentum_seen(jnp.asarray(table, jnp.float32), len(table))
  )
  half_ulp = 0.5 * float(np.spacing(np.float32(exact)))
  assert abs(got - exact) <= half_ulp + exact * 2.0**-40, (got, exact)
  if exact in (0.0, 1.0):
    assert got == exact


@pytest.mark.parametrize("every", [2, 4, 8])
def test_every_is_exact_when_params_hold_still_within_windows(every):
  # Product momentum = per-step EMA when the params only change at window
  # boundaries; skipping with the per-step momentum is far off.
  schedule = jepa_ema.cosine_momentum(0.9, 1.0, total_steps=64)
  windows = [
    jax.tree.map(lambda x, i=i: x + i, {"w": jnp.zeros(64)})
    for i in range(64 // every)
  ]
  seq = [windows[s // every] for s in range(64)]
  per_step, amortized = (
    jepa_ema.ema(schedule),
    jepa_ema.ema(schedule, every=every),
  )
  a, b = per_step.init(seq[0]), amortized.init(seq[0])
  skip = seq[0]["w"]
  for s, p in enumerate(seq):
    a, b = per_step.update(p, a), amortized.update(p, b)
    if s % every == every - 1:  # ema-pytorch's update_every
      skip = schedule(s) * skip + (1 - schedule(s)) * p["w"]
  np.testing.assert_allclose(b.target["w"], a.target["w"], rtol=2e-6)
  assert float(jnp.max(jnp.abs(skip - a.target["w"]))) > 0.1


def test_every_leaves_target_bitwise_between_updates_and_compiles_once():
  seq = params_seq(12)
  ema = jepa_ema.ema(0.9, every=4)
  update = jax.jit(ema.update)
  state = ema.init(seq[0])
  assert "conditional" in update.lower(seq[0], state).compile().as_text()
  for s, p in enumerate(seq):
    new = update(p, state)
    if s % 4 != 3:
      chex.assert_trees_all_equal(new.target["enc"], state.target["enc"])
    else:
      assert not np.array_equal(
        new.target["enc"]["w"], state.target["enc"]["w"]
      )
    state = new
  assert update._cache_size() == 1


def test_every_in_place_under_donation():
  ema = jepa_ema.ema(0.99, every=4, drift=True)
  params = {f"w{i}": jnp.ones(1 << 14) for i in range(4)}
  update = jax.jit(ema.update, donate_argnums=1)
  state = update(params, ema.init(params))
  ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.target)]
  for _ in range(6):  # update and non-update steps alike
    state = update(params, state)
  assert [
    x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.target)
  ] == ptrs
  mem = update.lower(params, state).compile().memory_analysis()
  model = sum(x.nbytes for x in jax.tree.leaves(params))
  assert mem.temp_size_in_bytes < 0.05 * model


@pytest.mark.standard_promotion  # optax internals promote implicitly
def test_track_ema_every_equals_ema_of_post_step_params():
  seq = params_seq(9)
  tx = optax.chain(optax.adam(1e-2), jepa_ema.track_ema(0.8, every=3))
  ema = jepa_ema.ema(0.8, every=3)
  params = {k: v for k, v in seq[0].items() if k != "n"}
  opt_state, state = tx.init(params), ema.init(params)
  step = jax.jit(lambda p, o, g: tx.update(g, o, p))
  for p in seq:
    grads = jax.tree.map(
      lambda x, y: x - y, params, {k: v for k, v in p.items() if k != "n"}
    )
    updates, opt_state = step(params, opt_state, grads)
    params = optax.apply_updates(params, updates)
    state = ema.update(params, state)
  chex.assert_trees_all_close(
    jepa_ema.get_target(opt_state), state.target, rtol=1e-6
  )


# ---------------------------------------------------------- several momenta


def test_several_momenta_equal_separate_emas_bitwise():
  seq = params_seq(10)
  momenta = (0.9, jepa_ema.cosine_momentum(total_steps=10), 0.5)
  multi = jepa_ema.ema(momenta, every=2, drift=True)
  singles = [jepa_ema.ema(m, every=2, drift=True) for m in momenta]
  states = multi.init(seq[0])
  assert isinstance(states, tuple) and len(states) == 3
  sep = [e.init(seq[0]) for e in singles]
  update = jax.jit(multi.update)
  for p in seq:
    states = update(p, states)
    sep = [jax.jit(e.update)(p, s) for e, s in zip(singles, sep)]
  for i in range(3):
    chex.assert_trees_all_equal(states[i].target, sep[i].target)
    chex.assert_trees_all_close(states[i].drift, sep[i].drift, rtol=1e-6)
    chex.assert_trees_all_equal(jepa_ema.get_target(states, i), sep[i].target)
  assert_close(states[2].target, reference(0.5, seq[0], seq, 2))


def test_several_momenta_get_target_and_errors():
  params = {"w": jnp.zeros(3)}
  states = jepa_ema.ema([0.9, 0.99]).init(params)
  assert jepa_ema.get_target(states, -1) is states[1].target
  with pytest.raises(ValueError, match="Found 2 EmaStates.*pass `index`"):
    jepa_ema.get_target(states)
  with pytest.raises(ValueError, match="`index` 2 is out of range.*2 "):
    jepa_ema.get_target(states, 2)
  with pytest.raises(TypeError, match="`index` must be an int"):
    jepa_ema.get_target(states, "0")
  with pytest.raises(ValueError, match="holds 1 EmaStates but this EMA has 2"):
    jepa_ema.ema([0.9, 0.99]).update(params, states[:1])
  with pytest.raises(TypeError, match="tuple of EmaStates"):
    jepa_ema.ema([0.9, 0.99]).update(params, params)
  with pytest.raises(ValueError, match="empty sequence"):
    jepa_ema.ema(())


@pytest.mark.standard_promotion  # optax internals promote implicitly
def test_track_ema_several_momenta_in_a_chain():
  tx = optax.chain(optax.sgd(0.5), jepa_ema.track_ema((0.5, 0.75)))
  params = {"w": jnp.zeros(2)}
  opt_state = tx.init(params)
  updates, opt_state = tx.update({"w": -jnp.ones(2)}, opt_state, params)
  # post-step params are 0.5; targets 0.5 * (1 - m)
  np.testing.assert_allclose(jepa_ema.get_target(opt_state, 0)["w"], 0.25)
  np.testing.assert_allclose(jepa_ema.get_target(opt_state, 1)["w"], 0.125)


# ------------------------------------------------------------------- drift


def drift64(target, online):
  def sums(t, o):
    pairs = [
      (np.asarray(a, np.float64), np.asarray(b, np.float64))
      for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(o))
      if np.issubdtype(np.asarray(b).dtype, np.floating)
    ]
    return (
      sum(np.sum((a - b) ** 2) for a, b in pairs),
      sum(np.sum(b**2) for _, b in pairs),
    )

  d, n = sums(target, online)
  per = {}
  for k in online:
    dk, nk = sums(target[k], online[k])
    if nk or dk:
      per[k] = math.sqrt(dk / nk)
  return math.sqrt(d / n), per


@pytest.mark.parametrize("every", [1, 3])
def test_drift_matches_float64_after_each_update(every, maybe_jit):
  seq = params_seq(9)
  ema = jepa_ema.ema(
    jepa_ema.linear_momentum(0.6, 0.9, total_steps=9), drift=True, every=every
  )
  update = maybe_jit(ema.update)
  state = ema.init(seq[0])
  assert float(state.drift["global"]) == 0.0
  assert set(state.drift["per_module"]) == {"enc", "pred"}  # "n" is an int
  last = seq[0]
  for s, p in enumerate(seq):
    state = update(p, state)
    if s % every == every - 1:
      last = p
    glob, per = drift64(state.target, last)
    np.testing.assert_allclose(state.drift["global"], glob, rtol=1e-5)
    for k, v in per.items():
      np.testing.assert_allclose(state.drift["per_module"][k], v, rtol=1e-5)
  assert 0.0 < float(state.drift["global"]) < 1.0


@pytest.mark.parametrize("every,interval", [(1, 4), (3, 2), (1, 1)])
def test_drift_every_n_updates(every, interval, maybe_jit):
  """drift=N: the float64 reference on updates N-1, 2N-1, ... (counted from
  0), the last value kept unchanged (bitwise) on the others."""
  seq = params_seq(14)
  ema = jepa_ema.ema(
    jepa_ema.linear_momentum(0.6, 0.9, total_steps=9),
    drift=interval,
    every=every,
  )
  update = maybe_jit(ema.update)
  state = ema.init(seq[0])
  kept = state.drift
  computed = 0
  for s, p in enumerate(seq):
    state = update(p, state)
    is_update = s % every == every - 1
    if is_update and (s // every) % interval == interval - 1:
      computed += 1
      glob, per = drift64(state.target, p)
      np.testing.assert_allclose(state.drift["global"], glob, rtol=1e-5)
      for k, v in per.items():
        np.testing.assert_allclose(state.drift["per_module"][k], v, rtol=1e-5)
      kept = state.drift
    else:
      jax.tree.map(np.testing.assert_array_equal, state.drift, kept)
  assert computed == len(seq) // (every * interval)


def test_drift_every_n_compiles_once_and_validates():
  traces = []
  ema = jepa_ema.ema(0.9, drift=10)

  def step(p, st):
    traces.append(1)
    return ema.update(p, st)

  update = jax.jit(step, donate_argnums=1)
  state = ema.init({"w": jnp.ones(3)})
  for i in range(25):
    state = update({"w": jnp.full(3, float(i))}, state)
  assert len(traces) == 1
  assert float(state.drift["global"]) > 0  # computed at updates 9 and 19
  for bad, exc in (
    (0, ValueError),
    (-3, ValueError),
    (2.5, TypeError),
    ("10", TypeError),
  ):
    with pytest.raises(exc, match="drift"):
      jepa_ema.ema(0.9, drift=bad)
  with pytest.raises(ValueError, match="drift"):
    jepa_ema.track_ema(0.9, drift=0)


def test_drift_edge_cases():
  ema = jepa_ema.ema(0.5, drift=True)
  # a bare array: no modules; zero online norm: 0/0 -> 0, x/0 -> inf
  state = ema.update(jnp.zeros(3), ema.init(jnp.zeros(3)))
  assert float(state.drift["global"]) == 0.0 and state.drift["per_module"] == {}
  state = ema.update(jnp.zeros(3), ema.init(jnp.ones(3)))
  assert float(state.drift["global"]) == np.inf
  # bfloat16 params, float32 target: measured in float32
  p = {"a": jnp.ones(4, jnp.bfloat16), "b": [jnp.full(2, 2.0, jnp.bfloat16)]}
  e = jepa_ema.ema(0.5, drift=True, dtype=jnp.float32)
  st = e.update(jax.tree.map(lambda x: x * 3, p), e.init(p))
  np.testing.assert_allclose(st.drift["per_module"]["a"], 1.0 / 3, rtol=1e-6)
  np.testing.assert_allclose(st.drift["per_module"]["b"], 1.0 / 3, rtol=1e-6)


# ------------------------------------------------------ stochastic rounding


def test_stochastic_bf16_is_unbiased_where_nearest_stagnates():
  m, n = 0.999, 4096
  exact = {s: 1 - m**s for s in (500, 1000, 2000)}
  # bfloat16 spacing in [0.5, 1) (smaller below 0.5): 2**-8.
  bound = stochastic_mean_bound(2.0**-8, m, n)
  for steps, want in exact.items():
    sr = run_to_one(
      jepa_ema.ema(m, dtype=jnp.bfloat16, rounding="stochastic", key=steps),
      n,
      steps,
    )
    with pytest.warns(jepa_ema.PrecisionWarning):  # said at init
      rn = run_to_one(jepa_ema.ema(m, dtype=jnp.bfloat16), n, steps)
    f32 = run_to_one(jepa_ema.ema(m), n, steps)
    assert sr.target.dtype == jnp.bfloat16
    mean = float(jnp.mean(sr.target.astype(jnp.float32)))
    assert abs(mean - want) < bound, (steps, mean, want, bound)
    assert abs(float(f32.target[0]) - want) < 1e-4
    if steps == 2000:  # round-to-nearest gets stuck far below 0.865
      assert float(jnp.max(rn.target.astype(jnp.float32))) < want - 0.3


def test_stochastic_rounding_exact_cases_and_bounds():
  key = jax.random.key(3)
  t = jax.random.normal(key, (1000,)).astype(jnp.bfloat16)
  o = (jax.random.normal(jax.random.fold_in(key, 1), (1000,)) * 3).astype(
    jnp.bfloat16
  )
  for m in (1.0, 0.999, 0.7, 0.3, 0.0):
    ema = jepa_ema.ema(m, rounding="stochastic")
    new = ema.update(o, ema.init(t)).target
    lo, hi = jnp.minimum(t, o), jnp.maximum(t, o)
    assert bool(jnp.all((new >= lo) & (new <= hi)))
    if m == 1.0:
      assert np.array_equal(
        np.asarray(new).view(np.uint16), np.asarray(t).view(np.uint16)
      )
    if m == 0.0:
      assert np.array_equal(np.asarray(new), np.asarray(o))
    same = ema.update(t, ema.init(t)).target  # a fixed point stays put
    assert np.array_equal(np.asarray(same), np.asarray(t))


def test_stochastic_rounding_is_reproducible_and_key_dependent():
  seq = params_seq(6)
  make = lambda key: jepa_ema.ema(
    0.99, dtype=jnp.bfloat16, rounding="stochastic", key=key
  )

  def run(ema):
    s = ema.init(seq[0])
    for p in seq:
      s = jax.jit(ema.update)(p, s)
    return s

  a, b = run(make(1)), run(make(jax.random.key(1)))
  chex.assert_trees_all_equal(a.target, b.target)
  chex.assert_trees_all_equal(a.target, run(make(jax.random.PRNGKey(1))).target)
  c = run(make(2))
  assert not np.array_equal(a.target["enc"]["w"], c.target["enc"]["w"])


def test_option_validation():
  with pytest.raises(ValueError, match="`every` must be >= 1"):
    jepa_ema.ema(0.9, every=0)
  with pytest.raises(TypeError, match="`every` must be a positive int"):
    jepa_ema.ema(0.9, every=2.0)
  with pytest.raises(TypeError, match="`drift` must be a bool"):
    jepa_ema.ema(0.9, drift=1.0)  # drift=1 is drift=True (every update)
  with pytest.raises(ValueError, match="`rounding` must be 'nearest' or"):
    jepa_ema.ema(0.9, rounding="up")
  with pytest.raises(ValueError, match="needs dtype=jnp.bfloat16"):
    jepa_ema.ema(0.9, rounding="stochastic", dtype=jnp.float32)
  with pytest.raises(TypeError, match="`key` must be an int seed"):
    jepa_ema.ema(0.9, rounding="stochastic", key="seed")
  with pytest.raises(ValueError, match="target has none"):
    jepa_ema.ema(0.9, rounding="stochastic").init({"w": jnp.zeros(2)})
  bad = lambda step: jnp.where(step > 2, 1.5, 0.9)  # a broken schedule
  ema = jepa_ema.ema(bad, every=4)
  state = ema.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"returned momenta .* \[0, 1\]"):
    for _ in range(4):
      state = ema.update({"w": jnp.zeros(2)}, state)


# ----------------------------------------- one compile, checkpoint, shardings

CONFIGS = {
  "every": dict(momentum=jepa_ema.cosine_momentum(total_steps=20), every=4),
  "several": dict(momentum=(0.9, 0.99, 0.999)),
  "drift": dict(momentum=0.9, drift=True),
  "stochastic": dict(
    momentum=0.99, dtype=jnp.bfloat16, rounding="stochastic", key=5
  ),
  "all": dict(
    momentum=(0.9, jepa_ema.linear_momentum(total_steps=20)),
    every=3,
    drift=True,
    dtype=jnp.bfloat16,
    rounding="stochastic",
    skip_nonfinite=True,
  ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_one_compilation_per_configuration(name):
  cfg = dict(CONFIGS[name])
  ema = jepa_ema.ema(cfg.pop("momentum"), **cfg)
  seq = params_seq(20)
  chex.clear_trace_counter()  # counts by code location, across configs
  update = jax.jit(chex.assert_max_traces(ema.update, n=1), donate_argnums=1)
  state = ema.init(seq[0])
  for p in seq:
    state = update(p, state)
  assert update._cache_size() == 1


@pytest.mark.standard_promotion  # optax internals promote implicitly
@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_round_trip_resumes_bit_identically(name, tmp_path):
  cfg = dict(CONFIGS[name])
  tx = optax.chain(
    optax.adam(1e-2), jepa_ema.track_ema(cfg.pop("momentum"), **cfg)
  )
  seq = [{k: v for k, v in p.items() if k != "n"} for p in params_seq(14)]
  step = jax.jit(lambda p, o, g: tx.update(g, o, p))

  def train(params, opt_state, data):
    for target in data:
      grads = jax.tree.map(lambda x, y: x - y, params, target)
      updates, opt_state = step(params, opt_state, grads)
      params = optax.apply_updates(params, updates)
    return params, opt_state

  full = train(seq[0], tx.init(seq[0]), seq)
  half = train(seq[0], tx.init(seq[0]), seq[:7])  # stops mid-window
  template = (seq[0], tx.init(seq[0]))
  restored = flax.serialization.from_bytes(
    template, flax.serialization.to_bytes(half)
  )
  chex.assert_trees_all_equal(restored, half)
  resumed = train(*restored, seq[7:])
  chex.assert_trees_all_equal(resumed, full)
  if name == "all":  # and through orbax, as the demo checkpoints
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", half)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "state", jax.eval_shape(lambda: template))
    chex.assert_trees_all_equal(train(*back, seq[7:]), full)


# -- survivors of the mutation run (docs/testing.md) ---------------------------


@pytest.mark.parametrize("noise", [0, 0xFFFFFFFF], ids=["zeros", "ones"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_values_the_half_dtype_holds_round_to_themselves_at_extreme_noise(
  noise, dtype, monkeypatch
):
  # "Exact values are copied exactly": a value the half dtype holds (zeros
  # of both signs, subnormals, normals, the maximum) comes back bitwise
  # whatever the noise, including its extremes, which a random seed almost
  # never draws (u == 0 has probability 2**-24 per element).
  from jepa_ema import _rounding

  monkeypatch.setattr(
    _rounding,
    "_noise",
    lambda shape, seed: jnp.full(shape, noise, jnp.uint32),
  )
  info = jnp.finfo(dtype)
  held = jnp.array(
    [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal,
     info.smallest_normal, 1.0, -3.5, info.max, -info.max],
    dtype,
  )  # fmt: skip
  out = _rounding.stochastic_round(
    held.astype(jnp.float32), dtype, jnp.uint32(7)
  )
  assert out.dtype == dtype
  assert np.asarray(out).tobytes() == np.asarray(held).tobytes()


def test_stochastic_rounding_keeps_the_keys_own_implementation():
  # A key of another PRNG implementation (rbg) keeps it through the state:
  # its raw data is wrapped with its own implementation again.
  key = jax.random.key(0, impl="rbg")
  ema = jepa_ema.ema(0.5, dtype=jnp.bfloat16, rounding="stochastic", key=key)
  params = {"w": jnp.linspace(0.0, 1.0, 64)}
  state = ema.update({"w": params["w"] + 1e-3}, ema.init(params))
  assert state.target["w"].dtype == jnp.bfloat16 and int(state.step) == 1


def test_float32_targets_never_get_the_half_precision_warning():
  # PrecisionWarning is about dtypes narrower than float32 (bfloat16,
  # float16, float8): a float32 target does not warn, even at a momentum
  # where its own rounding would stall it (1 - m below 2**-24 / 1 %).
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error", jepa_ema.PrecisionWarning)
    ema = jepa_ema.ema(0.9999999)
    ema.update({"w": jnp.zeros(3)}, ema.init({"w": jnp.ones(3)}))
    jepa_ema.ema_update({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0, 0.9999999)
  with pytest.warns(jepa_ema.PrecisionWarning):
    jepa_ema.ema(0.9999999, dtype=jnp.bfloat16).init({"w": jnp.ones(3)})


@pytest.mark.parametrize("scale", [1.5, 2.25, 3.5, 0.5, 0.25])
def test_float16_stochastic_rounding_is_unbiased_among_the_subnormals(scale):
  # E[round(x)] = x at the bottom of float16 too: x = scale * 2**-24 lies
  # between two subnormals (or below the smallest), in the range where the
  # float32 exponent is 103 or less. Mean of 8192 draws (positions) against
  # x, within 6 standard errors (each draw is one of two neighbours).
  from jepa_ema import _rounding

  tiny = 2.0**-24
  x = jnp.full(8192, scale * tiny, jnp.float32)
  out = np.asarray(_rounding.stochastic_round(x, jnp.float16, jnp.uint32(3)))
  lo = math.floor(scale) * tiny
  assert set(np.unique(out.astype(np.float64))) <= {lo, lo + tiny}
  se = tiny * 0.5 / math.sqrt(x.size)
  assert abs(out.astype(np.float64).mean() - scale * tiny) < 6 * se


def test_a_long_window_momentum_is_the_exact_product_rounded_once():
  # every=64: the window's momentum is the exact product of its 64
  # float32 momenta rounded once to float32 (docs: up to 64 * 2**-44
  # relative before that rounding), on 12 windows of a cosine ramp.
  sched = jepa_ema.cosine_momentum(0.9, 1.0, total_steps=1000)
  ema = jepa_ema.ema(sched, every=64)
  ms = np.asarray(jax.vmap(sched)(jnp.arange(768)), np.float64)
  for w in range(12):
    exact = np.float32(np.prod(ms[64 * w : 64 * w + 64]))
    assert np.float32(ema.momentum(64 * w + 63)) == exact, w
