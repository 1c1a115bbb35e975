"""ema() / track_ema() / get_target(): real optimizers, MultiSteps, dtypes,
non-finite skipping, checkpoint round trips."""

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jepa_ema


def init_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "w": jax.random.normal(k1, (5, 3)),
    "b": jnp.zeros(3),
    "n": jnp.array(0, jnp.int32),
  }


def loss_fn(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def batches(n, seed=1):
  key = jax.random.key(seed)
  for _ in range(n):
    key, kx = jax.random.split(key)
    x = jax.random.normal(kx, (16, 5))
    yield x, jnp.sin(x[:, :3])


def to64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def hand_rolled(schedule, params_seq):
  """Float64 EMA of a sequence of params, momentum schedule(t) at update t."""
  ref = to64(params_seq[0])
  for t, p in enumerate(params_seq[1:]):
    m = np.float64(np.float32(schedule(t)))
    ref = {
      k: (
        m * ref[k] + (1 - m) * np.asarray(p[k], np.float64)
        if k != "n"
        else np.asarray(p[k])
      )
      for k in ref
    }
  return ref


SCHEDULES = [
  0.9,
  jepa_ema.cosine_momentum(0.8, 1.0, total_steps=30),
  jepa_ema.linear_momentum(0.5, 0.99, total_steps=20),
  jepa_ema.warmup_momentum(power=3 / 4),
]


@pytest.mark.standard_promotion  # optax internals promote implicitly
@pytest.mark.parametrize(
  "momentum", SCHEDULES, ids=["float", "cosine", "linear", "warmup"]
)
def test_ema_wrapper_matches_float64_over_adam(momentum, maybe_jit):
  opt = optax.adamw(3e-2)
  ema = jepa_ema.ema(momentum)
  params = init_params()  # float leaves plus an int counter "n"
  floats = {k: v for k, v in params.items() if k != "n"}
  opt_state, ema_state = opt.init(floats), ema.init(params)
  update = maybe_jit(ema.update)
  seq = [params]
  for x, y in batches(30):
    g = jax.grad(loss_fn)(floats, x, y)
    updates, opt_state = opt.update(g, opt_state, floats)
    floats = optax.apply_updates(floats, updates)
    params = {**floats, "n": params["n"] + 1}
    ema_state = update(params, ema_state)
    seq.append(params)
  sched = jepa_ema.schedules.as_schedule(momentum)
  ref = hand_rolled(sched, seq)
  assert int(ema_state.step) == 30
  chex.assert_trees_all_close(ema_state.target, ref, atol=2e-6)
  assert int(ema_state.target["n"]) == 30  # int leaf copied from params


@pytest.mark.standard_promotion  # optax internals promote implicitly
@pytest.mark.parametrize("momentum", SCHEDULES[:2], ids=["float", "cosine"])
def test_track_ema_matches_float64_over_adam(momentum, maybe_jit):
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adam(3e-2),
    jepa_ema.track_ema(momentum),
  )
  params = {k: v for k, v in init_params().items() if k != "n"}
  opt_state = tx.init(params)

  def step(params, opt_state, x, y):
    g = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = maybe_jit(step)
  seq = [params]
  for x, y in batches(27):
    params, opt_state = step(params, opt_state, x, y)
    seq.append(params)
  ema_state = opt_state[-1]
  assert int(ema_state.step) == 27
  ref = hand_rolled(jepa_ema.schedules.as_schedule(momentum), seq)
  chex.assert_trees_all_close(jepa_ema.get_target(opt_state), ref, atol=2e-6)


@pytest.mark.standard_promotion  # optax internals promote implicitly
def test_track_ema_returns_updates_unchanged():
  params = {"w": jnp.ones(4)}
  plain, tracked = (
    optax.adam(0.1),
    optax.chain(optax.adam(0.1), jepa_ema.track_ema(0.9)),
  )
  s1, s2 = plain.init(params), tracked.init(params)
  g = {"w": jnp.arange(4.0)}
  u1, _ = plain.update(g, s1, params)
  u2, _ = tracked.update(g, s2, params)
  chex.assert_trees_all_equal(u1, u2)


def test_track_ema_requires_params():
  tx = optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.9))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(2)}, state)


