"""Every input a user can pass has a defined, tested behaviour.

The table of odd inputs (``tests/inputs_table.py``, rendered in
``docs/guarantees.md``) runs row by row; property tests draw mixed trees of
every leaf kind with random momenta; the rules behind the rows (the leaf
predicate, the dtype rule, the momentum's defined value, half-precision
rounding, real steps) are tested where they have more cases than a row.
"""

import functools
import warnings
from typing import Any

import chex
import inputs_table
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from inputs_table import run_to_one, stochastic_mean_bound
from jax.experimental import checkify

import jepa_ema

# ----------------------------------------------------------------- the table


@pytest.mark.parametrize(
  "row",
  inputs_table.ROWS,
  ids=[f"{r.group}: {r.what}" for r in inputs_table.ROWS],
)
def test_row(row):
  ns = inputs_table.namespace()
  run = lambda: eval(row.call, ns)  # pylint: disable=eval-used
  if row.raises is not None:
    with pytest.raises(row.raises, match=row.match):
      run()
  elif row.warns is not None:
    with pytest.warns(row.warns, match=row.match):
      run()
  else:
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # a defined behaviour warns only if said
      out = run()
    row.check(out)


def test_every_row_says_what_happens():
  for row in inputs_table.ROWS:
    said = [row.raises, row.warns, row.check]
    assert sum(x is not None for x in said) == 1, row.what
    assert row.group in (
      "momentum",
      "trees",
      "leaves",
      "policy",
      "placement",
      "steps",
    ), row.group


def test_docs_render_the_table():
  assert inputs_table.current() == inputs_table.render(), (
    "docs/guarantees.md is stale: python tests/inputs_table.py --write"
  )
  for row in inputs_table.ROWS:
    assert row.call.replace("|", r"\|") in inputs_table.current()


# ------------------------------------------------ property tests: mixed trees

FLOAT_KINDS = ["float16", "bfloat16", "float32", "float64", "complex64", "py"]
OTHER_KINDS = ["int32", "uint8", "bool", "key", "none"]

values = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@st.composite
def leaf_pairs(draw, kind):
  """(target leaf, online leaf) of one kind; online floats may be another
  real dtype (a complex target may take a real online leaf). Array values
  are random normals at a drawn scale, some elements equal on both sides."""
  if kind == "none":
    return None, None
  if kind == "py":
    return draw(values), draw(values)
  shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
  size = int(np.prod(shape))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  scale = 10.0 ** draw(st.integers(-3, 3))  # float16 range: 65504
  same = rng.random(size) < draw(st.sampled_from([0.0, 0.3]))

  def real():
    return (rng.standard_normal(size) * scale).astype(np.float32)

  def pair_of_reals():
    a, b = real(), real()
    return a, np.where(same, a, b)

  if kind == "key":
    seeds = draw(st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2))
    return jax.random.key(seeds[0]), jax.random.key(seeds[1])
  if kind in ("int32", "uint8", "bool"):
    lo, hi = {"int32": (-100, 100), "uint8": (0, 255), "bool": (0, 1)}[kind]
    ints = lambda: np.array(
      draw(st.lists(st.integers(lo, hi), min_size=size, max_size=size))
    )
    return (
      jnp.asarray(ints().reshape(shape).astype(kind)),
      jnp.asarray(ints().reshape(shape).astype(kind)),
    )
  if kind == "complex64":
    (tr, or_), (ti, oi) = pair_of_reals(), pair_of_reals()
    t = (tr + 1j * ti).reshape(shape).astype(np.complex64)
    o_kind = draw(st.sampled_from(["complex64", "float32"]))
    o = (or_ + (1j * oi if o_kind == "complex64" else 0)).reshape(shape)
    return jnp.asarray(t), jnp.asarray(o.astype(o_kind))
  o_kind = draw(st.sampled_from([kind, "float32", "bfloat16", "float16"]))
  t, o = (x.reshape(shape) for x in pair_of_reals())
  to = lambda x, k: (
    x.astype(np.float64) if k == "float64" else jnp.asarray(x).astype(k)
  )
  return to(t, kind), to(o, o_kind)


@st.composite
def mixed_trees(draw):
  kinds = draw(
    st.lists(st.sampled_from(FLOAT_KINDS + OTHER_KINDS), min_size=1, max_size=8)
  )
  pairs = [draw(leaf_pairs(k)) for k in kinds]
  # Nest them: some in a dict, some in a list under one key, some at the top.
  split = draw(st.integers(0, len(pairs)))
  t = {f"a{i}": p[0] for i, p in enumerate(pairs[:split])}
  o = {f"a{i}": p[1] for i, p in enumerate(pairs[:split])}
  t["sub"] = [p[0] for p in pairs[split:]]
  o["sub"] = [p[1] for p in pairs[split:]]
  return t, o


def _f64(x):
  x = np.asarray(x)
  return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _defined_momentum(m):
  """The value a (traced) momentum gets: NaN/Inf -> 1, else clip to [0, 1]."""
  return 1.0 if not np.isfinite(m) else float(np.clip(np.float32(m), 0, 1))


