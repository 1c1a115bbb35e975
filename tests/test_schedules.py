"""Schedules against their closed forms, optax oracles, jit/vmap, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
  "base,final", [(0.996, 1.0), (0.99, 0.999), (0.9, 0.5), (0.0, 1.0)]
)
def test_cosine_closed_form(base, final, maybe_jit):
  s = jepa_ema.cosine_momentum(base, final, total_steps=T)
  for t in STEPS:
    np.testing.assert_allclose(
      _eval(s, t, maybe_jit), cosine_ref(t, base, final, T), atol=2e-7
    )


@pytest.mark.parametrize(
  "base,final", [(0.996, 1.0), (0.99, 0.999), (0.9, 0.5), (0.0, 1.0)]
)
def test_linear_closed_form(base, final, maybe_jit):
  s = jepa_ema.linear_momentum(base, final, total_steps=T)
  for t in STEPS:
    np.testing.assert_allclose(
      _eval(s, t, maybe_jit), linear_ref(t, base, final, T), atol=2e-7
    )


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    dict(power=3 / 4),
    dict(max_momentum=0.999, min_momentum=0.5),
    dict(inv_gamma=10.0, power=1.0, start_step=100),
  ],
)
def test_warmup_closed_form(kwargs, maybe_jit):
  s = jepa_ema.warmup_momentum(**kwargs)
  full = (
    dict(
      max_momentum=0.9999,
      min_momentum=0.0,
      inv_gamma=1.0,
      power=2 / 3,
      start_step=0,
    )
    | kwargs
  )
  for t in STEPS + [31_623, 10**6, 10**9]:
    np.testing.assert_allclose(
      _eval(s, t, maybe_jit), warmup_ref(t, *full.values()), atol=3e-7
    )


def test_constant(maybe_jit):
  s = jepa_ema.constant_momentum(0.99)
  for t in STEPS:
    assert _eval(s, t, maybe_jit) == np.float32(0.99)


@pytest.mark.parametrize(
  "make", [jepa_ema.cosine_momentum, jepa_ema.linear_momentum]
)
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


@pytest.mark.parametrize(
  "s",
  [
    jepa_ema.constant_momentum(0.9),
    jepa_ema.cosine_momentum(total_steps=T),
    jepa_ema.linear_momentum(total_steps=T),
    jepa_ema.warmup_momentum(),
  ],
  ids=lambda s: type(s).__name__,
)
def test_vmap_and_dtype(s):
  steps = jnp.asarray(STEPS, jnp.int32)
  out = jax.vmap(s)(steps)
  assert out.dtype == jnp.float32 and out.shape == steps.shape
  expected = np.array([float(s(int(t))) for t in STEPS], np.float32)
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert jax.jit(s)(jnp.float32(3.0)).dtype == jnp.float32
  assert s(np.int64(3)).dtype == jnp.float32


def test_monotone_and_in_range():
  for s in [
    jepa_ema.cosine_momentum(total_steps=T),
    jepa_ema.linear_momentum(total_steps=T),
    jepa_ema.warmup_momentum(),
  ]:
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
  (
    jepa_ema.cosine_momentum,
    (1.2, 1.0),
    dict(total_steps=10),
    ValueError,
    "base",
  ),
  (
    jepa_ema.cosine_momentum,
    (0.9, 1.01),
    dict(total_steps=10),
    ValueError,
    "final",
  ),
  (
    jepa_ema.cosine_momentum,
    (),
    dict(total_steps=-1),
    ValueError,
    "total_steps",
  ),
  (
    jepa_ema.linear_momentum,
    (),
    dict(total_steps="10"),
    TypeError,
    "total_steps",
  ),
  (
    jepa_ema.linear_momentum,
    (),
    dict(total_steps=math.inf),
    ValueError,
    "total_steps",
  ),
  (
    jepa_ema.linear_momentum,
    (),
    dict(total_steps=True),
    TypeError,
    "total_steps",
  ),
  (jepa_ema.warmup_momentum, (), dict(inv_gamma=0.0), ValueError, "inv_gamma"),
  (jepa_ema.warmup_momentum, (), dict(power=-1.0), ValueError, "power"),
  (
    jepa_ema.warmup_momentum,
    (),
    dict(min_momentum=0.9, max_momentum=0.5),
    ValueError,
    "min_momentum",
  ),
  (jepa_ema.warmup_momentum, (), dict(start_step=-3), ValueError, "start_step"),
  (jepa_ema.tf_warmup_momentum, (1.5,), {}, ValueError, "max_momentum"),
  (jepa_ema.tf_warmup_momentum, ("0.9",), {}, TypeError, "max_momentum"),
  (jepa_ema.exp_warmup_momentum, (-0.1,), {}, ValueError, "max_momentum"),
  (jepa_ema.exp_warmup_momentum, (0.9,), dict(tau=0.0), ValueError, "tau"),
  (jepa_ema.exp_warmup_momentum, (0.9,), dict(tau=math.nan), ValueError, "tau"),
]


@pytest.mark.parametrize(
  "make,args,kwargs,exc,match",
  BAD,
  ids=[f"{b[0].__name__}-{i}" for i, b in enumerate(BAD)],
)
def test_bad_arguments(make, args, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    make(*args, **kwargs)


def test_total_steps_required():
  with pytest.raises(TypeError):
    jepa_ema.cosine_momentum(0.996, 1.0)  # pylint: disable=missing-kwoa


# The documented defaults: the papers' and the PyTorch libraries' own (the
# ports' transcriptions in test_ports.py pass every argument, so a changed
# default passed them).
DEFAULTS = {
  # I-JEPA / V-JEPA configs: ema [0.996, 1.0].
  "cosine_momentum": {"base": 0.996, "final": 1.0},
  "linear_momentum": {"base": 0.996, "final": 1.0},
  # timm ModelEmaV3 / ema-pytorch warm-up: 0.9999, 1 + t/1, power 2/3.
  "warmup_momentum": {
    "max_momentum": 0.9999,
    "min_momentum": 0.0,
    "inv_gamma": 1.0,
    "power": 2 / 3,
    "start_step": 0,
  },
  "exp_warmup_momentum": {"tau": 2000.0},  # ultralytics ModelEMA
  # ema-pytorch EMA.__init__.
  "ema_pytorch_momentum": {
    "beta": 0.9999,
    "update_after_step": 100,
    "update_every": 10,
    "inv_gamma": 1.0,
    "power": 2 / 3,
    "min_value": 0.0,
  },
  # timm ModelEmaV3.__init__.
  "timm_momentum": {
    "decay": 0.9999,
    "min_decay": 0.0,
    "update_after_step": 0,
    "use_warmup": False,
    "warmup_gamma": 1.0,
    "warmup_power": 2 / 3,
  },
  # diffusers EMAModel.__init__.
  "diffusers_momentum": {
    "decay": 0.9999,
    "min_decay": 0.0,
    "update_after_step": 0,
    "use_ema_warmup": False,
    "inv_gamma": 1.0,
    "power": 2 / 3,
  },
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_are_the_papers_and_the_libraries(name):
  import inspect

  signature = inspect.signature(getattr(jepa_ema, name))
  defaults = {
    k: p.default
    for k, p in signature.parameters.items()
    if p.default is not inspect.Parameter.empty
  }
  assert defaults == DEFAULTS[name]


def test_cosine_and_linear_defaults_run_from_0_996_to_1():
  for make in (jepa_ema.cosine_momentum, jepa_ema.linear_momentum):
    s = make(total_steps=100)
    assert float(s(0)) == np.float32(0.996) and float(s(100)) == 1.0


def test_a_bad_step_is_named_in_a_short_message():
  # A step that is no real number is a TypeError that shows the step, cut
  # to 200 characters: a whole array pasted into the message would bury it.
  with pytest.raises(TypeError, match=r"step must be a real number") as e:
    jepa_ema.cosine_momentum(0.996, 1.0, total_steps=10)(np.full(500, 1j))
  message = str(e.value)
  assert "...(type ndarray, dtype complex" in message.replace(" (", "(")
  assert len(message) < 400
  with pytest.raises(TypeError, match=r"got 'ten' \(type str\)"):
    jepa_ema.constant_momentum(0.9)("ten")


def test_zero_dimensional_arrays_are_constant_momenta():
  # A 0-d array (JAX or NumPy) is a number; an array with dimensions is not.
  for m in (jnp.asarray(0.99), np.array(0.99)):
    assert schedules.as_schedule(m) == jepa_ema.constant_momentum(float(m))
  with pytest.raises(TypeError, match="schedule"):
    schedules.as_schedule(np.array([0.99]))


def test_as_schedule():
  opt = optax.linear_schedule(0.9, 1.0, 10)
  assert schedules.as_schedule(opt) is opt
  assert schedules.as_schedule(0.5) == jepa_ema.constant_momentum(0.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    schedules.as_schedule(2.0)
  with pytest.raises(TypeError, match="schedule"):
    schedules.as_schedule("fast")


# ------------------------------------------------ real total_steps (papers)


def ijepa_generator(ema0, ema1, ipe, epochs, ipe_scale):
  """The momentum generator of the I-JEPA / V-JEPA released code (train.py)."""
  total = ipe * epochs * ipe_scale
  return (ema0 + i * (ema1 - ema0) / total for i in range(int(total) + 1))


@pytest.mark.parametrize(
  "ema0,ipe,epochs,ipe_scale",
  [
    (0.996, 37, 3, 1.25),
    (0.998, 11, 7, 1.25),
    (0.996, 13, 5, 1.0),
    (0.99925, 29, 2, 1.25),
  ],
)
def test_linear_momentum_ports_the_jepa_generator_exactly(
  ema0, ipe, epochs, ipe_scale, maybe_jit
):
  ref = np.array(list(ijepa_generator(ema0, 1.0, ipe, epochs, ipe_scale)))
  ours = jepa_ema.linear_momentum(
    ema0, 1.0, total_steps=ipe * epochs * ipe_scale
  )
  got = np.asarray(maybe_jit(ours)(jnp.arange(len(ref))))
  # Within one float32 rounding of the float64 generator ...
  np.testing.assert_allclose(
    got, ref.astype(np.float32), rtol=0, atol=np.spacing(np.float32(1.0))
  )
  # ... whereas int(...) of a non-integer product ramps measurably too fast.
  if (ipe * epochs * ipe_scale) % 1:
    rounded = jepa_ema.linear_momentum(
      ema0, 1.0, total_steps=int(ipe * epochs * ipe_scale)
    )
    err = np.max(np.abs(np.asarray(rounded(jnp.arange(len(ref)))) - ref))
    assert err > 4 * np.spacing(np.float32(1.0))


def test_real_total_steps_cosine_and_equality():
  a = jepa_ema.cosine_momentum(0.99, 1.0, total_steps=12.5)
  for t in (0, 3, 6.25, 12, 12.5, 20):
    np.testing.assert_allclose(
      float(a(t)), cosine_ref(t, 0.99, 1.0, 12.5), atol=2e-7
    )
  assert jepa_ema.linear_momentum(total_steps=10) == jepa_ema.linear_momentum(
    total_steps=10.0
  )


# ------------------------------------------------------------ horizon tools

BASES = {
  "constant": jepa_ema.constant_momentum(0.99),
  "cosine": jepa_ema.cosine_momentum(0.99, 1.0, total_steps=400),
  "linear": jepa_ema.linear_momentum(0.99, 1.0, total_steps=400),
  "warmup": jepa_ema.warmup_momentum(0.999, power=3 / 4),
  "optax": optax.linear_schedule(0.9, 0.999, 300),
}
REFS = {
  "constant": lambda t: 0.99,
  "cosine": lambda t: cosine_ref(t, 0.99, 1.0, 400),
  "linear": lambda t: linear_ref(t, 0.99, 1.0, 400),
  "warmup": lambda t: warmup_ref(t, 0.999, 0.0, 1.0, 3 / 4, 0),
  "optax": lambda t: 0.9 + (0.999 - 0.9) * min(max(t, 0), 300) / 300,
}


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("kappa", [0.5, 1 / 3, 2.0, 4.0, 2.5])
def test_scale_momentum_closed_form(name, kappa, maybe_jit):
  scaled = jepa_ema.scale_momentum(BASES[name], kappa)
  f = maybe_jit(scaled)
  for t in [0, 1, 2, 3, 7, 50, 99, 100, 101, 160, 399, 1000]:
    want = REFS[name](kappa * t) ** kappa  # kappa * t is fractional here
    got = float(f(jnp.asarray(t, jnp.int32)))
    # float32: m within 1 ulp, m**kappa amplifies (1 - m)'s relative error.
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * max(kappa, 1))
    assert np.asarray(f(jnp.asarray(t))).dtype == np.float32


def test_scale_momentum_identity_and_ends():
  base = jepa_ema.cosine_momentum(total_steps=100)
  assert jepa_ema.scale_momentum(base, 1) is base
  assert jepa_ema.scale_momentum(0.9, 1.0) == jepa_ema.constant_momentum(0.9)
  for kappa in (0.25, 3.0, 1000.0):
    assert float(jepa_ema.scale_momentum(1.0, kappa)(7)) == 1.0
    assert float(jepa_ema.scale_momentum(0.0, kappa)(7)) == 0.0
  # Equal schedules are equal (no recompile of a jit closing over them).
  assert jepa_ema.scale_momentum(base, 2) == jepa_ema.scale_momentum(base, 2.0)


@pytest.mark.parametrize("kappa", [0.0, -2.0, math.inf, math.nan])
def test_scale_momentum_bad_kappa(kappa):
  with pytest.raises(ValueError, match="kappa"):
    jepa_ema.scale_momentum(0.99, kappa)


def test_scale_momentum_bad_types():
  with pytest.raises(TypeError, match="kappa"):
    jepa_ema.scale_momentum(0.99, "2")
  with pytest.raises(ValueError, match="momentum"):
    jepa_ema.scale_momentum(1.5, 2.0)


# 40 of the CI profile's 60 examples (each runs up to 960 eager updates);
# every example of the thorough profile.
@settings(
  max_examples=min(40, settings.default.max_examples)
  if settings.default.derandomize
  else settings.default.max_examples
)
@given(
  m=st.floats(0.5, 0.9999),
  n=st.integers(1, 60),
  kappa=st.sampled_from([0.25, 0.5, 2, 3, 4]),
)
def test_scaling_rule_identity(m, n, kappa):
  """For a constant online target, kappa*n steps at m land where n steps at
  scale_momentum(m, kappa) land: the rule's defining identity."""
  if (kappa * n) % 1:
    n = n * 4  # kappa * n must be a whole number of reference steps
  online = np.float64(1.0)
  ref = 0.0
  for _ in range(int(kappa * n)):
    ref = m * ref + (1 - m) * online
  scaled = jepa_ema.scale_momentum(m, kappa)
  ours = jnp.float32(0.0)
  for t in range(n):
    ours = jepa_ema.ema_update(ours, jnp.float32(online), t, scaled)
  np.testing.assert_allclose(float(ours), ref, rtol=0, atol=2e-5)
  # In closed form, exactly the same weight on the old target.
  np.testing.assert_allclose(
    float(scaled(0)) ** n, m ** (kappa * n), rtol=2e-5 * n
  )


