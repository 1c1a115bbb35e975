"""Where two options meet: the four bugs the reference model found and the
rules ``docs/howto/options.md`` ("Where options meet") decides.

Each bug test fails on 0.4.0 (the exact inputs of the report are pinned with
``@example``); each rule test pins the documented choice against a value
worked out by hand or an independent computation (``optax.apply_updates``,
NumPy).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jepa_ema

MODES = ("eager", "jit")


def _run(f, mode):
  return f if mode == "eager" else jax.jit(f)


def _bits(x):
  x = np.asarray(x)
  return np.atleast_1d(x).tobytes(), x.dtype


def _assert_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert _bits(x) == _bits(y), (x, y)


# ------------------------------------------- 1. a skip holds the whole target

POLICY = {"w": "average", "stats": "copy", "n": "average"}


@pytest.mark.parametrize("mode", MODES)
@given(
  stats=st.lists(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    min_size=2,
    max_size=2,
  ),
  n=st.integers(-(2**31), 2**31 - 1),
)
@example(stats=[float("nan"), 5.0], n=7)  # the report's exact inputs
@example(stats=[1.0, float("inf")], n=-1)
@settings(max_examples=20, deadline=None)
def test_skip_leaves_copied_and_integer_leaves_bitwise(mode, stats, n):
  ema = jepa_ema.ema(0.5, skip_nonfinite=True, policy=POLICY)
  state = ema.init({"w": jnp.ones(2), "stats": jnp.ones(2), "n": jnp.array(3)})
  params = {"w": jnp.full(2, 3.0), "stats": jnp.array(stats), "n": jnp.array(n)}
  new = _run(ema.update, mode)(params, state)
  if np.all(np.isfinite(stats)):
    assert int(new.skipped) == 0
    np.testing.assert_array_equal(new.target["stats"], np.float32(stats))
    assert int(new.target["n"]) == n
    np.testing.assert_array_equal(new.target["w"], 2.0)
  else:
    assert int(new.skipped) == 1
    _assert_bitwise(new.target, state.target)  # the whole target
  assert int(new.step) == 1


def test_nonfinite_traced_momentum_leaves_the_whole_target():
  """A non-finite momentum under jit is a skip too: copied and integer
  leaves are held, not written."""
  ema = jepa_ema.ema(
    lambda s: jnp.log(-1.0 - s.astype(jnp.float32)),  # NaN at every step
    policy={"w": "average", "stats": "copy", "n": "average"},
  )
  state = ema.init({"w": jnp.ones(2), "stats": jnp.ones(2), "n": jnp.array(3)})
  params = {"w": jnp.full(2, 3.0), "stats": jnp.full(2, 5.0), "n": jnp.array(7)}
  new = jax.jit(ema.update)(params, state)
  assert int(new.skipped) == 1
  _assert_bitwise(new.target, state.target)
  # The default rule (no policy): an int leaf is taken from online, and
  # held on a skip as well.
  ema = jepa_ema.ema(lambda s: jnp.log(-1.0 - s.astype(jnp.float32)))
  state = ema.init({"w": jnp.ones(2), "n": jnp.array(3)})
  new = jax.jit(ema.update)({"w": jnp.full(2, 3.0), "n": jnp.array(7)}, state)
  _assert_bitwise(new.target, state.target)


def test_a_skip_keeps_the_last_drift():
  """Rule: a skipped update leaves the drift as it was (not recomputed
  against the refused params)."""
  ema = jepa_ema.ema(0.5, drift=True, skip_nonfinite=True)
  state = ema.init({"w": jnp.ones(4)})
  state = ema.update({"w": jnp.full(4, 3.0)}, state)
  np.testing.assert_allclose(state.drift["global"], 1 / 3, rtol=1e-6)
  for mode in MODES:
    bad = _run(ema.update, mode)({"w": jnp.array([3.0, jnp.nan, 3, 3])}, state)
    assert int(bad.skipped) == 1
    _assert_bitwise(bad.drift, state.drift)


# ------------------------------------------------- 2. drift never reads 0 on NaN


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_drift_is_nan_when_the_params_hold_nan_or_inf(mode, bad):
  e = jepa_ema.ema(0.5, drift=True)
  params = {"enc": {"w": jnp.array([5.0, bad, 5.0, 5.0])}, "head": jnp.ones(2)}
  state = e.init({"enc": {"w": jnp.ones(4)}, "head": jnp.ones(2)})
  s = _run(e.update, mode)(params, state)
  assert np.isnan(s.drift["global"]), s.drift
  assert np.isnan(s.drift["per_module"]["enc"])
  # The other entry is measured on its own and stays finite.
  np.testing.assert_allclose(s.drift["per_module"]["head"], 0.0)


def test_drift_report_example():
  e = jepa_ema.ema(0.5, drift=True)
  s = e.update(
    {"w": jnp.array([5.0, jnp.nan, 5.0, 5.0])}, e.init({"w": jnp.ones(4)})
  )
  assert np.isnan(s.drift["global"])  # 0.4.0 said 0.0


@pytest.mark.parametrize("mode", MODES)
def test_drift_is_nan_when_the_target_holds_nan_and_the_params_are_zero(mode):
  """NaN in the target alone reads as NaN too, also where ``||params|| = 0``
  (there 0/0 reads 0: NaN must not take that branch)."""
  e = jepa_ema.ema(0.5, drift=True)
  state = e.init({"w": jnp.array([jnp.nan, 1.0])})
  s = _run(e.update, mode)({"w": jnp.zeros(2)}, state)
  assert np.isnan(s.drift["global"]) and np.isnan(s.drift["per_module"]["w"])


def test_drift_of_complex_leaves_counts_both_parts():
  """A complex leaf: ``|target - params|**2`` over real and imaginary
  parts (1 + 1j, then 3 + 3j at momentum 0.5: |(2+2j) - (3+3j)| / |3+3j|)."""
  e = jepa_ema.ema(0.5, drift=True)
  state = e.init({"w": jnp.array([1 + 1j], jnp.complex64)})
  s = e.update({"w": jnp.array([3 + 3j], jnp.complex64)}, state)
  np.testing.assert_allclose(s.drift["global"], 1 / 3, rtol=1e-6)


# ----------------------- 3. track_ema averages the params the step will hold

HALF = (jnp.bfloat16, jnp.float16)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("target_dtype", [None, jnp.float32])
@given(seed=st.integers(0, 2**16))
@example(seed=0)
@settings(max_examples=5, deadline=None)
def test_track_ema_under_jit_averages_exactly_the_rounded_params(
  dtype, target_dtype, seed
):
  """m = 0: the target is the post-step params, bitwise, under jit with the
  default XLA flags (XLA may fuse the rounding of ``params + updates`` away
  unless the EMA reads the held values)."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal(4096), dtype)}
  grads = {"w": jnp.asarray(rng.standard_normal(4096) * 0.01, dtype)}
  tx = optax.chain(optax.sgd(1.0), jepa_ema.track_ema(0.0, dtype=target_dtype))

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  new_params, opt_state = step(params, tx.init(params))
  # The independent reference: optax's own rounding, computed eagerly.
  updates, _ = optax.sgd(1.0).update(grads, optax.sgd(1.0).init(params))
  held = optax.apply_updates(params, updates)
  _assert_bitwise(new_params, held)
  target = jepa_ema.get_target(opt_state)
  want = jax.tree.map(lambda x: x.astype(target_dtype or dtype), held)
  _assert_bitwise(target, want)