def check_output(target, online, out, m, stochastic=False):
  """Structure, dtypes and the documented rule for every leaf of ``out``.

  Floating leaves lie between the target and the online value rounded to
  the target's dtype (to nearest; with ``stochastic`` rounding, outward) and
  match the blend of the defined momentum to an ulp (two with stochastic
  rounding); other leaves are the online ones, or the target's where a
  non-finite momentum skipped the update (the whole target is kept)."""
  skipped = not np.isfinite(m)
  m = _defined_momentum(m)
  assert jax.tree.structure(out) == jax.tree.structure(target)
  flat_t = jax.tree.leaves(target)
  flat_o = jax.tree.structure(target).flatten_up_to(online)
  for t, o, y in zip(flat_t, flat_o, jax.tree.leaves(out)):
    if isinstance(t, jax.Array) and jnp.issubdtype(
      t.dtype, jax.dtypes.prng_key
    ):
      assert y.dtype == t.dtype
      np.testing.assert_array_equal(
        jax.random.key_data(y), jax.random.key_data(t if skipped else o)
      )
      continue
    want = jepa_ema_leaf_dtype(t)
    assert np.asarray(y).dtype == want, (y, want)
    if not jnp.issubdtype(want, jnp.inexact):
      np.testing.assert_array_equal(
        np.asarray(y), np.asarray(t if skipped else o)
      )
      continue
    # Floating: between the target and the online value rounded to the
    # target's dtype, and the blend of the defined momentum to a few ulps.
    tv = _f64(jnp.asarray(t).astype(want))
    ov = _f64(jnp.asarray(o).astype(want))
    yv = _f64(y)
    o_down = o_up = ov
    half = want in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if stochastic and half:
      o_down, o_up = _outward(o, want)
    parts = (np.real, np.imag) if np.iscomplexobj(yv) else (np.real,)
    eps = float(jnp.finfo(want).eps) * (2 if stochastic else 1)
    # Absolute: a subnormal spacing of a half dtype (rounded from float32),
    # float32's smallest normal where XLA:CPU may flush to zero.
    fin = jnp.finfo(np.real(np.empty(0, want)).dtype)
    floor = float(fin.smallest_subnormal if half else fin.tiny) * 2
    for part in parts:
      ends = [part(tv), part(o_down), part(o_up)]
      ends += [_flushed(e, want) for e in ends]  # XLA:CPU may flush
      lo, hi = np.minimum.reduce(ends), np.maximum.reduce(ends)
      assert np.all((part(yv) >= lo) & (part(yv) <= hi)), (t, o, y, m)
      ref = m * part(tv) + (1 - m) * part(ov)
      tol = eps * (np.abs(part(tv)) + np.abs(part(ov))) + floor
      assert np.all(np.abs(part(yv) - ref) <= tol), (t, o, y, m)


def _flushed(x, dtype):
  """``x`` with the subnormals of ``dtype`` read as zero."""
  tiny = float(jnp.finfo(np.real(np.empty(0, dtype)).dtype).tiny)
  return np.where(np.abs(x) < tiny, 0.0, x)


def _outward(o, dtype):
  """The representable neighbours of ``o`` in ``dtype``, below and above."""
  o32 = jnp.asarray(o).astype(jnp.float32)
  n = o32.astype(dtype)
  n32 = n.astype(jnp.float32)
  down = jnp.where(n32 > o32, jnp.nextafter(n, jnp.array(-jnp.inf, dtype)), n)
  up = jnp.where(n32 < o32, jnp.nextafter(n, jnp.array(jnp.inf, dtype)), n)
  return _f64(down), _f64(up)


def jepa_ema_leaf_dtype(x):
  """The dtype the result must have: the target's (as JAX canonicalises it)."""
  if isinstance(x, (float, int)):
    return np.dtype(jnp.result_type(x))
  return np.dtype(jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))


momenta = st.one_of(
  st.floats(0.0, 1.0),
  st.floats(-2.0, 3.0),
  st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1.0]),
)


def _corner_trees():
  """Known corners, pinned as explicit examples of the property tests:
  ``o - t`` beyond the range of the blend's dtype (float32, and so bfloat16
  and complex64 too), subnormals, signed zeros."""
  big = float(np.finfo(np.float32).max)
  sub = float(np.finfo(np.float32).smallest_subnormal)
  f32 = lambda *v: jnp.array(v, jnp.float32)
  bf16 = lambda *v: jnp.array(v, jnp.bfloat16)
  f16 = lambda *v: jnp.array(v, jnp.float16)
  overflow = (
    {
      "f32": f32(big, -3e38, 1.7e38),
      "bf16": bf16(3e38, -3.3e38),
      "c64": jnp.array([3e38 - 3e38j], jnp.complex64),
      "f16": f16(65504.0, -65504.0),
    },
    {
      "f32": f32(-big, 3e38, -1.7e38),
      "bf16": bf16(-3e38, 3.3e38),
      "c64": jnp.array([-3e38 + 3e38j], jnp.complex64),
      "f16": f16(-65504.0, 65504.0),
    },
  )
  subnormal = (
    {"f32": f32(sub, 3e-39, -1e-40), "f16": f16(6e-8, 3e-5, -6e-8)},
    {"f32": f32(3 * sub, 1e-39, 1e-40), "f16": f16(1.2e-7, 6e-8, 0.0)},
  )
  zeros = (
    {"f32": f32(-0.0, 0.0, -0.0), "bf16": bf16(-0.0, 0.0)},
    {"f32": f32(0.0, -0.0, -0.0), "bf16": bf16(-0.0, -0.0)},
  )
  return overflow, subnormal, zeros