@pytest.mark.parametrize("halflife", [1.0, 10.0, 693.1, 2.5e5])
def test_halflife_closed_form(halflife, maybe_jit):
  s = maybe_jit(jepa_ema.halflife_momentum(halflife))
  for t in (0, 1, 1000):
    np.testing.assert_allclose(
      float(s(t)), 0.5 ** (1 / halflife), rtol=0, atol=1.2e-7
    )
  # The defining property: after `halflife` steps the old weight halves (up
  # to float32's resolution of m near 1: half an ulp of 1, times halflife).
  np.testing.assert_allclose(
    float(s(0)) ** halflife, 0.5, rtol=1e-6 + 3e-8 * halflife
  )


def edm_beta(cur_nimg, batch_size, halflife_kimg, rampup_ratio):
  """EDM / EDM2 (training_loop.py): the EMA beta, cur_nimg counted before
  the update as EDM2 does (incremented first)."""
  ema_halflife_nimg = halflife_kimg * 1000
  if rampup_ratio is not None:
    ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * rampup_ratio)
  return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))


@pytest.mark.parametrize(
  "batch,kimg,ratio", [(512, 500, 0.05), (64, 10, 0.05), (8, 2, 0.5)]
)
def test_halflife_rampup_matches_edm(batch, kimg, ratio, maybe_jit):
  s = maybe_jit(jepa_ema.halflife_momentum(kimg * 1000 / batch, rampup=ratio))
  for t in [0, 1, 2, 10, 100, 999, 10_000, 100_000]:
    want = edm_beta((t + 1) * batch, batch, kimg, ratio)
    np.testing.assert_allclose(float(s(t)), want, rtol=0, atol=2e-7)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(halflife=0.0), "halflife"),
    (dict(halflife=-1.0), "halflife"),
    (dict(halflife=math.inf), "halflife"),
    (dict(halflife=10.0, rampup=0.0), "rampup"),
  ],
)
def test_halflife_bad(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jepa_ema.halflife_momentum(**kwargs)


def test_horizon_schedules_compile_once():
  for schedule in (
    jepa_ema.halflife_momentum(100.0, rampup=0.05),
    jepa_ema.scale_momentum(jepa_ema.cosine_momentum(total_steps=50), 2.0),
    jepa_ema.power_momentum(sigma_rel=0.1),
  ):
    traces = []

    @jax.jit
    def f(step):
      traces.append(1)
      return schedule(step)

    for step in range(5):
      f(jnp.asarray(step, jnp.int32))
    assert len(traces) == 1
    np.testing.assert_allclose(
      jax.vmap(schedule)(jnp.arange(4)), [schedule(t) for t in range(4)], atol=0
    )


def timm_decay(step, decay, min_decay, update_after_step, gamma, power):
  """timm ModelEmaV3.get_decay (use_warmup=True); timm calls update with
  step = num_updates after incrementing it, i.e. our EmaState.step + 1.
  ema-pytorch's EMA.get_current_decay gives the same numbers."""
  step = max(0, step - update_after_step - 1)
  if step <= 0:
    return 0.0
  d = 1 - (1 + step / gamma) ** -power
  return max(min(d, decay), min_decay)


@pytest.mark.parametrize("u,mn", [(0, 0.0), (5, 0.0), (10, 0.9), (3, 0.5)])
def test_timm_port_from_readme(u, mn):
  """The README's exact port of timm ModelEmaV3 / ema-pytorch."""
  warm = jepa_ema.warmup_momentum(0.9999, mn, 1.0, 3 / 4, start_step=u)
  timm = lambda t: jnp.where(t <= u, 0.0, warm(t))  # noqa: E731
  for t in range(0, 60):
    np.testing.assert_allclose(
      float(timm(t)),
      timm_decay(t + 1, 0.9999, mn, u, 1.0, 3 / 4),
      rtol=0,
      atol=2e-7,
    )
  if mn > 0:  # warmup_momentum alone cannot copy the first u + 1 updates
    assert float(warm(0)) == np.float32(mn)


# -------------------------------------------------------- power-function EMA


def test_sigma_rel_to_gamma_is_polished_to_float64_rounding():
  # Against the cubic's root in 50-digit decimal arithmetic (Newton from the
  # library's value): within 2.5 ulps over 300 widths with sigma_rel <= 0.2
  # (gamma >= 1.8; measured: 2.16). np.roots alone, without the Newton
  # polish, is off by up to 13 ulps; a polish with a wrong derivative
  # (+t for -t) by 3.4.
  from decimal import Decimal, localcontext

  for s in np.geomspace(1e-3, 0.2, 300):
    g = jepa_ema.sigma_rel_to_gamma(float(s))
    with localcontext() as ctx:
      ctx.prec = 50
      t = 1 / Decimal(float(s)) ** 2
      root = Decimal(g)
      for _ in range(6):
        f = ((root + 7) * root + 16 - t) * root + 12 - t
        root -= f / ((3 * root + 14) * root + 16 - t)
      ulps = abs(Decimal(g) - root) / Decimal(math.ulp(float(root)))
    assert ulps <= 2.5, (float(s), float(ulps))


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97, 50.0])
def test_sigma_gamma_round_trip_and_eq_123(gamma):
  sigma = jepa_ema.gamma_to_sigma_rel(gamma)
  # eq. 123, by hand: sigma^2 = (g+1) / ((g+2)^2 (g+3))
  assert sigma**2 == pytest.approx(
    (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)), rel=1e-15
  )
  back = jepa_ema.sigma_rel_to_gamma(sigma)
  assert back == pytest.approx(gamma, rel=1e-13)
  # eq. 126: the cubic vanishes at the root.
  t = sigma**-2
  assert abs(back**3 + 7 * back**2 + (16 - t) * back + 12 - t) < 1e-9 * t


