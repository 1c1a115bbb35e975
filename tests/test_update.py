"""ema_update / make_ema_update against optax and closed forms; bad inputs."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jepa_ema


def random_tree(seed, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
    "encoder": {
      "w": jax.random.normal(k[0], (8, 16), dtype),
      "b": jax.random.normal(k[1], (16,), dtype),
    },
    "blocks": [
      jax.random.normal(k[2], (3, 4), dtype),
      jax.random.normal(k[3], (), dtype),
    ],
  }


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.996, 0.9999, 1.0])
@pytest.mark.standard_promotion
def test_matches_optax_incremental_update(m, maybe_jit):
  target, online = random_tree(0), random_tree(1)
  ours = maybe_jit(jepa_ema.ema_update)(target, online, 7, m)
  oracle = optax.incremental_update(online, target, step_size=1.0 - m)
  chex.assert_trees_all_close(ours, oracle, atol=1e-6, rtol=1e-6)


def test_matches_float64_reference(maybe_jit):
  target, online = random_tree(2), random_tree(3)
  sched = jepa_ema.cosine_momentum(0.9, 1.0, total_steps=20)
  f = maybe_jit(lambda t, o, step: jepa_ema.ema_update(t, o, step, sched))
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), target)
  on64 = jax.tree.map(lambda x: np.asarray(x, np.float64), online)
  for step in range(25):
    target = f(target, online, step)
    m = np.float64(np.float32(sched(step)))
    ref = jax.tree.map(lambda t, o: m * t + (1 - m) * o, ref, on64)
  chex.assert_trees_all_close(target, ref, atol=1e-6)


def test_m_equals_one_is_bitwise_identity(maybe_jit):
  # NaN, Inf, -0.0 and subnormals on either side, the target's bits kept
  # (a NaN's payload included: 0x7fc00001 is not the canonical NaN).
  payload_nan = np.array([0x7FC00001], np.uint32).view(np.float32)[0]
  target = {
    "a": jnp.array([-0.0, 1e-38, np.inf, 3.0, payload_nan, np.nan, 1e-45]),
    "b": jnp.array([1.5, -2.25, np.nan], jnp.bfloat16),
  }
  online = {
    "a": jnp.array([5.0, np.inf, 1.0, np.nan, 2.0, np.nan, -np.inf]),
    "b": jnp.array([7.0, 3.0, 1.0], jnp.bfloat16),
  }
  out = maybe_jit(jepa_ema.ema_update)(target, online, 0, 1.0)
  for k in target:
    np.testing.assert_array_equal(
      np.asarray(out[k]).view(np.uint8), np.asarray(target[k]).view(np.uint8)
    )


def test_m_equals_zero_is_online_cast(maybe_jit):
  target = {"a": jnp.zeros(3, jnp.bfloat16), "b": jnp.ones(3)}
  online = {
    "a": jnp.array([1.1, 2.2, 3.3], jnp.float32),
    "b": jnp.array([-0.0, 1e-30, 7.0]),
  }
  out = maybe_jit(jepa_ema.ema_update)(target, online, 0, 0.0)
  assert out["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["a"], online["a"].astype(jnp.bfloat16))
  np.testing.assert_array_equal(
    np.asarray(out["b"]).view(np.uint32),
    np.asarray(online["b"]).view(np.uint32),
  )


@pytest.mark.parametrize(
  "t_dtype,o_dtype",
  [
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
    (jnp.float32, jnp.float32),
  ],
)
def test_keeps_target_dtype_and_computes_in_f32(t_dtype, o_dtype, maybe_jit):
  target = {"w": jnp.linspace(-1, 1, 64).astype(t_dtype)}
  online = {"w": jnp.linspace(2, 0, 64).astype(o_dtype)}
  out = maybe_jit(jepa_ema.ema_update)(target, online, 0, 0.7)
  assert out["w"].dtype == t_dtype
  t64 = np.asarray(target["w"].astype(jnp.float32), np.float64)
  o64 = np.asarray(online["w"].astype(jnp.float32), np.float64)
  ref = (0.7 * t64 + 0.3 * o64).astype(np.float32)
  # Computed in float32, rounded once to the target dtype: round-to-nearest
  # of the float32 result (allow one float32 ulp before the final rounding).
  expected = jnp.asarray(ref).astype(t_dtype)
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float32),
    np.asarray(expected, np.float32),
    rtol=float(jnp.finfo(t_dtype).eps),
    atol=1e-6,
  )


def test_non_float_leaves_come_from_online(maybe_jit):
  Pair = collections.namedtuple("Pair", "w count")
  target = {
    "p": Pair(jnp.zeros(2), jnp.array(1, jnp.int32)),
    "mask": jnp.array([True, False]),
    "key": jax.random.key(0),
    "raw_key": jax.random.PRNGKey(0),
  }
  online = {
    "p": Pair(jnp.ones(2), jnp.array(9, jnp.int32)),
    "mask": jnp.array([False, True]),
    "key": jax.random.key(1),
    "raw_key": jax.random.PRNGKey(1),
  }
  out = maybe_jit(jepa_ema.ema_update)(target, online, 0, 0.5)
  assert isinstance(out["p"], Pair)
  np.testing.assert_allclose(out["p"].w, 0.5)
  assert int(out["p"].count) == 9 and out["p"].count.dtype == jnp.int32
  np.testing.assert_array_equal(out["mask"], online["mask"])
  np.testing.assert_array_equal(
    jax.random.key_data(out["key"]), jax.random.key_data(online["key"])
  )
  np.testing.assert_array_equal(out["raw_key"], online["raw_key"])


def test_non_array_leaves_come_from_online():
  out = jepa_ema.ema_update(
    {"name": "a", "w": jnp.zeros(1)}, {"name": "b", "w": jnp.ones(1)}, 0, 0.5
  )
  assert out["name"] == "b"


def test_python_float_leaves_are_blended_like_under_jit():
  eager = jepa_ema.ema_update({"s": 0.0}, {"s": 1.0}, 0, 0.75)
  jitted = jax.jit(jepa_ema.ema_update)({"s": 0.0}, {"s": 1.0}, 0, 0.75)
  assert float(eager["s"]) == float(jitted["s"]) == 0.25


def test_traced_momentum_inside_jit():
  @jax.jit
  def f(t, o, m):
    return jepa_ema.ema_update(t, o, 0, m)

  np.testing.assert_allclose(
    f(jnp.zeros(2), jnp.ones(2), jnp.float32(0.25)), 0.75
  )


@pytest.mark.standard_promotion
def test_optax_schedule_as_momentum(maybe_jit):
  sched = optax.linear_schedule(0.5, 1.0, 10)
  f = maybe_jit(lambda t, o, step: jepa_ema.ema_update(t, o, step, sched))
  out = f(jnp.zeros(2), jnp.ones(2), 4)
  np.testing.assert_allclose(out, 1 - 0.7, rtol=1e-6)


def test_one_compilation_for_50_steps():
  sched = jepa_ema.cosine_momentum(total_steps=100)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step_fn(target, online, step):
    return jepa_ema.ema_update(target, online, step, sched)

  target, online = random_tree(0), random_tree(1)
  for step in range(50):
    target = step_fn(target, online, jnp.asarray(step, jnp.int32))
  assert step_fn._cache_size() == 1


def test_make_ema_update_compiles_once_and_donates():
  fn = jepa_ema.make_ema_update(jepa_ema.linear_momentum(total_steps=50))
  target, online = random_tree(0), random_tree(1)
  for step in range(50):
    old = target
    target = fn(target, online, step)
  assert fn._cache_size() == 1
  # The previous target was donated: its buffers are gone.
  assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert not any(x.is_deleted() for x in jax.tree.leaves(online))


def test_make_ema_update_without_donation_keeps_old_target():
  fn = jepa_ema.make_ema_update(0.5, donate=False)
  target = {"w": jnp.zeros(3)}
  new = fn(target, {"w": jnp.ones(3)}, 0)
  assert not target["w"].is_deleted()
  np.testing.assert_allclose(new["w"], 0.5)


def test_make_ema_update_inlines_in_user_jit():
  fn = jepa_ema.make_ema_update(0.5)

  @jax.jit
  def train_step(target, online):
    online = jax.tree.map(lambda x: x * 2.0, online)
    return fn(target, online, 0), online

  target, online = train_step({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
  np.testing.assert_allclose(target["w"], 1.0)


# The bad-input table lives in tests/inputs_table.py (rendered in
# docs/guarantees.md) and runs in tests/test_inputs.py.


def test_bad_momentum_at_make_time():
  with pytest.raises(ValueError, match="momentum"):
    jepa_ema.make_ema_update(1.5)


def test_mismatch_is_reported_under_jit():
  with pytest.raises(ValueError, match="shape"):
    jax.jit(jepa_ema.ema_update, static_argnums=3)(
      {"w": jnp.zeros(2)}, {"w": jnp.zeros(3)}, 0, 0.5
    )


# Any finite float32: huge ones (o - t overflows float32), subnormals and
# signed zeros included. XLA on CPU may flush subnormals to zero inside a
# fused kernel (it reads them as 0 and may write a subnormal result as 0), so
# the bounds are those of the inputs with subnormals read as 0 as well.
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
F32 = np.finfo(np.float32)
MAX32 = float(F32.max)
SUB = float(F32.smallest_subnormal)


@st.composite
def float32_pairs(draw):
  t = draw(hnp.arrays(np.float32, st.integers(1, 64), elements=finite32))
  o = draw(hnp.arrays(np.float32, t.shape, elements=finite32))
  return t, o


def _pair(t, o):
  return np.array(t, np.float32), np.array(o, np.float32)


def _flushed(x):
  """``x`` with subnormals read as zero (what XLA:CPU may do)."""
  return np.where(np.abs(x) < F32.tiny, np.float32(0), x).astype(np.float32)


def assert_between(t, o, out):
  assert np.all(np.isfinite(out)), (t, o, out)
  lo = np.minimum(np.minimum(t, o), np.minimum(_flushed(t), _flushed(o)))
  hi = np.maximum(np.maximum(t, o), np.maximum(_flushed(t), _flushed(o)))
  assert np.all((out >= lo) & (out <= hi)), (t, o, out)


OVERFLOW = _pair(
  [MAX32, -MAX32, 3e38, -3e38, 1.7e38, MAX32],
  [-MAX32, MAX32, -3e38, 3e38, -1.7e38, -1e31],
)
SUBNORMAL = _pair(
  [SUB, 3e-39, -1e-40, 1e-39, F32.tiny, -SUB],
  [3 * SUB, 1e-39, 1e-40, 1.2e-38, SUB, 0.0],
)
SIGNED_ZERO = _pair(
  [-0.0, 0.0, -0.0, 0.0, -0.0], [0.0, -0.0, -0.0, 1e-30, -1.0]
)


@given(pair=float32_pairs(), m=st.floats(0.0, 1.0))
@example(pair=OVERFLOW, m=0.5)
@example(pair=OVERFLOW, m=0.3)
@example(pair=OVERFLOW, m=0.9)
@example(pair=OVERFLOW, m=0.999)
@example(pair=OVERFLOW, m=1e-7)
@example(pair=OVERFLOW, m=1.0 - 2.0**-24)
@example(pair=SUBNORMAL, m=0.3)
@example(pair=SUBNORMAL, m=0.5)
@example(pair=SUBNORMAL, m=0.999)
@example(pair=SIGNED_ZERO, m=0.3)
@example(pair=SIGNED_ZERO, m=0.7)
def test_property_output_between_target_and_online(pair, m):
  """Finite inputs give a finite output between them, eager and jitted
  (they fuse differently), also where ``o - t`` overflows float32."""
  t, o = pair
  for fn in (jepa_ema.ema_update, jax.jit(jepa_ema.ema_update)):
    out = np.asarray(fn(jnp.asarray(t), jnp.asarray(o), 0, jnp.float32(m)))
    assert_between(t, o, out)


@pytest.mark.parametrize(
  "dtype", ["float16", "bfloat16", "float32", "float64", "complex64"]
)
@pytest.mark.parametrize("m", [0.0, 1e-7, 0.3, 0.5, 0.7, 0.999, 1.0])
def test_extremes_of_every_dtype_stay_finite_and_between(dtype, m):
  """Opposite extremes of each dtype's range (|o - t| up to twice its
  maximum): a finite result between them, the ends exact."""
  with jax.enable_x64(dtype == "float64"):
    real = np.float32 if dtype == "complex64" else dtype
    big = float(jnp.finfo(real).max)
    vals = np.array([big, -big, big / 2, -big / 3, 1.0], np.float64)
    t = jnp.asarray(vals).astype(real)
    o = jnp.asarray(-vals[::-1]).astype(real)
    if dtype == "complex64":
      t, o = jax.lax.complex(t, o), jax.lax.complex(o, t)
    out = jax.jit(jepa_ema.ema_update)(t, o, 0, jnp.float32(m))
    assert out.dtype == t.dtype
    parts = (jnp.real, jnp.imag) if dtype == "complex64" else (lambda x: x,)
    for part in parts:
      tv, ov, yv = (np.asarray(part(x)).astype(np.float64) for x in (t, o, out))
      assert np.all(np.isfinite(yv)), (dtype, m, yv)
      assert np.all(yv >= np.minimum(tv, ov)) and np.all(
        yv <= np.maximum(tv, ov)
      )
      # The value: the float64 blend, to a rounding of the target's dtype
      # (of float32 for the halves, blended in float32).
      m32 = float(np.float32(m))  # the momentum as passed
      ref = m32 * tv + (1 - m32) * ov
      eps = float(jnp.finfo(real).eps)
      np.testing.assert_allclose(
        yv, ref, rtol=0, atol=2 * eps * np.abs(vals).max()
      )
    if m == 1.0:
      np.testing.assert_array_equal(np.asarray(out), np.asarray(t))
    if m == 0.0:
      np.testing.assert_array_equal(np.asarray(out), np.asarray(o))


def _bits(x):
  return np.asarray(x).view(np.uint32)


@given(
  t=hnp.arrays(np.float32, st.integers(1, 32), elements=finite32),
  m=st.floats(0.0, 1.0),
)
@example(t=np.array([-0.0, 0.0, SUB, -3e-39, MAX32, -MAX32], np.float32), m=0.5)
@example(
  t=np.array([-0.0, 0.0, SUB, -3e-39, MAX32, -MAX32], np.float32), m=0.999
)
@example(
  t=np.array([-0.0, 0.0, SUB, -3e-39, MAX32, -MAX32], np.float32), m=1e-3
)
def test_property_fixed_point(t, m):
  """A target equal to online never moves, bitwise (no drift by rounding;
  -0.0, subnormals and the extremes included), eager and jitted."""
  for fn in (jepa_ema.ema_update, jax.jit(jepa_ema.ema_update)):
    out = fn(jnp.asarray(t), jnp.asarray(t), 0, jnp.float32(m))
    np.testing.assert_array_equal(_bits(out), _bits(t))


def _flax_and_equinox_trees():
  import equinox as eqx
  import flax.linen as nn
  from flax import nnx

  nnx_state_a = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
  nnx_state_b = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(1)), nnx.Param)
  linen = nn.Dense(4)
  lin_a = linen.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  lin_b = linen.init(jax.random.key(1), jnp.ones((1, 3)))["params"]
  mlp_a = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
  mlp_b = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(1))
  eqx_a = eqx.filter(mlp_a, eqx.is_inexact_array)
  eqx_b = eqx.filter(mlp_b, eqx.is_inexact_array)
  return [
    ("nnx.State", nnx_state_a, nnx_state_b),
    ("linen", lin_a, lin_b),
    ("equinox", eqx_a, eqx_b),
  ]


@pytest.mark.standard_promotion
@pytest.mark.parametrize("idx", [0, 1, 2], ids=["nnx", "linen", "equinox"])
def test_framework_trees(idx, maybe_jit):
  _, a, b = _flax_and_equinox_trees()[idx]
  out = maybe_jit(jepa_ema.ema_update)(a, b, 0, 0.75)
  assert jax.tree.structure(out) == jax.tree.structure(a)
  expected = jax.tree.map(lambda x, y: 0.75 * x + 0.25 * y, a, b)
  chex.assert_trees_all_close(out, expected, atol=1e-6)