CORNERS = _corner_trees()


def with_corners(test, extra=None):
  """``test`` with every corner tree as an explicit example at m = 0.3, 0.5
  and 0.999 (``extra``: more keyword arguments of the examples)."""
  for trees in CORNERS:
    for m in (0.3, 0.5, 0.999):
      test = example(trees=trees, m=m, **(extra or {}))(test)
  return test


@given(trees=mixed_trees(), m=momenta, x64=st.booleans())
@functools.partial(with_corners, extra={"x64": False})
def test_property_mixed_trees(trees, m, x64):
  target, online = trees
  with jax.enable_x64(x64):
    if 0.0 <= m <= 1.0:  # a concrete momentum: eager
      out = jepa_ema.ema_update(target, online, 0, m)
      check_output(target, online, out, m)
    # Any momentum, traced (NaN, Inf and out-of-range values included).
    out = jax.jit(jepa_ema.ema_update)(target, online, 0, jnp.float32(m))
    check_output(target, online, out, m)


@given(trees=mixed_trees(), m=momenta)
@with_corners
def test_property_mixed_trees_through_ema(trees, m):
  """The stateful wrapper follows the same rules (its target is a copy of
  the params at init), and counts a non-finite momentum as skipped."""
  target, online = trees
  ema = jepa_ema.ema(
    lambda step: jnp.float32(m) + 0 * jnp.asarray(step, jnp.float32)
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jepa_ema.PrecisionWarning)
    state = ema.init(target)
  state = jax.jit(ema.update)(online, state)
  check_output(target, online, state.target, m)
  assert int(state.skipped) == (0 if np.isfinite(m) else 1)


@given(trees=mixed_trees(), m=momenta, key=st.integers(0, 2**31 - 1))
@functools.partial(with_corners, extra={"key": 7})
def test_property_mixed_trees_stochastic_rounding(trees, m, key):
  """With rounding="stochastic" the same rules hold, half-precision leaves
  rounded to one of the two neighbours of the blend (outward at most); a
  tree without half-precision leaves is refused at init."""
  target, online = trees
  ema = jepa_ema.ema(
    lambda step: jnp.float32(m) + 0 * jnp.asarray(step, jnp.float32),
    rounding="stochastic",
    key=key,
  )
  half = [
    x
    for x in jax.tree.leaves(target)
    if hasattr(x, "dtype")
    and not jnp.issubdtype(x.dtype, jax.dtypes.extended)  # PRNG keys
    and np.dtype(x.dtype) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
  ]
  if not half:
    with pytest.raises(ValueError, match="half-precision target leaves"):
      ema.init(target)
    return
  state = jax.jit(ema.update)(online, ema.init(target))
  check_output(target, online, state.target, m, stochastic=True)


# ------------------------------------------------------------ the dtype rule


@pytest.mark.parametrize(
  "t,o,match",
  [
    (jnp.array([1, 2]), jnp.array([1.0, 2.0]), "int32.*float32"),
    (jnp.array([True]), jnp.array([1]), "bool.*int32"),
    (jnp.array(1, jnp.uint8), jnp.array(1, jnp.int32), "uint8.*int32"),
    (jax.random.key(0), jnp.array(0, jnp.uint32), "key<fry>.*uint32"),
    (jnp.zeros(2), jnp.array([True, False]), "float32.*bool"),
    (jnp.zeros(2), jax.random.split(jax.random.key(0)), "float32.*key"),
    (jnp.zeros(2, jnp.bfloat16), jnp.ones(2, jnp.complex64), "complex64"),
  ],
)
def test_dtype_rule_names_path_and_dtypes(t, o, match, maybe_jit):
  with pytest.raises(TypeError, match=r"\['enc'\]\['x'\].*" + match):
    maybe_jit(jepa_ema.ema_update)({"enc": {"x": t}}, {"enc": {"x": o}}, 0, 0.5)


def test_dtype_rule_allows_casts_that_lose_nothing(maybe_jit):
  target = {
    "f32": jnp.zeros(2),
    "bf16": jnp.zeros(2, jnp.bfloat16),
    "c64": jnp.zeros(2, jnp.complex64),
  }
  online = {
    "f32": jnp.array([2, 4], jnp.int32),  # integers cast to the target
    "bf16": jnp.ones(2),  # wider floats rounded once
    "c64": jnp.ones(2),  # a real value is a complex one
  }
  out = maybe_jit(jepa_ema.ema_update)(target, online, 0, 0.5)
  np.testing.assert_array_equal(out["f32"], [1.0, 2.0])
  assert out["bf16"].dtype == jnp.bfloat16 and out["c64"].dtype == jnp.complex64
  np.testing.assert_array_equal(out["c64"], [0.5, 0.5])