def test_edm2_published_pairs():
  # EDM2 (sec. 3): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
  assert round(jepa_ema.sigma_rel_to_gamma(0.05), 2) == 16.97
  assert round(jepa_ema.sigma_rel_to_gamma(0.10), 2) == 6.94


@pytest.mark.parametrize("bad", [0.0, -0.1, math.sqrt(1 / 12), 0.5, math.nan])
def test_sigma_rel_out_of_range(bad):
  with pytest.raises(ValueError, match="sigma_rel"):
    jepa_ema.sigma_rel_to_gamma(bad)
  with pytest.raises(ValueError, match="sigma_rel"):
    jepa_ema.power_momentum(sigma_rel=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_gamma_out_of_range(bad):
  # "Raises ValueError if gamma is not positive and finite": 0 is refused
  # too (the bound is open; a closed one let gamma=0 through).
  with pytest.raises(ValueError, match="gamma"):
    jepa_ema.gamma_to_sigma_rel(bad)


def test_power_momentum_closed_form_and_args(maybe_jit):
  s = jepa_ema.power_momentum(gamma=6.94)
  f = maybe_jit(s)
  for t in [0, 1, 2, 10, 1000, 10**6]:
    want = (1 - 1 / (t + 1)) ** (6.94 + 1)  # EDM2's beta with t_next = t + 1
    np.testing.assert_allclose(float(f(t)), want, rtol=0, atol=3e-7)
  assert float(f(0)) == 0.0  # update 0 copies the online params
  assert s.sigma_rel == pytest.approx(jepa_ema.gamma_to_sigma_rel(6.94))
  assert jepa_ema.power_momentum(sigma_rel=0.1) == jepa_ema.power_momentum(
    gamma=jepa_ema.sigma_rel_to_gamma(0.1)
  )
  for kwargs in ({}, dict(sigma_rel=0.1, gamma=7.0)):
    with pytest.raises(ValueError, match="exactly one"):
      jepa_ema.power_momentum(**kwargs)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="gamma"):
      jepa_ema.power_momentum(gamma=bad)


