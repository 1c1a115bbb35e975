"""Schedules against their closed forms, optax oracles, jit/vmap, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jepa_ema
from jepa_ema import schedules

T = 1000
STEPS = [0, 1, 2, 10, 250, 499, 500, 501, 750, T - 1, T, T + 1, 5 * T]


def cosine_ref(t, base, final, total):
  if total == 0:
    return final
  t = min(max(t, 0), total)
  return final - (final - base) * (1 + math.cos(math.pi * t / total)) / 2


def linear_ref(t, base, final, total):
  if total == 0:
    return final
  t = min(max(t, 0), total)
  return base + (final - base) * t / total


def warmup_ref(t, mx, mn, inv_gamma, power, start):
  tp = max(t - start, 0)
  return min(max(1 - (1 + tp / inv_gamma) ** (-power), mn), mx)


def _eval(schedule, step, maybe_jit):
  return float(maybe_jit(schedule)(jnp.asarray(step, jnp.int32)))


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.99, 0.999),
                                        (0.9, 0.5), (0.0, 1.0)])
def test_cosine_closed_form(base, final, maybe_jit):
  s = jepa_ema.cosine_momentum(base, final, total_steps=T)
  for t in STEPS:
    np.testing.assert_allclose(_eval(s, t, maybe_jit),
                               cosine_ref(t, base, final, T), atol=2e-7)


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.99, 0.999),
                                        (0.9, 0.5), (0.0, 1.0)])
def test_linear_closed_form(base, final, maybe_jit):
  s = jepa_ema.linear_momentum(base, final, total_steps=T)
  for t in STEPS:
    np.testing.assert_allclose(_eval(s, t, maybe_jit),
                               linear_ref(t, base, final, T), atol=2e-7)


@pytest.mark.parametrize("kwargs", [
    {}, dict(power=3 / 4), dict(max_momentum=0.999, min_momentum=0.5),
    dict(inv_gamma=10.0, power=1.0, start_step=100)])
def test_warmup_closed_form(kwargs, maybe_jit):
  s = jepa_ema.warmup_momentum(**kwargs)
  full = dict(max_momentum=0.9999, min_momentum=0.0, inv_gamma=1.0,
              power=2 / 3, start_step=0) | kwargs
  for t in STEPS + [31_623, 10**6, 10**9]:
    np.testing.assert_allclose(
        _eval(s, t, maybe_jit), warmup_ref(t, *full.values()), atol=3e-7)


def test_constant(maybe_jit):
  s = jepa_ema.constant_momentum(0.99)
  for t in STEPS:
    assert _eval(s, t, maybe_jit) == np.float32(0.99)


@pytest.mark.parametrize("make", [jepa_ema.cosine_momentum,
                                  jepa_ema.linear_momentum])
def test_zero_total_steps_is_final(make, maybe_jit):
  s = make(0.9, 0.97, total_steps=0)
  for t in [0, 1, 100]:
    assert _eval(s, t, maybe_jit) == np.float32(0.97)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("base", [0.996, 0.99, 0.9])
def test_cosine_matches_optax_oracle(base):
  ours = jepa_ema.cosine_momentum(base, 1.0, total_steps=T)
  oracle = lambda t: 1.0 - optax.cosine_decay_schedule(1.0 - base, T)(t)
  for t in STEPS:
    np.testing.assert_allclose(float(ours(t)), float(oracle(t)), atol=2e-7)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.9, 0.5)])
def test_linear_matches_optax_oracle(base, final):
  ours = jepa_ema.linear_momentum(base, final, total_steps=T)
  oracle = optax.linear_schedule(base, final, T)
  for t in STEPS:
    np.testing.assert_allclose(float(ours(t)), float(oracle(t)), atol=2e-7)


@pytest.mark.parametrize("s", [
    jepa_ema.constant_momentum(0.9),
    jepa_ema.cosine_momentum(total_steps=T),
    jepa_ema.linear_momentum(total_steps=T),
    jepa_ema.warmup_momentum()], ids=lambda s: type(s).__name__)
def test_vmap_and_dtype(s):
  steps = jnp.asarray(STEPS, jnp.int32)
  out = jax.vmap(s)(steps)
  assert out.dtype == jnp.float32 and out.shape == steps.shape
  expected = np.array([float(s(int(t))) for t in STEPS], np.float32)
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert jax.jit(s)(jnp.float32(3.0)).dtype == jnp.float32
  assert s(np.int64(3)).dtype == jnp.float32


def test_monotone_and_in_range():
  for s in [jepa_ema.cosine_momentum(total_steps=T),
            jepa_ema.linear_momentum(total_steps=T),
            jepa_ema.warmup_momentum()]:
    v = np.asarray(jax.vmap(s)(jnp.arange(0, 2 * T, dtype=jnp.int32)))
    assert np.all(np.diff(v) >= 0) and v.min() >= 0 and v.max() <= 1


def test_equal_and_hashable_by_value():
  a = jepa_ema.cosine_momentum(0.996, 1.0, total_steps=100)
  b = jepa_ema.cosine_momentum(0.996, 1.0, total_steps=100)
  c = jepa_ema.cosine_momentum(0.99, 1.0, total_steps=100)
  assert a == b and hash(a) == hash(b) and a != c
  assert len({a, b, c}) == 2
  with pytest.raises(AttributeError):
    a.base = 0.5  # frozen


def test_same_schedule_compiles_once():
  traces = []

  def f(s, t):
    traces.append(1)
    return s(t)

  f = jax.jit(f, static_argnums=0)
  for step in range(3):  # a new but equal schedule object each time
    f(jepa_ema.linear_momentum(total_steps=10), step)
  assert len(traces) == 1 and f._cache_size() == 1
  f(jepa_ema.linear_momentum(total_steps=11), 0)  # a different one does
  assert len(traces) == 2


BAD = [
    (jepa_ema.constant_momentum, (1.5,), {}, ValueError, "momentum"),
    (jepa_ema.constant_momentum, (-0.1,), {}, ValueError, "momentum"),
    (jepa_ema.constant_momentum, (float("nan"),), {}, ValueError, "finite"),
    (jepa_ema.constant_momentum, ("0.9",), {}, TypeError, "momentum"),
    (jepa_ema.cosine_momentum, (1.2, 1.0), dict(total_steps=10), ValueError,
     "base"),
    (jepa_ema.cosine_momentum, (0.9, 1.01), dict(total_steps=10), ValueError,
     "final"),
    (jepa_ema.cosine_momentum, (), dict(total_steps=-1), ValueError,
     "total_steps"),
    (jepa_ema.linear_momentum, (), dict(total_steps=10.5), TypeError,
     "total_steps"),
    (jepa_ema.linear_momentum, (), dict(total_steps=True), TypeError,
     "total_steps"),
    (jepa_ema.warmup_momentum, (), dict(inv_gamma=0.0), ValueError,
     "inv_gamma"),
    (jepa_ema.warmup_momentum, (), dict(power=-1.0), ValueError, "power"),
    (jepa_ema.warmup_momentum, (), dict(min_momentum=0.9, max_momentum=0.5),
     ValueError, "min_momentum"),
    (jepa_ema.warmup_momentum, (), dict(start_step=-3), ValueError,
     "start_step"),
]


@pytest.mark.parametrize("make,args,kwargs,exc,match", BAD,
                         ids=[f"{b[0].__name__}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments(make, args, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    make(*args, **kwargs)


def test_total_steps_required():
  with pytest.raises(TypeError):
    jepa_ema.cosine_momentum(0.996, 1.0)  # pylint: disable=missing-kwoa


def test_as_schedule():
  opt = optax.linear_schedule(0.9, 1.0, 10)
  assert schedules.as_schedule(opt) is opt
  assert schedules.as_schedule(0.5) == jepa_ema.constant_momentum(0.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    schedules.as_schedule(2.0)
  with pytest.raises(TypeError, match="schedule"):
    schedules.as_schedule("fast")