def test_dtype_rule_compares_the_dtypes_jax_gives():
  """NumPy int64 is int32 to JAX unless x64 is on: taken from online as a
  JAX int32 array then, a TypeError with x64."""
  target, online = {"n": jnp.array(3)}, {"n": np.array(4, np.int64)}
  out = jepa_ema.ema_update(target, online, 0, 0.5)
  assert isinstance(out["n"], jax.Array) and out["n"].dtype == jnp.int32
  assert int(out["n"]) == 4
  with jax.enable_x64(True):
    with pytest.raises(TypeError, match=r"\['n'\].*int32.*int64"):
      jepa_ema.ema_update({"n": jnp.array(3, jnp.int32)}, online, 0, 0.5)


def test_ema_init_keeps_complex_leaves_with_a_real_dtype():
  params = {"w": jnp.ones(2, jnp.bfloat16), "z": jnp.full(2, 1j, jnp.complex64)}
  state = jepa_ema.ema(0.5, dtype=jnp.float32).init(params)
  assert state.target["w"].dtype == jnp.float32
  assert state.target["z"].dtype == jnp.complex64
  np.testing.assert_array_equal(state.target["z"], params["z"])


# ------------------------------------------------- complex leaves everywhere


def test_complex_drift_counts_both_parts():
  params = {"z": jnp.array([3 + 4j, 0], jnp.complex64), "r": jnp.ones(2)}
  ema = jepa_ema.ema(0.5, drift=True)
  state = ema.update(params, ema.init(jax.tree.map(jnp.zeros_like, params)))
  t, p = state.target, params
  d2 = sum(np.sum(np.abs(_f64(t[k]) - _f64(p[k])) ** 2) for k in p)
  n2 = sum(np.sum(np.abs(_f64(p[k])) ** 2) for k in p)
  np.testing.assert_allclose(state.drift["global"], np.sqrt(d2 / n2), 1e-6)
  np.testing.assert_allclose(state.drift["per_module"]["z"], 0.5, 1e-6)


def test_skip_nonfinite_sees_complex_nan_and_huge_finite_values():
  ema = jepa_ema.ema(0.5, skip_nonfinite=True)
  state = ema.init({"z": jnp.zeros(1, jnp.complex64)})
  big = jnp.array([3e38 + 3e38j], jnp.complex64)  # |z| overflows, z is finite
  state = ema.update({"z": big}, state)
  assert int(state.skipped) == 0
  state = ema.update({"z": jnp.array([1 + 1j * np.nan], jnp.complex64)}, state)
  assert int(state.skipped) == 1
  np.testing.assert_array_equal(state.target["z"], big / 2)


@pytest.mark.parametrize(
  "dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16, jnp.float16]
)
def test_skip_nonfinite_on_narrow_params(dtype):
  """float8_e4m3fn has no Inf: a NaN check written as ``max|x| < inf``
  compared with NaN and skipped every update. Finite params of every narrow
  dtype update; a NaN in them is skipped."""
  ema = jepa_ema.ema(0.5, skip_nonfinite=True, dtype=jnp.float32)
  state = ema.init({"w": jnp.zeros(3, dtype)})
  big = float(jnp.finfo(dtype).max)
  state = ema.update({"w": jnp.array([1.0, big, -big], dtype)}, state)
  assert int(state.skipped) == 0
  np.testing.assert_array_equal(state.target["w"], [0.5, big / 2, -big / 2])
  state = ema.update({"w": jnp.array([1.0, np.nan, 0.0], dtype)}, state)
  assert int(state.skipped) == 1
  np.testing.assert_array_equal(state.target["w"], [0.5, big / 2, -big / 2])


def test_posthoc_reconstructs_complex_leaves():
  a = {"z": jnp.array([1 + 1j], jnp.complex64), "n": jnp.array(3)}
  b = {"z": jnp.array([3 - 1j], jnp.complex64), "n": jnp.array(4)}
  out = jepa_ema.posthoc_reconstruct(
    [(10, 0.05, a), (10, 0.05, b)], sigma_rel=0.05, step=10
  )
  assert out["z"].dtype == jnp.complex64 and int(out["n"]) == 4
  np.testing.assert_allclose(out["z"], [2 + 0j], atol=1e-6)


# ------------------------------------------- the momentum's defined value