def test_power_ema_averages_with_tau_to_the_gamma():
  """After n updates the power EMA is sum_tau w_tau x_tau with w ~ tau^gamma
  (the discrete profile EDM2 approximates); checked in float64."""
  gamma, n = 3.0, 200
  s = jepa_ema.power_momentum(gamma=gamma)
  xs = np.random.default_rng(0).normal(size=n)
  target = 0.0
  for t in range(n):
    m = float(s(t))
    target = m * target + (1 - m) * xs[t]
  w = np.array(
    [
      (1 - float(s(t))) * np.prod([float(s(k)) for k in range(t + 1, n)])
      for t in range(n)
    ]
  )
  np.testing.assert_allclose(target, w @ xs, rtol=1e-5)
  tau = np.arange(1, n + 1)
  np.testing.assert_allclose(
    w / w.sum(), tau**gamma / np.sum(tau**gamma), atol=0.02 * np.max(w)
  )


@pytest.mark.standard_promotion  # optax internals
@pytest.mark.parametrize(
  "schedule",
  [
    jepa_ema.scale_momentum(
      jepa_ema.cosine_momentum(0.9, 1.0, total_steps=20), 2.0
    ),
    jepa_ema.halflife_momentum(3.0, rampup=0.5),
    jepa_ema.power_momentum(sigma_rel=0.1),
  ],
  ids=["scale", "halflife", "power"],
)
@pytest.mark.parametrize("every", [1, 3])
def test_horizon_schedules_drive_ema_and_track_ema(schedule, every):
  """The new schedules as the momentum of ema / track_ema, also every=k
  (product momentum over the window), against a float64 reference."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.zeros(4)}
  online = [rng.normal(size=4) for _ in range(12)]
  ref = np.zeros(4)
  for t, x in enumerate(online):
    if t % every == every - 1:
      m = np.prod([float(schedule(k)) for k in range(t - every + 1, t + 1)])
      ref = m * ref + (1 - m) * x
  ema = jepa_ema.ema(schedule, every=every)
  state = ema.init(params)
  tx = optax.chain(optax.sgd(1.0), jepa_ema.track_ema(schedule, every=every))
  opt_state, p = tx.init(params), params
  update = jax.jit(ema.update)
  for x in online:
    state = update({"w": jnp.asarray(x, jnp.float32)}, state)
    grads = jax.tree.map(
      lambda a, b: a - b, p, {"w": jnp.asarray(x, jnp.float32)}
    )
    updates, opt_state = tx.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(state.target["w"], ref, atol=2e-5)
  np.testing.assert_allclose(
    jepa_ema.get_target(opt_state)["w"], ref, atol=2e-5
  )


# ------------------------------------------------------ the ported presets


@pytest.mark.parametrize("d", [0.0, 0.5, 0.999, 1.0])
def test_tf_warmup_closed_form(d, maybe_jit):
  s = maybe_jit(jepa_ema.tf_warmup_momentum(d))
  for t in (0, 1, 2, 9, 90, 10**4, 10**7):
    want = min(d, (1 + t) / (10 + t))
    np.testing.assert_allclose(float(s(t)), want, rtol=3e-7, atol=0)
  ts = jnp.arange(100)
  np.testing.assert_allclose(
    jax.vmap(s)(ts),
    np.minimum(d, (1 + np.arange(100.0)) / (10 + np.arange(100.0))),
    rtol=3e-7,
  )


@pytest.mark.parametrize("d,tau", [(0.9999, 2000.0), (0.99, 1.0), (1.0, 50.0)])
def test_exp_warmup_closed_form(d, tau, maybe_jit):
  s = maybe_jit(jepa_ema.exp_warmup_momentum(d, tau=tau))
  for t in (0, 1, 10, 1999, 10**5):
    want = d * (1 - math.exp(-(t + 1) / tau))
    np.testing.assert_allclose(float(s(t)), want, rtol=3e-7, atol=1e-12)
  out = jax.vmap(s)(jnp.arange(10))
  assert out.dtype == jnp.float32 and out.shape == (10,)


def test_presets_compare_by_value_and_compile_once():
  assert jepa_ema.tf_warmup_momentum(0.99) == jepa_ema.tf_warmup_momentum(0.99)
  assert hash(jepa_ema.exp_warmup_momentum(0.9, 10.0)) == hash(
    jepa_ema.exp_warmup_momentum(0.9, tau=10.0)
  )
  f = jax.jit(lambda sched, t: sched(t), static_argnums=0)
  f(jepa_ema.tf_warmup_momentum(0.99), 3)
  f(jepa_ema.tf_warmup_momentum(0.99), 4)
  assert f._cache_size() == 1


def test_ema_pytorch_float_steps_match_integer_steps():
  """Its docstring: "a step is exact up to 2**24 calls for a float step". A
  float step (Python, NumPy or JAX) takes the float32 test of
  ``update_every`` and gives the integer step's momentum."""
  s = jepa_ema.ema_pytorch_momentum(update_after_step=0, update_every=10)
  ints = [float(s(c)) for c in range(31)]
  assert [float(s(float(c))) for c in range(31)] == ints
  assert [float(s(np.float32(c))) for c in range(31)] == ints
  np.testing.assert_array_equal(
    s(jnp.arange(31, dtype=jnp.float32)), np.float32(ints)
  )