@pytest.mark.standard_promotion  # optax internals promote implicitly
def test_multisteps_advances_only_on_real_steps():
  k = 3
  inner = optax.chain(optax.sgd(0.5), jepa_ema.track_ema(0.5))
  tx = optax.MultiSteps(inner, every_k_schedule=k)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  ema_ref = np.zeros(2)
  grads = [{"w": jnp.full(2, -float(i + 1))} for i in range(3 * k)]

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for i, g in enumerate(grads):
    new_params, state = step(params, state, g)
    emitted = (i + 1) % k == 0
    if emitted:
      assert not np.allclose(new_params["w"], params["w"])
      ema_ref = 0.5 * ema_ref + 0.5 * np.asarray(new_params["w"], np.float64)
    else:
      np.testing.assert_array_equal(new_params["w"], params["w"])
    params = new_params
    assert int(state.inner_opt_state[-1].step) == (i + 1) // k
    np.testing.assert_allclose(
      jepa_ema.get_target(state)["w"], ema_ref, rtol=1e-6
    )


def test_init_copies_and_never_zeros():
  params = init_params()
  state = jepa_ema.ema(0.9).init(params)
  chex.assert_trees_all_equal(state.target, params)
  for a, b in zip(jax.tree.leaves(state.target), jax.tree.leaves(params)):
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  # Donating the params afterwards must not delete the target.
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
  assert not any(x.is_deleted() for x in jax.tree.leaves(state.target))
  jitted = jax.jit(jepa_ema.ema(0.9).init)(init_params())
  chex.assert_trees_all_equal(jitted.target, init_params())
  assert jitted.step.dtype == jnp.int32 and int(jitted.step) == 0


def test_bf16_stagnates_without_f32_target_and_matches_closed_form_with_it():
  m, steps = 0.999, 2000
  params = {"w": jnp.zeros(256, jnp.bfloat16)}
  online = {"w": jnp.ones(256, jnp.bfloat16)}
  plain, wide = jepa_ema.ema(m), jepa_ema.ema(m, dtype=jnp.float32)
  with pytest.warns(jepa_ema.PrecisionWarning, match="bfloat16"):
    s_plain = plain.init(params)  # it says so at init
  s_wide = wide.init(params)
  assert s_plain.target["w"].dtype == jnp.bfloat16
  assert s_wide.target["w"].dtype == jnp.float32

  def run(tx, state):
    return jax.lax.fori_loop(0, steps, lambda i, s: tx.update(online, s), state)

  s_plain, s_wide = (
    jax.jit(run, static_argnums=0)(plain, s_plain),
    jax.jit(run, static_argnums=0)(wide, s_wide),
  )
  closed_form = 1.0 - m**steps  # 0.8648
  # bfloat16: (1 - m) * (1 - t) drops below half an ulp of t and the target
  # gets stuck far from the closed form.
  stuck = float(s_plain.target["w"][0])
  assert abs(stuck - closed_form) > 0.2, stuck
  np.testing.assert_allclose(
    np.asarray(s_wide.target["w"]), closed_form, rtol=1e-4
  )


def test_dtype_validation():
  with pytest.raises(ValueError, match="floating"):
    jepa_ema.ema(0.9, dtype=jnp.int32)
  with pytest.raises(TypeError, match="dtype"):
    jepa_ema.ema(0.9, dtype="not-a-dtype")
  with pytest.raises(ValueError, match="momentum"):
    jepa_ema.track_ema(2.0)
  with pytest.raises(TypeError, match="skip_nonfinite"):
    jepa_ema.ema(0.9, skip_nonfinite="yes")


def test_update_argument_order_is_checked():
  ema = jepa_ema.ema(0.9)
  state = ema.init({"w": jnp.ones(2)})
  with pytest.raises(TypeError, match="update\\(params, state\\)"):
    ema.update(state, {"w": jnp.ones(2)})