@pytest.mark.parametrize("every", [1, 3])
def test_traced_nan_momentum_counts_as_one_step_of_no_change(every):
  """A NaN momentum at step 4 of 6: the target equals the per-step EMA that
  leaves step 4 out, with every=1 and inside an every=3 window; skipped
  counts the update (window) once."""
  bad = 4
  sched = lambda s: jnp.where(
    s == bad, jnp.nan, 0.5 + 0.05 * jnp.asarray(s, jnp.float32)
  )
  ema = jepa_ema.ema(sched, every=every)
  state = ema.init({"w": jnp.zeros(3)})
  update = jax.jit(ema.update)
  ref = np.zeros(3)
  for s in range(6):
    p = np.full(3, float(s + 1))
    state = update({"w": jnp.asarray(p, jnp.float32)}, state)
    if s != bad:
      m = 0.5 + 0.05 * s
      if every == 1:
        ref = m * ref + (1 - m) * p
  if every == 3:  # two windows, params constant within none: product form
    m1 = np.prod([0.5 + 0.05 * s for s in range(3)])
    m2 = np.prod([0.5 + 0.05 * s for s in (3, 5)])
    ref = m1 * ref + (1 - m1) * np.full(3, 3.0)
    ref = m2 * ref + (1 - m2) * np.full(3, 6.0)
  np.testing.assert_allclose(state.target["w"], ref, rtol=1e-6)
  assert int(state.skipped) == 1


def test_checkify_reports_out_of_range_and_is_silent_in_range():
  checked = jepa_ema.checked_momentum
  f = checkify.checkify(
    jax.jit(lambda t, o, s, m: jepa_ema.ema_update(t, o, s, checked(m)))
  )
  t, o = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  err, out = f(t, o, 3, jnp.float32(1.25))
  assert "momentum 1.25 at step 3 is outside [0, 1]" in err.get()
  np.testing.assert_array_equal(out["w"], 0.0)
  for m in (0.0, 0.5, 1.0):
    err, _ = f(t, o, 3, jnp.float32(m))
    assert err.get() is None
  # Unchecked (the default), checkify sees nothing: no effect was traced.
  err, _ = checkify.checkify(jax.jit(jepa_ema.ema_update))(
    t, o, 3, jnp.float32(1.25)
  )
  assert err.get() is None
  # Inside ema's every=k window (a lax.cond) too.
  ema = jepa_ema.ema(checked(lambda s: 0.5 + jnp.log(-1 - s)), every=2)
  err, _ = checkify.checkify(jax.jit(ema.update))(o, ema.init(t))
  assert err.get() is None  # step 0: no update, nothing evaluated
  state = ema.update(o, ema.init(t))  # eager, now at step 1
  err, _ = checkify.checkify(jax.jit(ema.update))(o, state)
  assert "outside [0, 1]" in err.get()


def _effects(f: Any, *args: Any) -> Any:
  return jax.make_jaxpr(f)(*args).effects


def test_the_default_update_has_no_effect_so_jit_keeps_its_fast_path():
  """What the update's speed relies on (benchmarks/ema_bench.py measures it):
  no entry point traces an effect by default, with a traced momentum or a
  schedule, in a train step with track_ema too. An effect (a checkify check,
  a callback) takes every call of the user's jitted step off JAX's C++
  dispatch path: about 17 us more per argument, 5 ms per call for a
  150-leaf ViT-B target (17 % of its update on 2 CPU cores). Checked
  momenta do trace one, as documented."""
  t, o = (
    {"w": jnp.zeros(8), "b": jnp.zeros(2)},
    {"w": jnp.ones(8), "b": jnp.ones(2)},
  )
  sched = jepa_ema.cosine_momentum(0.5, 1.0, total_steps=10)
  assert not _effects(jepa_ema.ema_update, t, o, 3, jnp.float32(0.9))
  assert not _effects(
    lambda t, o, s: jepa_ema.ema_update(t, o, s, sched), t, o, 3
  )
  update_fn = jepa_ema.make_ema_update(sched)
  assert not _effects(update_fn, t, o, jnp.int32(3))
  for kw in ({}, {"every": 3}, {"skip_nonfinite": True, "drift": True}):
    ema = jepa_ema.ema((sched, 0.9), **kw)
    assert not _effects(ema.update, o, ema.init(t)), kw
    assert not _effects(ema.momentum, ema.init(t)), kw
  tx = optax.chain(optax.sgd(0.1), jepa_ema.track_ema(sched))
  step = lambda g, s, p: tx.update(g, s, p)
  assert not _effects(step, o, tx.init(t), t)
  assert _effects(
    lambda t, o, s: jepa_ema.ema_update(
      t, o, s, jepa_ema.checked_momentum(sched)
    ),
    t,
    o,
    3,
  )


def test_the_check_adds_nothing_to_the_compiled_update():
  """Without checkify, a checked momentum's debug check leaves no trace in
  the compiled program: no callback or custom call (its cost is the effect's
  slow dispatch path, not device work)."""
  t, o = {"w": jnp.zeros(1024)}, {"w": jnp.ones(1024)}
  f = lambda t, o, s, m: jepa_ema.ema_update(
    t, o, s, jepa_ema.checked_momentum(m)
  )
  hlo = jax.jit(f).lower(t, o, 0, jnp.float32(0.9)).as_text()
  for word in ("callback", "custom_call", "check"):
    assert word not in hlo.lower(), word