def test_track_ema_bf16_report_example():
  params = {"w": jnp.array([1.0, 3.0], jnp.bfloat16)}
  grads = {"w": jnp.array([0.0117, -0.0117], jnp.bfloat16)}
  tx = optax.chain(optax.sgd(1.0), jepa_ema.track_ema(0.0, dtype=jnp.float32))

  def step(params, s):
    u, s = tx.update(grads, s, params)
    return optax.apply_updates(params, u), s

  for f in (step, jax.jit(step)):
    p, s = f(params, tx.init(params))
    np.testing.assert_array_equal(
      jepa_ema.get_target(s)["w"], np.asarray(p["w"], np.float32)
    )
    assert float(jepa_ema.get_target(s)["w"][1]) == 3.015625  # not 3.01171875


@pytest.mark.parametrize("dtype", HALF)
def test_ema_update_in_a_jitted_step_reads_the_rounded_params(dtype):
  """The same for ema().update and ema_update fed ``apply_updates``' output
  inside the caller's jit, at a momentum strictly inside (0, 1): jit gives
  the eager bits."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal(2048), dtype)}
  updates = {"w": jnp.asarray(rng.standard_normal(2048) * 0.01, dtype)}
  target = {"w": jnp.asarray(rng.standard_normal(2048), jnp.float32)}

  def step(target, params, updates):
    return jepa_ema.ema_update(
      target, optax.apply_updates(params, updates), 0, 0.25
    )

  _assert_bitwise(
    jax.jit(step)(target, params, updates), step(target, params, updates)
  )


# ------------------------------------ 4. ema_update takes every step make_ema_update takes


@given(step=st.integers(2**31, 2**62) | st.integers(-(2**62), -(2**31) - 1))
@example(step=2**31 + 3)  # the report's exact input
@settings(max_examples=10, deadline=None)
def test_ema_update_takes_python_int_steps_beyond_int32(step):
  sched = optax.linear_schedule(0.9, 1.0, 100)
  t, o = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  got = jepa_ema.ema_update(t, o, step, sched)
  want = jepa_ema.make_ema_update(sched, donate=False)(t, o, step)
  _assert_bitwise(got, want)
  got_np = jepa_ema.ema_update(t, o, np.int64(step), sched)
  _assert_bitwise(got_np, want)
  # The value: the schedule at the float32 step (clamped past its end).
  m = float(sched(np.float32(step)))
  np.testing.assert_allclose(got["w"], 1 - m, atol=1e-7)


# ------------------------------------------------------------- the rules


def test_rule_per_module_keys():
  """One entry per top-level entry holding an averaged floating leaf; the
  key is the entry's key (a list's index as a string); a bare array: {}."""
  e = jepa_ema.ema(
    0.5, drift=True, policy={"enc": "average", "bn": "copy", "n": "average"}
  )
  params = {"enc": jnp.ones(2), "bn": jnp.ones(2), "n": jnp.array(1)}
  s = e.update(params, e.init(params))
  assert sorted(s.drift["per_module"]) == ["enc"]
  e = jepa_ema.ema(0.5, drift=True)
  s = e.update([jnp.ones(2), jnp.ones(3)], e.init([jnp.ones(2), jnp.ones(3)]))
  assert sorted(s.drift["per_module"]) == ["0", "1"]
  s = e.update(jnp.ones(2), e.init(jnp.ones(2)))
  assert s.drift["per_module"] == {}


def _write_back_calls(every, n, calls=12, mode="eager"):
  """The calls on which track_ema(every=..., write_back_every=n) wrote back
  (the returned updates differ from the inner optimizer's)."""
  tx_inner = optax.sgd(0.1)
  tx = optax.chain(
    tx_inner,
    jepa_ema.track_ema(0.5, every=every, write_back_every=n, drift=n),
  )
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  update = _run(tx.update, mode)
  fired, drift_at = [], []
  last_drift = None
  for call in range(calls):
    grads = {"w": jnp.full(3, float(call + 1))}
    updates, state = update(grads, state, params)
    plain, _ = tx_inner.update(grads, tx_inner.init(params))
    if not np.array_equal(updates["w"], plain["w"]):
      fired.append(call)
    d = float(state[-1].drift["global"])
    if last_drift is not None and d != last_drift:
      drift_at.append(call)
    last_drift = d
    params = optax.apply_updates(params, updates)
  return fired, drift_at


@pytest.mark.parametrize("mode", MODES)
def test_rule_write_back_counts_target_updates_like_drift(mode):
  """every=2, N=3: the target updates on calls 1, 3, 5, ...; its updates
  2 and 5 (from 0) are calls 5 and 11, for write-back and drift alike
  (0.4.0 wrote back on calls 2, 5, 8, 11, two of them idle)."""
  fired, drift_at = _write_back_calls(2, 3, mode=mode)
  assert fired == [5, 11]
  assert drift_at == [5, 11]
  # every=2, N=2: the target's updates 1, 3, 5 (from 0) are calls 3, 7, 11.
  # (For N=3 above, counting calls instead happens to give the same calls.)
  fired, drift_at = _write_back_calls(2, 2, mode=mode)
  assert fired == [3, 7, 11]
  assert drift_at == [3, 7, 11]
  fired, _ = _write_back_calls(1, 3, mode=mode)
  assert fired == [2, 5, 8, 11]  # every=1: unchanged


def test_rule_precision_warning_judges_the_window_momentum():
  """ema(0.8, every=4) with a bfloat16 target applies 0.8**4 = 0.41 per
  update: rounded to nearest it stalls at 2**-8 / 0.59 = 0.66 % (< 1 %), no
  warning; per step, 0.8 would stall at 1.95 % (a warning without every)."""
  params = {"w": jnp.ones(4)}
  with warnings.catch_warnings():
    warnings.simplefilter("error", jepa_ema.PrecisionWarning)
    jepa_ema.ema(0.8, every=4, dtype=jnp.bfloat16).init(params)
  with pytest.warns(jepa_ema.PrecisionWarning):
    jepa_ema.ema(0.8, dtype=jnp.bfloat16).init(params)
  with pytest.warns(jepa_ema.PrecisionWarning):  # 0.99**4 = 0.96: 9.8 %
    jepa_ema.ema(0.99, every=4, dtype=jnp.bfloat16).init(params)


@given(
  base=st.floats(0.0, 1.0),
  span=st.floats(0.0, 1.0),
  total=st.floats(1.0, 5000.0),
  step=st.integers(0, 6000),
)
@example(base=0.0, span=1.0, total=7.5, step=3)  # the report's pair
@example(base=0.9, span=0.1, total=333.0, step=91)  # a fused multiply-add
@settings(max_examples=60, deadline=None)
def test_rule_a_schedule_is_within_2_pow_minus_23_however_evaluated(
  base, span, total, step
):
  """Eager, jit and vmap give one schedule's float32 value within 2**-23
  of each other (absolute): a division by a constant is written as the product with its
  float32 reciprocal (XLA's rewrite inside a program), so what is left is
  XLA fusing ``a * b + c`` into one fused multiply-add (measured: 2**-24
  at most over 60 random parameter sets of every schedule)."""
  final = base + (1.0 - base) * span
  scheds = [
    jepa_ema.cosine_momentum(base, final, total_steps=total),
    jepa_ema.linear_momentum(base, final, total_steps=total),
    jepa_ema.warmup_momentum(final, inv_gamma=total / 1000 + 0.5),
    jepa_ema.exp_warmup_momentum(final, tau=total),
    jepa_ema.power_momentum(gamma=total / 200 + 0.1),
  ]
  for sched in scheds:
    eager = np.float64(np.float32(sched(step)))
    jitted = np.float64(np.float32(jax.jit(sched)(step)))
    mapped = np.float64(np.asarray(jax.vmap(sched)(jnp.asarray([step])))[0])
    assert abs(eager - jitted) <= 2.0**-23, (sched, step, eager, jitted)
    assert abs(jitted - mapped) <= 2.0**-23, (sched, step, jitted, mapped)


def test_the_reported_cosine_pair_now_agrees_bitwise():
  """cosine_momentum(0, 1, 7.5) at step 3 was 0.34549153 eagerly and
  0.3454916 under jit (2 ulps): the division is now the product XLA makes
  of it, so both evaluate alike."""
  sched = jepa_ema.cosine_momentum(0.0, 1.0, total_steps=7.5)
  for step in range(10):
    assert np.float32(sched(step)) == np.float32(jax.jit(sched)(step)), step


def test_rule_read_back_momentum_is_the_applied_one():
  """Under jit, ema(...).momentum(state) equals the momentum the update
  applied, bitwise (both evaluate the schedule inside a program)."""
  sched = jepa_ema.cosine_momentum(0.0, 1.0, total_steps=7.5)
  ema = jepa_ema.ema(sched)
  update, read = jax.jit(ema.update), jax.jit(ema.momentum)
  state = ema.init({"w": jnp.zeros(1)})
  t = 0.0
  for step in range(8):
    state = update({"w": jnp.ones(1)}, state)
    m = np.float32(read(state))
    # Hand-worked: the target moves from t towards 1 by (1 - m).
    a = np.float32(1) - m
    t = (
      np.float32(t + a * (np.float32(1) - t))
      if a <= 0.5
      else np.float32(1 + m * (t - np.float32(1)))
    )
    assert np.float32(state.target["w"][0]) == t, step


def test_rule_m0_with_stochastic_rounding_rounds_the_online_value():
  """m = 0 with rounding='stochastic': a bfloat16 target is the online
  float32 value rounded stochastically (either neighbour, unbiased); a
  value bfloat16 holds exactly is copied exactly."""
  exact = jnp.asarray(np.linspace(-4, 4, 64), jnp.bfloat16).astype(jnp.float32)
  ema = jepa_ema.ema(0.0, dtype=jnp.bfloat16, rounding="stochastic", key=0)
  s = ema.update({"w": exact}, ema.init({"w": jnp.zeros(64)}))
  np.testing.assert_array_equal(s.target["w"].astype(jnp.float32), exact)
  x = np.float32(1.0 + 2**-10)  # between bfloat16 1.0 and 1.0078125
  lo, hi = np.float32(1.0), np.float32(1.0078125)
  online = {"w": jnp.full(4096, x)}
  s = ema.update(online, ema.init({"w": jnp.zeros(4096)}))
  got = np.asarray(s.target["w"].astype(jnp.float32))
  assert set(np.unique(got)) <= {lo, hi}
  # Unbiased: P(hi) = (x - lo) / (hi - lo) = 1/8; 6 sigma of a binomial.
  p, n = 0.125, got.size
  assert abs(np.mean(got == hi) - p) < 6 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("mode", MODES)
def test_rule_no_write_back_on_a_skipped_update(mode):
  """A due write-back does not fire on an update that `skipped` counts:
  with write_back_momentum=0 it would have replaced the NaN params by the
  target."""
  tx = optax.chain(
    optax.sgd(1.0),
    jepa_ema.track_ema(
      0.5, skip_nonfinite=True, write_back_every=1, write_back_momentum=0.0
    ),
  )
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  update = _run(tx.update, mode)
  grads = {"w": jnp.array([jnp.nan, 1.0])}
  updates, new = update(grads, state, params)
  assert int(new[-1].skipped) == 1
  plain, _ = optax.sgd(1.0).update(grads, optax.sgd(1.0).init(params))
  # The step's own updates (NaN's sign may differ by mode), no write-back.
  np.testing.assert_array_equal(updates["w"], plain["w"])
  # A finite step writes back: the params move to the just-updated target.
  grads = {"w": jnp.array([2.0, 2.0])}
  updates, new = update(grads, new, params)
  moved = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(moved["w"], jepa_ema.get_target(new)["w"])
