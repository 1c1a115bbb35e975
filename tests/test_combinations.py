"""Where two options meet: pins for the survivors of issue 27's mutation
audit and for the rules issue 30 decided.

Each test names the mutation it catches. The ones that need several devices
run one script (``tests/scripts/combination_layouts.py``) in a subprocess with 8 simulated CPU
devices, on Auto and Explicit mesh axes.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jepa_ema


def bitwise(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (
    a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  )


# ---------------------------------------------------- policy_by_path


@pytest.mark.parametrize(
  "rules, var",
  [
    ([(r"\['bn'\]", "copy"), (r"\['var'\]$", "keep")], "copy"),
    ([(r"\['var'\]$", "keep"), (r"\['bn'\]", "copy")], "keep"),
  ],
)
def test_policy_by_path_first_of_two_matching_rules_wins(rules, var):
  # Mutation: "last match wins" (both rules match ['bn']['var']).
  params = {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}, "w": jnp.ones(3)}
  out = jepa_ema.policy_by_path(rules, default="average")(params)
  assert out["bn"]["var"] == var
  assert out["bn"]["mean"] == "copy"
  assert out["w"] == "average"
  # and the mapping form keeps the order it was written in
  out = jepa_ema.policy_by_path(dict(rules), default="average")(params)
  assert out["bn"]["var"] == var


# ---------------------------------------------- get_target(online=)

POLICY = {"enc": "average", "base": "exclude", "bn": "copy"}


def params_at(i: int) -> dict:
  return {
    "enc": {"w": jnp.full((2, 3), 1.0 + i), "n": jnp.array(i)},
    "base": jnp.full(4, -2.0 * i),
    "bn": jnp.full(2, 0.5 * i),
  }


def check_filled(teacher, target, online):
  # stored leaves from the target (which differs from online), excluded
  # ones from online
  assert bitwise(teacher["enc"]["w"], target["enc"]["w"])
  assert not bitwise(teacher["enc"]["w"], online["enc"]["w"])
  assert bitwise(teacher["bn"], target["bn"])
  assert bitwise(teacher["base"], online["base"])
  assert jax.tree.structure(teacher) == jax.tree.structure(online)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_get_target_fills_only_excluded_leaves_after_updates(jit):
  # Mutation: every leaf taken from online (invisible right after init).
  e = jepa_ema.ema(0.5, policy=POLICY)
  state = e.init(params_at(0))
  for i in range(1, 3):
    state = e.update(params_at(i), state)
  online = params_at(7)
  get = jax.jit(jepa_ema.get_target) if jit else jepa_ema.get_target
  teacher = get(state, online=online)
  check_filled(teacher, state.target, online)
  np.testing.assert_array_equal(teacher["enc"]["w"], 2.25)  # 1, 1.5, 2.25


@pytest.mark.parametrize("index", [0, 1, -1])
def test_get_target_index_fills_only_excluded_leaves_after_updates(index):
  # The same on the index= path (several momenta, and a track_ema chain).
  e = jepa_ema.ema((0.5, 0.9), policy=POLICY)
  states = e.init(params_at(0))
  for i in range(1, 3):
    states = e.update(params_at(i), states)
  online = params_at(7)
  teacher = jepa_ema.get_target(states, index, online=online)
  check_filled(teacher, states[index].target, online)

  tx = optax.chain(
    optax.sgd(1.0), jepa_ema.track_ema((0.5, 0.9), policy=POLICY)
  )
  p = params_at(0)
  p["enc"].pop("n")  # sgd: floating leaves only
  online.pop("enc")
  online["enc"] = {"w": jnp.full((2, 3), 9.0)}
  opt_state = tx.init(p)
  grads = jax.tree.map(lambda x: -jnp.ones_like(x), p)
  for _ in range(2):
    updates, opt_state = tx.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
  teacher = jepa_ema.get_target(opt_state, index, online=online)
  check_filled(teacher, opt_state[1][index].target, online)


# -------------------------------------------------- write-back × keep


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_write_back_leaves_kept_copied_and_excluded_leaves_alone(jit):
  # Mutation: the EMA written back into kept leaves too.
  tx = jepa_ema.track_ema(
    0.5,
    write_back_every=1,
    policy={"a": "average", "k": "keep", "c": "copy", "x": "exclude"},
  )
  params = {name: jnp.zeros(2) for name in "akcx"}
  state = tx.init(params)
  updates = {name: jnp.ones(2) for name in "akcx"}
  update = jax.jit(tx.update) if jit else tx.update
  out, state = update(updates, state, params)
  new = optax.apply_updates(params, out)
  np.testing.assert_array_equal(new["a"], 0.5)  # moved to its EMA
  for name in "kcx":  # their own step: the post-step params
    np.testing.assert_array_equal(new[name], 1.0)
  np.testing.assert_array_equal(state.target["k"], 0.0)  # kept


# ------------------------------------------ momentum() × every, traced


def test_traced_momentum_is_one_between_updates_of_every_k():
  # Mutation: the "1 between updates" branch dropped (0.81 instead of 1).
  e = jepa_ema.ema(
    (0.9, jepa_ema.linear_momentum(0.5, 1.0, total_steps=8)), every=2
  )
  read = jax.jit(e.momentum)
  states = e.init({"w": jnp.zeros(2)})
  got = []
  for _ in range(4):
    states = e.update({"w": jnp.ones(2)}, states)
    got.append([float(m) for m in read(states)])
    assert got[-1] == [float(m) for m in e.momentum(states)]  # eager agrees
  assert got[0] == [1.0, 1.0] and got[2] == [1.0, 1.0]  # idle updates 0, 2
  np.testing.assert_allclose(got[1], [0.81, 0.5 * 0.5625], rtol=1e-6)
  np.testing.assert_allclose(got[3], [0.81, 0.625 * 0.6875], rtol=1e-6)
  # a traced step, too
  steps = jax.jit(jax.vmap(lambda t: e.momentum(t)[0]))(jnp.arange(4))
  np.testing.assert_allclose(steps, [1.0, 0.81, 1.0, 0.81], rtol=1e-6)


# ------------------------------------- copy into a half-precision target


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_copied_and_kept_leaves_keep_the_params_dtype_under_dtype(dtype):
  # Mutation: a copied float32 value into a bfloat16 target stored as
  # float32 (or the target's dtype applied to copied/kept leaves).
  e = jepa_ema.ema(
    0.5, dtype=dtype, policy={"w": "average", "c": "copy", "k": "keep"}
  )
  p0 = {n: jnp.full(3, 1.0 + 2**-20) for n in "wck"}  # not representable
  p1 = {n: jnp.full(3, 3.0 + 2**-20) for n in "wck"}
  state = jax.jit(e.update)(p1, e.init(p0))
  assert state.target["w"].dtype == dtype
  assert state.target["c"].dtype == jnp.float32
  assert state.target["k"].dtype == jnp.float32
  assert bitwise(state.target["c"], p1["c"])  # exact copy, not rounded
  assert bitwise(state.target["k"], p0["k"])
  np.testing.assert_array_equal(state.target["w"], 2.0)  # rounded to dtype


def test_half_params_copied_into_a_float32_target_stay_half():
  e = jepa_ema.ema(0.5, dtype=jnp.float32, policy={"w": "average", "c": "copy"})
  p = {n: jnp.full(3, 1.5, jnp.bfloat16) for n in "wc"}
  state = e.update(p, e.init(p))
  assert state.target["w"].dtype == jnp.float32
  assert state.target["c"].dtype == jnp.bfloat16


# ------------------------------------------------- clip × every window


@pytest.mark.parametrize(
  "window, m",
  [
    ((2.0, 0.5), 0.5),
    ((0.5, 2.0), 0.5),
    ((-0.5, 0.5), 0.0),
    ((1.5, -3.0), 0.0),
  ],
)
def test_each_momentum_is_clipped_before_the_window_product(window, m):
  # Mutation: clip after the product (2.0 * 0.5 = 1.0: target unchanged).
  table = jnp.asarray(window, jnp.float32)
  e = jepa_ema.ema(lambda s: table[s % 2], every=2)
  update = jax.jit(e.update)
  state = e.init({"w": jnp.zeros(2)})
  for _ in range(2):
    state = update({"w": jnp.ones(2)}, state)
  np.testing.assert_array_equal(state.target["w"], 1.0 - m)
  assert float(jax.jit(e.momentum)(state)) == m
  assert int(state.skipped) == 0  # clipped, not skipped


# ----------------------------------------------- presets at negative steps


PRESETS = {
  "tf_warmup": lambda: jepa_ema.tf_warmup_momentum(0.999),
  "exp_warmup": lambda: jepa_ema.exp_warmup_momentum(0.9999, tau=2.0),
  "warmup": lambda: jepa_ema.warmup_momentum(0.9999, start_step=3),
  "power": lambda: jepa_ema.power_momentum(gamma=6.94),
  "halflife": lambda: jepa_ema.halflife_momentum(10.0, rampup=0.5),
  "linear": lambda: jepa_ema.linear_momentum(0.5, 1.0, total_steps=10),
  "cosine": lambda: jepa_ema.cosine_momentum(0.5, 1.0, total_steps=10),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_at_negative_steps_are_their_step_zero_value(name):
  # Mutation: no clamp of the step (tf_warmup_momentum(0.999)(-5) = -0.8).
  schedule = PRESETS[name]()
  at0 = float(schedule(0))
  for step in (-1, -5, -1000):
    got = float(schedule(step))
    assert 0.0 <= got <= 1.0, (name, step, got)
    assert got == at0, (name, step, got, at0)
  traced = jax.jit(jax.vmap(schedule))(jnp.array([-5, -1, 0], jnp.int32))
  np.testing.assert_array_equal(traced, np.float32(at0))


def test_tf_warmup_at_negative_steps_by_value():
  np.testing.assert_allclose(jepa_ema.tf_warmup_momentum(0.999)(-5), 0.1)
  np.testing.assert_allclose(
    jepa_ema.exp_warmup_momentum(0.9999, tau=2.0)(-5),
    0.9999 * (1 - np.exp(-0.5)),
    rtol=1e-6,
  )


# ---------------------------------------------------- issue 30's rules


def test_skip_leaves_copied_and_integer_leaves_bitwise():
  # Decision 1, the exact inputs of issue 30 (eager and jit).
  ema = jepa_ema.ema(
    0.5,
    skip_nonfinite=True,
    policy={"w": "average", "stats": "copy", "n": "average"},
  )
  init = ema.init({"w": jnp.ones(2), "stats": jnp.ones(2), "n": jnp.array(3)})
  bad = {
    "w": jnp.full(2, 3.0),
    "stats": jnp.array([jnp.nan, 5.0]),
    "n": jnp.array(7),
  }
  for update in (ema.update, jax.jit(ema.update)):
    s = update(bad, init)
    assert int(s.skipped) == 1 and int(s.step) == 1
    for k in ("w", "stats", "n"):
      assert bitwise(s.target[k], init.target[k]), (k, s.target[k])


def test_nonfinite_traced_momentum_leaves_the_whole_target():
  # Decision 1: a NaN momentum under jit counts as 1 and as a skip: copied
  # and integer leaves are not written either.
  e = jepa_ema.ema(
    lambda s: jnp.log(-1.0 - s.astype(jnp.float32)),
    policy={"w": "average", "c": "copy", "n": "average"},
  )
  p0 = {"w": jnp.zeros(2), "c": jnp.zeros(2), "n": jnp.array(1)}
  p1 = {"w": jnp.ones(2), "c": jnp.ones(2), "n": jnp.array(2)}
  s0 = e.init(p0)
  s = jax.jit(e.update)(p1, s0)
  assert int(s.skipped) == 1
  for k in p0:
    assert bitwise(s.target[k], s0.target[k]), k


def test_skip_keeps_the_previous_drift():
  # Decision 1: drift is not recomputed on a skipped update.
  e = jepa_ema.ema(0.5, drift=True, skip_nonfinite=True)
  s = e.update({"w": jnp.full(4, 3.0)}, e.init({"w": jnp.ones(4)}))
  before = s.drift["global"]
  s = e.update({"w": jnp.array([5.0, jnp.nan, 5.0, 5.0])}, s)
  assert int(s.skipped) == 1
  assert bitwise(s.drift["global"], before)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_drift_is_nan_when_the_params_hold_nan_or_inf(bad):
  # Decision 2, issue 30's inputs: never a 0 that reads as "close".
  e = jepa_ema.ema(0.5, drift=True)
  p = {"enc": jnp.array([5.0, bad, 5.0, 5.0]), "head": jnp.ones(2)}
  s = e.update(p, e.init({"enc": jnp.ones(4), "head": jnp.ones(2)}))
  assert np.isnan(s.drift["global"])
  assert np.isnan(s.drift["per_module"]["enc"])
  assert np.isfinite(s.drift["per_module"]["head"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("target_dtype", [jnp.float32, None])
def test_track_ema_averages_the_rounded_post_step_params_under_jit(
  dtype, target_dtype
):
  # Decision 3: bitwise optax.apply_updates, eager and jitted, m = 0.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.uniform(-4, 4, 4096), dtype)}
  grads = {"w": jnp.asarray(rng.normal(0, 0.02, 4096), dtype)}
  tx = optax.chain(optax.sgd(1.0), jepa_ema.track_ema(0.0, dtype=target_dtype))
  sgd = optax.sgd(1.0)
  post = optax.apply_updates(params, sgd.update(grads, sgd.init(params))[0])

  def step(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for f in (step, jax.jit(step)):
    new, opt_state = f(params, tx.init(params))
    assert bitwise(new["w"], post["w"])
    target = jepa_ema.get_target(opt_state)["w"]
    assert bitwise(target, post["w"].astype(target.dtype))


@pytest.mark.parametrize("step", [2**31, 2**31 + 3, 2**40])
def test_ema_update_takes_every_step_make_ema_update_takes(step):
  # Decision 4: a Python int >= 2**31 with an optax schedule.
  sched = optax.linear_schedule(0.9, 1.0, 100)
  t, o = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  a = jepa_ema.ema_update(t, o, step, sched)
  b = jepa_ema.make_ema_update(sched, donate=False)(t, o, step)
  assert bitwise(a["w"], b["w"])
  np.testing.assert_array_equal(a["w"], 0.0)  # the schedule's end: 1.0


def test_per_module_drift_keys():
  # Decision 5: top-level entries holding an averaged floating leaf, keyed
  # by str; a list gives '0', '1'; a bare array gives {}.
  def keys(params, **kw):
    e = jepa_ema.ema(0.5, drift=True, **kw)
    s = e.update(params, e.init(params))
    return sorted(s.drift["per_module"])

  p = {"enc": jnp.ones(2), "bn": jnp.ones(2), "n": jnp.array(1)}
  assert keys(p, policy={"enc": "average", "bn": "copy", "n": "average"}) == [
    "enc"
  ]
  assert keys(p) == ["bn", "enc"]
  assert keys([jnp.ones(2), jnp.array(1), {"a": jnp.ones(1)}]) == ["0", "2"]
  assert keys(jnp.ones(3)) == []


def test_write_back_every_counts_target_updates():
  # Decision 6: with every=2 and write_back_every=3, write-back on the
  # calls that update the target and are its updates 2, 5, ... (steps 5,
  # 11), never on an idle call.
  tx = jepa_ema.track_ema(0.5, every=2, write_back_every=3)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  written = []
  for call in range(12):
    updates = {"w": jnp.ones(2)}
    out, state = tx.update(updates, state, params)
    new = optax.apply_updates(params, out)
    if not bitwise(new["w"], optax.apply_updates(params, updates)["w"]):
      written.append(call)
    params = new
  assert written == [5, 11]


def test_precision_warning_judges_the_window_momentum():
  # Decision 7: ema(0.8, every=4) with a bfloat16 target applies 0.8**4 =
  # 0.41 per update: no stall, no warning; every=1 at 0.8 warns.
  p = {"w": jnp.zeros(4, jnp.bfloat16)}
  with warnings.catch_warnings():
    warnings.simplefilter("error", jepa_ema.PrecisionWarning)
    jepa_ema.ema(0.8, every=4).init(p)
  with pytest.warns(jepa_ema.PrecisionWarning):
    jepa_ema.ema(0.8).init(p)


def test_stochastic_rounding_at_m_zero_lands_on_a_neighbour():
  # Decision 9: the online float32 value rounded to either neighbour (exact
  # where representable); over many elements both neighbours occur.
  rng = np.random.default_rng(0)
  online = rng.uniform(1, 2, 4096).astype(np.float32)
  online[:8] = [1.0, 1.5, 1.25, 1.75, 1.125, 1.0078125, 2.0, 1.5]
  e = jepa_ema.ema(0.0, dtype=jnp.bfloat16, rounding="stochastic", key=3)
  s = e.update({"w": jnp.asarray(online)}, e.init({"w": jnp.zeros(4096)}))
  got = np.asarray(s.target["w"]).astype(np.float64)
  ulp = 2.0**-7  # in [1, 2)
  assert (np.abs(got - online) < ulp).all()
  np.testing.assert_array_equal(got[:8], online[:8])  # representable
  assert (got > online).any() and (got < online).any()


# ----------------------------------------------- 8 devices, Auto / Explicit


@pytest.fixture(scope="module")
def eight(on_eight_devices):
  return on_eight_devices("combination_layouts.py")


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("name", ["exclude_first", "exclude_middle"])
def test_policy_with_a_non_uniform_prefix_of_target_shardings(
  eight, axes, name
):
  # Mutation: a stored-layout list that ignores the policy shifts each
  # leaf's sharding by one (['b'] gets P('data') instead of P(None, 'model')).
  r = eight[axes][name]
  assert r["specs"] == {"eager": True, "jit": True, "update": True}, (
    r["got"],
    r["want"],
  )
  assert r["excluded_none"] is True
  assert r["bitwise"] is True
  assert r["state_shardings"] is True


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("name", ["exclude_first", "exclude_middle"])
def test_get_target_online_under_a_policy_and_target_shardings(
  eight, axes, name
):
  # Round 4: filled and laid out like online.
  r = eight[axes][name]
  assert r["get_target_values"] is True
  assert r["get_target_layout"] is True


# --------------------------- survivors of the package-wide mutation run
# (tools/mutate.py; docs/testing.md lists each survivor and its verdict)


@pytest.mark.parametrize("policy", [None, {"w": "average", "tag": "copy"}])
def test_non_array_leaves_are_taken_from_online_as_they_are(policy):
  # guarantees.md: a string or a function in the tree is taken from online,
  # unchecked, by init, update and ema_update, with or without a policy.
  # Kills giving non-array leaves a stored dtype in the plan (a string has
  # none: init raised).
  params = {"w": jnp.ones(3), "tag": "enc", "act": jax.nn.relu}
  if policy is not None:
    policy = {**policy, "act": "copy"}
  tx = jepa_ema.ema(0.5, policy=policy)
  state = tx.init(params)
  assert state.target["tag"] == "enc" and state.target["act"] is jax.nn.relu
  new = {"w": jnp.zeros(3), "tag": "dec", "act": jax.nn.gelu}
  state = tx.update(new, state)
  assert state.target["tag"] == "dec" and state.target["act"] is jax.nn.gelu
  np.testing.assert_array_equal(state.target["w"], np.full(3, 0.5, np.float32))
  out = jepa_ema.ema_update(state.target, params, 0, 0.5, policy=policy)
  assert out["tag"] == "enc" and out["act"] is jax.nn.relu
  np.testing.assert_array_equal(out["w"], np.full(3, 0.75, np.float32))


def test_state_shardings_of_params_given_as_shardings_with_target_sharding():
  # params may be given as shardings (the out_shardings of the params);
  # a target_sharding on the same devices fits them (no test passed
  # shardings and a target_sharding together: checking the device sets
  # backwards passed).
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((1,), ("data",))
  params = {"w": NamedSharding(mesh, P()), "b": NamedSharding(mesh, P())}
  wanted = NamedSharding(mesh, P("data"))
  out = jepa_ema.state_shardings(
    params, target_sharding={"w": wanted, "b": None}
  )
  assert out.target["w"] == wanted and out.target["b"] == params["b"]


def test_a_state_holding_no_ema_state_is_named_whatever_the_memory_kind():
  # One message per mistake: a state without an EmaState is that mistake,
  # also when memory_kind is given as a one-element tuple.
  params = {"w": jax.device_put(jnp.zeros(4))}
  for kind in (None, (None,)):
    with pytest.raises(ValueError, match="holds no EmaState"):
      jepa_ema.state_shardings(params, {"not": jnp.zeros(())}, memory_kind=kind)


def test_abstract_state_on_explicit_axes_gets_the_params_own_layout():
  # An abstract state on Explicit axes carries its layout (on an abstract
  # mesh); state_shardings reports it on the params' concrete mesh, spelled
  # as the params spell it where the two are the same layout.
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = {
      "w": jax.device_put(jnp.zeros((4, 2)), NamedSharding(mesh, P("data")))
    }
    abstract = jax.eval_shape(jepa_ema.ema(0.9).init, params)
    assert isinstance(
      abstract.target["w"].sharding.mesh, jax.sharding.AbstractMesh
    )
    out = jepa_ema.state_shardings(params, abstract)
  assert out.target["w"] == params["w"].sharding
  assert out.target["w"].spec == P("data")  # the params' spelling
  # A state laid out on a mesh that is none of the params' (other axis
  # names): its layout cannot be placed, so the params' layout is reported.
  other = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(other):
    elsewhere = {
      "w": jax.device_put(jnp.zeros((4, 2)), NamedSharding(other, P("model")))
    }
    abstract = jax.eval_shape(jepa_ema.ema(0.9).init, elsewhere)
  out = jepa_ema.state_shardings(params, abstract)
  assert out.target["w"] == params["w"].sharding


@pytest.mark.parametrize("policy", [None, {"a": "average", "b": "copy"}])
def test_a_mismatched_target_hints_at_none_only_when_the_policy_excludes(
  policy,
):
  # The hint "the target holds None in their place" belongs to a policy
  # that excludes leaves; other mismatches get the plain message. The
  # second of two targets is checked against the plan made from the first.
  online = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = jepa_ema.ema((0.9, 0.99), policy=policy)
  first, second = tx.init(online)
  with pytest.raises(ValueError) as plain:
    tx.update(online, (first, second._replace(target={"a": jnp.ones(2)})))
  assert "holds None in" not in str(plain.value)
  tx = jepa_ema.ema((0.9, 0.99), policy={"a": "average", "b": "exclude"})
  first, second = tx.init(online)
  with pytest.raises(ValueError, match="holds None in their place"):
    tx.update(online, (first, second._replace(target=online)))