def test_clip_happens_before_the_window_product():
  ema = jepa_ema.ema(lambda s: 2.0 + 0 * s.astype(jnp.float32), every=2)
  state = ema.init({"w": jnp.zeros(2)})
  update = jax.jit(ema.update)
  for _ in range(2):
    state = update({"w": jnp.ones(2)}, state)
  np.testing.assert_array_equal(state.target["w"], 0.0)  # m clipped to 1
  assert int(state.skipped) == 0  # finite: clipped, not skipped


# ------------------------------------------------- half-precision targets


@pytest.mark.parametrize(
  "dtype,m,warns",
  [
    (jnp.float16, 0.999, True),  # stalls 49 % away
    (jnp.float16, 0.99, True),  # 4.9 %
    (jnp.float16, 0.9, False),  # 0.49 %
    (jnp.bfloat16, 0.9, True),  # 3.9 %
    (jnp.bfloat16, 0.5, False),  # 0.78 %
    (jnp.bfloat16, 1.0, False),  # m = 1: meant to stand still
    (jnp.float32, 0.99999, False),  # not half precision
  ],
)
def test_precision_warning_threshold(dtype, m, warns):
  u = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
  assert warns == (dtype != jnp.float32 and m < 1 and u / (1 - m) > 0.01)
  params = {"enc": {"w": jnp.zeros(3, dtype)}, "n": jnp.array(1)}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jepa_ema.ema(m).init(params)
    jepa_ema.track_ema(jepa_ema.cosine_momentum(m, 1.0, total_steps=10)).init(
      params
    )
  found = [w for w in caught if w.category is jepa_ema.PrecisionWarning]
  assert len(found) == (2 if warns else 0), [str(w.message) for w in caught]
  if warns:
    assert "['enc']['w']" in str(found[0].message)
    assert f"{u / (1 - m):.3g}" in str(found[0].message)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_targets_are_blended_and_warned_about(dtype):
  """float8 leaves are floating: blended, dtype kept; at m = 0.9 a float8
  target stalls 62 % / 125 % away, so init warns, without suggesting the
  stochastic rounding it does not have."""
  out = jepa_ema.ema_update(
    {"w": jnp.zeros(2, dtype)}, {"w": jnp.ones(2, dtype)}, 0, 0.5
  )
  assert out["w"].dtype == dtype
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 0.5)
  with pytest.warns(jepa_ema.PrecisionWarning, match="float8") as caught:
    jepa_ema.ema(0.9).init({"w": jnp.zeros(2, dtype)})
  assert "stochastic" not in str(caught[0].message)
  with pytest.raises(ValueError, match="half-precision"):
    jepa_ema.ema(0.9, dtype=dtype, rounding="stochastic")


def test_precision_warning_sees_a_warmup_that_starts_at_zero():
  """timm's warm-up starts at m(0) = 0, then rises: the largest momentum
  below 1 at the probed steps is what stalls the target."""
  sched = jepa_ema.warmup_momentum(max_momentum=0.999)
  m = max(float(sched(s)) for s in (0, 1, 10, 100, 1000, 10**4, 10**5, 10**6))
  assert float(sched(0)) == 0.0 and m == pytest.approx(0.999)
  with pytest.warns(jepa_ema.PrecisionWarning, match=r"momentum 0\.999 \(step"):
    jepa_ema.ema(sched).init({"w": jnp.zeros(3, jnp.float16)})
  # float16 at a momentum that never exceeds 0.9: 0.49 %, tolerated.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jepa_ema.ema(jepa_ema.warmup_momentum(max_momentum=0.9)).init(
      {"w": jnp.zeros(3, jnp.float16)}
    )