def test_ema_pytorch_integer_array_steps_are_exact_beyond_2_24():
  # _multiple_of's docstring: exact for integer steps, in integer
  # arithmetic. A NumPy integer array of steps past 2**24 (where float32
  # no longer holds every integer) idles and updates on the same calls as
  # the Python ints and a JAX int32 array do.
  s = jepa_ema.ema_pytorch_momentum(update_after_step=0, update_every=3)
  steps = np.arange(2**24 + 1, 2**24 + 13)
  ints = np.float32([float(s(int(c))) for c in steps])
  assert (ints == 1.0).sum() == 8  # two of every three calls idle
  np.testing.assert_array_equal(s(steps), ints)
  np.testing.assert_array_equal(s(list(steps)), ints)
  np.testing.assert_array_equal(s(jnp.asarray(steps, jnp.int32)), ints)


@pytest.mark.parametrize(
  "kwargs,exc",
  [
    (dict(power=0.0), ValueError),
    (dict(power=-1.0), ValueError),
    (dict(power="1"), TypeError),
  ],
)
def test_diffusers_momentum_checks_power(kwargs, exc):
  # Its docstring: ValueError for "a non-positive inv_gamma / power" (the
  # port's tests check inv_gamma only).
  with pytest.raises(exc, match="`power`"):
    jepa_ema.diffusers_momentum(use_ema_warmup=True, **kwargs)


def test_checked_momentum_is_frozen_and_hashed_by_value():
  # The module's promise for every schedule it returns: a frozen dataclass
  # that compares and hashes by value (one compilation for equal ones).
  a = jepa_ema.checked_momentum(
    jepa_ema.cosine_momentum(0.9, 1.0, total_steps=9)
  )
  b = jepa_ema.checked_momentum(
    jepa_ema.cosine_momentum(0.9, 1.0, total_steps=9)
  )
  assert a == b and hash(a) == hash(b)
  with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
    a.momentum = jepa_ema.constant_momentum(0.5)


@pytest.mark.parametrize("m", [-0.25, 1.25, float("inf"), float("nan")])
def test_checked_momentum_reports_each_side_of_the_range(m):
  # "Reports a traced momentum outside [0, 1] (or NaN / Inf)": below 0 as
  # well as above 1 (tests/test_inputs.py checks 1.25 and NaN).
  from jax.experimental import checkify

  f = checkify.checkify(jax.jit(jepa_ema.checked_momentum(lambda s: s)))
  err, _ = f(jnp.float32(m))
  assert "outside [0, 1]" in err.get()
  err, _ = f(jnp.float32(0.5))
  assert err.get() is None