def test_update_mismatched_params_names_path():
  ema = jepa_ema.ema(0.9)
  state = ema.init({"enc": {"w": jnp.ones(2)}})
  with pytest.raises(ValueError, match=r"\['enc'\]\['w'\]"):
    ema.update({"enc": {"w": jnp.ones(3)}}, state)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_nonfinite(bad, maybe_jit):
  ema = jepa_ema.ema(0.5, skip_nonfinite=True)
  state = ema.init({"w": jnp.zeros(3), "c": jnp.array(0, jnp.int32)})
  update = maybe_jit(ema.update)
  state = update({"w": jnp.ones(3), "c": jnp.array(1, jnp.int32)}, state)
  before = np.asarray(state.target["w"]).copy()
  state = update(
    {"w": jnp.array([1.0, bad, 1.0]), "c": jnp.array(2, jnp.int32)}, state
  )
  np.testing.assert_array_equal(np.asarray(state.target["w"]), before)
  assert int(state.skipped) == 1 and int(state.step) == 2
  state = update({"w": jnp.ones(3), "c": jnp.array(3, jnp.int32)}, state)
  np.testing.assert_allclose(state.target["w"], 0.75)
  assert int(state.skipped) == 1 and int(state.step) == 3


def test_without_skip_nonfinite_nan_propagates():
  ema = jepa_ema.ema(0.5)
  state = ema.init({"w": jnp.zeros(2)})
  state = ema.update({"w": jnp.array([np.nan, 1.0])}, state)
  assert np.isnan(state.target["w"][0]) and int(state.skipped) == 0


def test_step_counter_saturates():
  ema = jepa_ema.ema(0.5)
  state = ema.init({"w": jnp.zeros(2)})
  imax = np.iinfo(np.int32).max
  state = state._replace(step=jnp.array(imax - 1, jnp.int32))
  state = ema.update({"w": jnp.ones(2)}, state)
  state = ema.update({"w": jnp.ones(2)}, state)
  assert int(state.step) == imax and state.step.dtype == jnp.int32