def test_make_ema_update_warns_on_its_first_and_each_compiling_call():
  """One function: warns on its first call, not on calls that reuse the
  compiled program, again on a call that compiles (a new shape), and not on
  a compiling call whose target is safe (float32)."""
  fn = jepa_ema.make_ema_update(0.999)
  t16 = {"w": jnp.zeros(3, jnp.float16)}
  with pytest.warns(jepa_ema.PrecisionWarning, match="float16"):
    t16 = fn(t16, {"w": jnp.ones(3, jnp.float16)}, 0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for step in (1, 2):  # no new compilation: no new check
      t16 = fn(t16, {"w": jnp.ones(3, jnp.float16)}, step)
  before = fn._cache_size()
  with pytest.warns(jepa_ema.PrecisionWarning, match="bfloat16"):
    fn({"w": jnp.zeros(5, jnp.bfloat16)}, {"w": jnp.ones(5, jnp.bfloat16)}, 3)
  assert fn._cache_size() == before + 1  # that call compiled
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fn({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 4)  # compiles; float32 is safe
    fn({"w": jnp.zeros(5, jnp.bfloat16)}, {"w": jnp.ones(5, jnp.bfloat16)}, 5)
  assert fn._cache_size() == before + 2


def test_no_precision_warning_when_the_target_is_safe():
  params = {"w": jnp.zeros(3, jnp.bfloat16)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jepa_ema.ema(0.999, dtype=jnp.float32).init(params)
    jepa_ema.ema(0.999, rounding="stochastic").init(params)
    jepa_ema.ema(0.999, dtype=jnp.float16, rounding="stochastic").init(params)
    jax.jit(jepa_ema.ema(lambda s: jnp.asarray(s, jnp.float32) * 0.0).init)(
      params
    )


def test_precision_warning_under_jit_init():
  """init inside jit still warns: the schedule is evaluated at compile time."""
  params = {"w": jnp.zeros(3, jnp.float16)}
  with pytest.warns(jepa_ema.PrecisionWarning):
    jax.jit(jepa_ema.ema(0.999).init)(params)


def test_float16_stochastic_is_unbiased_where_nearest_stagnates():
  m, n = 0.999, 4096
  for steps in (500, 2000):
    exact = 1 - m**steps
    sr = run_to_one(
      jepa_ema.ema(m, rounding="stochastic"), n, steps, jnp.float16
    )
    with pytest.warns(jepa_ema.PrecisionWarning):  # said at init
      rn = run_to_one(jepa_ema.ema(m), n, steps, jnp.float16)
    assert sr.target.dtype == jnp.float16
    bound = stochastic_mean_bound(2.0**-11, m, n)
    sr_mean = float(np.mean(np.asarray(sr.target, np.float64)))
    assert abs(sr_mean - exact) < bound, (steps, sr_mean, exact, bound)
  assert float(np.mean(np.asarray(rn.target, np.float64))) < exact - 0.1


def test_float16_stochastic_rounding_exact_cases_and_bounds():
  key = jax.random.key(3)
  t = jax.random.normal(key, (2000,)).astype(jnp.float16)
  o = (jax.random.normal(jax.random.fold_in(key, 1), (2000,)) * 3).astype(
    jnp.float16
  )
  ema = jepa_ema.ema(
    lambda s: jnp.float32(0.9) + 0 * jnp.asarray(s, jnp.float32),
    rounding="stochastic",
    key=7,
  )
  state = ema.init(t)
  for m, want in ((1.0, t), (0.0, o)):
    s = jepa_ema.ema(m, rounding="stochastic", key=7).update(o, state)
    np.testing.assert_array_equal(s.target, want)
  s = ema.update(t, state)  # a fixed point stays put
  np.testing.assert_array_equal(s.target, t)
  out = np.asarray(ema.update(o, state).target, np.float32)
  lo = np.minimum(np.asarray(t, np.float32), np.asarray(o, np.float32))
  hi = np.maximum(np.asarray(t, np.float32), np.asarray(o, np.float32))
  assert np.all((out >= lo) & (out <= hi))
  # Each output is one of the two float16 neighbours of the float32 blend
  # (computed as the library does: t + (1 - m)(o - t) for 1 - m <= 1/2,
  # widened by one float32 ulp for a fused multiply-add), and the roundings
  # are unbiased: (out - x) / gap is a centred Bernoulli variable.
  t32, o32 = np.asarray(t, np.float32), np.asarray(o, np.float32)
  x = t32 + (np.float32(1) - np.float32(0.9)) * (o32 - t32)
  lo_x, hi_x = np.nextafter(x, -np.inf), np.nextafter(x, np.inf)
  floor = _f16_floor(lo_x)
  ceil = -_f16_floor(-hi_x)
  assert np.all((out >= floor) & (out <= ceil))
  nearest = x.astype(np.float16).astype(np.float32)  # x itself if float16
  assert np.all((out == floor) | (out == ceil) | (out == nearest))
  gap = np.where(ceil > floor, ceil - floor, 1.0)
  frac = (out.astype(np.float64) - x) / gap
  assert abs(frac.mean()) < 6 * 0.5 / np.sqrt(frac.size), frac.mean()


def _f16_floor(x):
  """The largest float16 <= x (float32 in, float32 out)."""
  n = x.astype(np.float16)
  n = np.where(
    n.astype(np.float32) > x, np.nextafter(n, np.float16(-np.inf)), n
  )
  return n.astype(np.float32)


@pytest.mark.parametrize(
  "value",
  [1.2345, -3.3e3, 2.5e-5, -7.7e-7, 3.1e-8, -1e-9],
  ids=["normal", "large", "subnormal", "deep-subnormal", "below-2^-24", "tiny"],
)
def test_float16_stochastic_is_unbiased_in_every_range(value):
  """m = 0 rounds the online float32 value into the float16 target: over
  2**16 elements the mean is the value within 6 standard errors, and every
  element is one of its two float16 neighbours."""
  n = 1 << 16
  ema = jepa_ema.ema(0.0, rounding="stochastic", key=11)
  state = ema.init(jnp.zeros(n, jnp.float16))
  out = np.asarray(
    ema.update(jnp.full(n, value, jnp.float32), state).target, np.float64
  )
  v = float(np.float32(value))
  down = float(_f16_floor(np.array([v], np.float32))[0])
  up = float(-_f16_floor(np.array([-v], np.float32))[0])
  assert set(np.unique(out)) <= {down, up}, (np.unique(out), down, up)
  sem = (up - down) / 2 / np.sqrt(n)
  assert abs(out.mean() - v) < 6 * sem + 1e-12 * abs(v), (out.mean(), v)
  if down != up:  # both neighbours occur (the rounding is random)
    assert len(np.unique(out)) == 2


def test_float16_stochastic_edge_values():
  """NaN stays NaN, values beyond the float16 range round to nearest (inf),
  the float16 maximum and the smallest subnormal are reached exactly."""
  fmax = float(jnp.finfo(jnp.float16).max)
  tiny = float(jnp.finfo(jnp.float16).smallest_subnormal)
  t = jnp.array([np.nan, fmax, 0.0, 0.0, -fmax], jnp.float16)
  o = jnp.array([1.0, 7e4, tiny, -tiny, -1e5], jnp.float32)
  ema = jepa_ema.ema(0.0, rounding="stochastic")
  out = np.asarray(ema.update(o, ema.init(t)).target, np.float32)
  np.testing.assert_array_equal(out, [1.0, np.inf, tiny, -tiny, -np.inf])
  ema = jepa_ema.ema(1.0, rounding="stochastic")
  out = np.asarray(ema.update(o, ema.init(t)).target, np.float32)
  assert np.isnan(out[0]) and out[1] == fmax


def test_stochastic_rounding_rejects_targets_without_half_leaves():
  with pytest.raises(ValueError, match="half-precision target leaves"):
    jepa_ema.ema(0.9, rounding="stochastic").init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="bfloat16 or jnp.float16"):
    jepa_ema.ema(0.9, dtype=jnp.float32, rounding="stochastic")


# ------------------------------------------------------------- real steps


@pytest.mark.parametrize(
  "schedule",
  [
    jepa_ema.constant_momentum(0.9),
    jepa_ema.cosine_momentum(0.9, 1.0, total_steps=100),
    jepa_ema.linear_momentum(0.9, 1.0, total_steps=100),
    jepa_ema.warmup_momentum(),
    jepa_ema.scale_momentum(
      jepa_ema.linear_momentum(0.9, 1.0, total_steps=100), 2
    ),
    jepa_ema.halflife_momentum(10.0, rampup=0.05),
    jepa_ema.power_momentum(sigma_rel=0.1),
  ],
  ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize(
  "step", [2**31, 2**40, 10**400, np.int64(2**35), np.array([2**33, 5])]
)
def test_schedules_take_huge_steps_as_reals(schedule, step):
  out = np.asarray(schedule(step))
  as_f32 = (
    np.float32(np.inf)  # beyond even float64
    if isinstance(step, int) and step > 1e308
    else np.asarray(step).astype(np.float32)
  )
  want = np.asarray(schedule(jnp.asarray(as_f32)))
  assert out.dtype == np.float32 and out.shape == np.shape(step)
  np.testing.assert_array_equal(out, want)
  assert np.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("step", ["5", None, True, 1 + 2j, jnp.array([True])])
def test_schedules_reject_steps_that_are_not_real(step):
  with pytest.raises(TypeError, match="step must be a real number"):
    jepa_ema.cosine_momentum(0.9, 1.0, total_steps=10)(step)
  with pytest.raises(TypeError, match="step must be a real number"):
    jepa_ema.constant_momentum(0.9)(step)


def test_make_ema_update_huge_steps_compile_once_more():
  fn = jepa_ema.make_ema_update(
    jepa_ema.cosine_momentum(0.5, 1.0, total_steps=2**32), donate=False
  )
  t, o = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  for step in (0, 1, 2**31, 2**31 + 1, np.int64(2**31), 2**33):
    out = fn(t, o, step)
    if step >= 2**31:  # np.int64 would wrap to -2**31 in jit: m = 0.5
      assert float(out["w"][0]) < 0.5
  assert fn._cache_size() == 2  # pylint: disable=protected-access
  chex.assert_trees_all_equal(out, t)  # m(2**33) = 1: past the ramp


@pytest.mark.parametrize(
  "m, held", [(lambda s: 1, True), (np.int64(1), True), (lambda s: 0, False)]
)
def test_integer_momenta_are_real_scalars(m, held):
  # A real scalar momentum may be an integer (a schedule returning 0 or 1):
  # 1 holds the target, 0 takes the online values, exactly.
  target, online = {"w": jnp.full(3, 2.0)}, {"w": jnp.arange(3.0)}
  out = jepa_ema.ema_update(target, online, 0, m)
  np.testing.assert_array_equal(out["w"], (target if held else online)["w"])


@pytest.mark.parametrize(
  "m", [np.complex64(0.5), lambda s: jnp.complex64(0.5), np.bool_(True)]
)
def test_complex_and_bool_momenta_are_type_errors(m):
  with pytest.raises(TypeError, match="must be a real scalar"):
    jepa_ema.ema_update({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0, m)


def test_a_long_value_in_an_error_is_cut_short():
  # A vector momentum of 800 entries (NumPy prints them all, some 9,000
  # characters): the message names the mistake and shows the value cut to
  # 400 characters.
  with pytest.raises(ValueError, match="must be a scalar") as e:
    jepa_ema.ema_update(
      {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0, jnp.linspace(0.1, 0.9, 800)
    )
  assert str(e.value).endswith(" ...].") and len(str(e.value)) < 600