@pytest.mark.standard_promotion  # optax internals promote implicitly
@pytest.mark.parametrize("wrapper", ["ema", "track_ema"])
def test_one_compilation_over_100_steps(wrapper):
  sched = jepa_ema.cosine_momentum(total_steps=100)
  params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
  if wrapper == "ema":
    ema = jepa_ema.ema(sched)
    state = ema.init(params)
    step = jax.jit(chex.assert_max_traces(ema.update, n=1), donate_argnums=1)
    for i in range(100):
      state = step(jax.tree.map(lambda x: x * i, params), state)
  else:
    tx = optax.chain(optax.adam(1e-2), jepa_ema.track_ema(sched))
    state = tx.init(params)

    def train(params, state):
      updates, state = tx.update(params, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(chex.assert_max_traces(train, n=1), donate_argnums=(0, 1))
    for _ in range(100):
      params, state = step(params, state)
  assert step._cache_size() == 1
  ema_state = state if wrapper == "ema" else state[-1]
  assert int(ema_state.step) == 100


def test_get_target_errors_and_nesting():
  with pytest.raises(ValueError, match="No EmaState"):
    jepa_ema.get_target(optax.adam(1e-3).init({"w": jnp.ones(2)}))
  two = optax.chain(jepa_ema.track_ema(0.9), jepa_ema.track_ema(0.99))
  with pytest.raises(ValueError, match=r"2 EmaStates.*\[0\].*\[1\]"):
    jepa_ema.get_target(two.init({"w": jnp.ones(2)}))
  nested = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx = optax.multi_transform(
    {"a": optax.chain(nested, jepa_ema.track_ema(0.9)), "b": optax.sgd(1.0)},
    {"w": "a", "v": "b"},
  )
  state = tx.init({"w": jnp.ones(2), "v": jnp.zeros(1)})
  target = jepa_ema.get_target(state)
  np.testing.assert_array_equal(target["w"], 1.0)
  ema_state = jepa_ema.ema(0.9).init({"w": jnp.ones(2)})
  assert jepa_ema.get_target(ema_state) is ema_state.target


def _train(tx, params, opt_state, data):
  @jax.jit
  def step(params, opt_state, x, y):
    g = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for x, y in data:
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


@pytest.mark.standard_promotion  # optax internals promote implicitly
def test_checkpoint_round_trip_is_bit_identical():
  tx = optax.chain(
    optax.adam(1e-2),
    jepa_ema.track_ema(
      jepa_ema.cosine_momentum(0.9, 1.0, total_steps=40),
      dtype=jnp.float32,
      skip_nonfinite=True,
    ),
  )
  params = {k: v for k, v in init_params().items() if k != "n"}
  data = list(batches(20))
  full_p, full_s = _train(tx, params, tx.init(params), data)

  half_p, half_s = _train(tx, params, tx.init(params), data[:10])
  blob = flax.serialization.to_bytes((half_p, half_s))
  template = (params, tx.init(params))  # a fresh process would build this
  restored_p, restored_s = flax.serialization.from_bytes(template, blob)
  assert isinstance(restored_s[-1], jepa_ema.EmaState)
  assert int(restored_s[-1].step) == 10
  res_p, res_s = _train(tx, restored_p, restored_s, data[10:])
  for a, b in zip(
    jax.tree.leaves((full_p, full_s)), jax.tree.leaves((res_p, res_s))
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ema_state_round_trip_via_state_dict():
  ema = jepa_ema.ema(0.99)
  state = ema.update({"w": jnp.ones(3)}, ema.init({"w": jnp.zeros(3)}))
  d = flax.serialization.to_state_dict(state)
  assert set(d) == {"step", "target", "skipped", "drift", "key"}
  assert d["drift"] is None and d["key"] is None  # options off: no leaves
  back = flax.serialization.from_state_dict(ema.init({"w": jnp.zeros(3)}), d)
  chex.assert_trees_all_equal(back, state)


# ------------------------------------------- track_ema(...).momentum (round 4)


@pytest.mark.standard_promotion  # optax's MultiSteps inside
@pytest.mark.parametrize("wrap", ["plain", "chain", "multisteps", "masked"])
def test_track_ema_momentum_finds_its_state_anywhere(wrap):
  schedule = jepa_ema.linear_momentum(0.5, 1.0, total_steps=8)
  tx = jepa_ema.track_ema(schedule, every=2)
  assert isinstance(tx, optax.GradientTransformation) and len(tx) == 2
  params = {"w": jnp.zeros(2), "b": jnp.zeros(())}
  opt = {
    "plain": tx,
    "chain": optax.chain(optax.sgd(0.1), tx),
    "multisteps": optax.MultiSteps(
      optax.chain(optax.sgd(0.1), tx), every_k_schedule=3
    ),
    "masked": optax.chain(
      optax.sgd(0.1), optax.masked(tx, {"w": True, "b": False})
    ),
  }[wrap]
  state = opt.init(params)
  with pytest.raises(ValueError, match="no update yet"):
    tx.momentum(state)
  mini = 3 if wrap == "multisteps" else 1
  reference = jepa_ema.ema(schedule, every=2)
  for real in range(1, 6):
    for _ in range(mini):
      grads = {"w": jnp.ones(2), "b": jnp.ones(())}
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    # The last real update's momentum: 1 on the idle ones of every=2, the
    # window's product on the others.
    want = float(reference.momentum(real - 1))
    assert float(tx.momentum(state)) == want
    assert float(jax.jit(tx.momentum)(state)) == want
  assert float(tx.momentum(3)) == float(reference.momentum(3))
  # ema(...).momentum reads a nested optax state the same way.
  assert float(reference.momentum(state)) == float(tx.momentum(state))


def test_track_ema_momentum_errors():
  tx = jepa_ema.track_ema((0.9, 0.99))
  assert [float(m) for m in tx.momentum(0)] == pytest.approx([0.9, 0.99])
  with pytest.raises(ValueError, match=">= 0"):
    tx.momentum(-1)
  other = jepa_ema.track_ema(0.9)
  a = other.init({"w": jnp.zeros(2)})
  b = a._replace(step=jnp.int32(3))
  with pytest.raises(ValueError, match="different steps"):
    other.momentum((a._replace(step=jnp.int32(1)), b))
  with pytest.raises(TypeError, match="built by jepa_ema.track_ema"):
    jepa_ema.TrackEmaTransformation(*optax.sgd(0.1)).momentum(1)


@pytest.mark.parametrize("make", [jepa_ema.ema, jepa_ema.track_ema])
def test_transformations_hash_and_compare_by_identity_as_optax_does(make):
  # As optax's transformations: hashable whatever the options hold (a dict
  # policy), equal only to themselves, so one can be a static argument.
  policy = {"w": "average", "n": "copy"}
  a, b = make(0.9, policy=policy), make(0.9, policy=policy)
  assert hash(a) == hash(a) and a == a and a != b
  params = {"w": jnp.ones(2), "n": jnp.zeros(2)}
  init = jax.jit(lambda tx, p: tx.init(p), static_argnums=0)
  np.testing.assert_array_equal(
    jepa_ema.get_target(init(a, params))["w"], params["w"]
  )
