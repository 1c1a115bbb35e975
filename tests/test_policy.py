"""policy=: per-leaf actions (average, copy, keep, exclude), policy_by_path,
get_target(online=), every option under a policy, and track_ema write-back.
Each against a float64 replay or a hand-worked case."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import jepa_ema

POLICY = {
  "enc": "average",
  "bn": {"mean": "copy", "var": "keep"},
  "base": "exclude",
}


def params_at(i):
  """A trajectory: every leaf changes at every step."""
  r = np.random.default_rng(i)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
  return {
    "enc": {"w": f(3, 2), "b": f(2)},
    "bn": {"mean": f(2), "var": f(2)},
    "base": {"w": f(4, 4)},
    "n": jnp.array(i),
  }


def replay(p0, seq, momenta, actions):
  """float64 replay of the four actions, per leaf path."""
  flat0 = {
    jax.tree_util.keystr(k): np.float64(v)
    for k, v in jax.tree_util.tree_flatten_with_path(p0)[0]
  }
  state = dict(flat0)
  for p, m in zip(seq, momenta):
    flat = {
      jax.tree_util.keystr(k): np.float64(v)
      for k, v in jax.tree_util.tree_flatten_with_path(p)[0]
    }
    for key, v in flat.items():
      a = actions(key)
      if a == "average":
        state[key] = (
          m * state[key] + (1 - m) * v if not key.startswith("['n']") else v
        )
      elif a == "copy":
        state[key] = v
  return state, flat0


def action_of(key):
  if key.startswith("['base']"):
    return "exclude"
  if key.startswith("['bn']['mean']"):
    return "copy"
  if key.startswith("['bn']['var']"):
    return "keep"
  return "average"


POLICY_FULL = {**POLICY, "n": "average"}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit-donated"])
def test_each_action_against_a_float64_replay(jit):
  sched = jepa_ema.linear_momentum(0.5, 0.9, total_steps=6)
  ema = jepa_ema.ema(sched, policy=POLICY_FULL)
  update = ema.jit() if jit else ema.update
  p0 = params_at(0)
  state = ema.init(p0)
  assert state.target["base"] == {"w": None}  # excluded: nothing stored
  seq = [params_at(i) for i in range(1, 8)]
  for p in seq:
    old = {
      jax.tree_util.keystr(k): x
      for k, x in jax.tree_util.tree_flatten_with_path(state.target)[0]
    }
    state = update(p, state)
    if jit:  # averaged and kept leaves in place (a copy is the online value)
      assert all(
        x.is_deleted()
        for k, x in old.items()
        if action_of(k) in ("average", "keep") and k != "['n']"
      )
  ref, flat0 = replay(
    p0, seq, [float(np.float32(sched(t))) for t in range(7)], action_of
  )
  got = {
    jax.tree_util.keystr(k): v
    for k, v in jax.tree_util.tree_flatten_with_path(state.target)[0]
  }
  assert set(got) == {k for k in ref if action_of(k) != "exclude"}
  for key, v in got.items():
    a = action_of(key)
    if a == "copy":  # bitwise the last online value
      np.testing.assert_array_equal(v, np.asarray(ref[key], np.float32))
    elif a == "keep":
      np.testing.assert_array_equal(
        v, np.asarray(flat0[key], np.float32)
      )  # bitwise
    else:
      np.testing.assert_allclose(np.float64(v), ref[key], rtol=1e-6, atol=1e-6)


def test_ema_update_and_make_ema_update_take_a_policy():
  p0, p1 = params_at(0), params_at(1)
  target = ema_target = jepa_ema.ema(0.5, policy=POLICY_FULL).init(p0).target
  out = jepa_ema.ema_update(target, p1, 0, 0.5, policy=POLICY_FULL)
  assert out["base"] == {"w": None}
  np.testing.assert_array_equal(out["bn"]["mean"], p1["bn"]["mean"])
  np.testing.assert_array_equal(out["bn"]["var"], p0["bn"]["var"])
  np.testing.assert_allclose(
    out["enc"]["w"], (p0["enc"]["w"] + p1["enc"]["w"]) / 2, rtol=1e-6
  )
  fn = jepa_ema.make_ema_update(0.5, policy=POLICY_FULL)
  again = fn(jax.tree.map(jnp.copy, ema_target), p1, 0)
  chex_equal(again, out)
  for s in range(2, 6):  # no recompilation with the step
    again = fn(again, p1, s)
  assert fn._cache_size() == 1


def chex_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_policy_none_is_bitwise_the_default_rule():
  seq = [params_at(i) for i in range(6)]
  for opts in ({}, {"every": 2}, {"drift": True}, {"skip_nonfinite": True}):
    a, b = (
      jepa_ema.ema(0.9, **opts),
      jepa_ema.ema(0.9, policy="average", **opts),
    )
    sa, sb = a.init(seq[0]), b.init(seq[0])
    for p in seq:
      sa, sb = jax.jit(a.update)(p, sa), jax.jit(b.update)(p, sb)
    chex_equal(sa, sb)


def state_bytes(state):
  return sum(x.nbytes for x in jax.tree.leaves(state))


def test_excluded_leaves_take_no_memory():
  """A ViT-B-like tree with rank-8 adapters: the EMA of the adapters alone
  holds the adapters' bytes (plus the two int32 counters), not the model's."""
  width, depth, rank = 768, 12, 8
  params = {
    f"block{i}": {
      "qkv": {
        "w": jnp.zeros((width, 3 * width)),
        "lora_a": jnp.zeros((width, rank)),
        "lora_b": jnp.zeros((rank, 3 * width)),
      },
      "mlp": {"w": jnp.zeros((width, 4 * width))},
    }
    for i in range(depth)
  }
  lora = jepa_ema.policy_by_path([(r"lora_", "average")], default="exclude")
  full, small = (
    jepa_ema.ema(0.999).init(params),
    jepa_ema.ema(0.999, policy=lora).init(params),
  )
  adapters = sum(
    x.nbytes
    for k, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if "lora" in jax.tree_util.keystr(k)
  )
  assert state_bytes(small) == adapters + 8
  assert state_bytes(full) == sum(x.nbytes for x in jax.tree.leaves(params)) + 8
  assert state_bytes(small) / state_bytes(full) < 0.01


def test_get_target_fills_excluded_leaves_from_online():
  p = params_at(0)
  tx = optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.9, policy=POLICY_FULL))
  opt_state = tx.init(p)
  assert jepa_ema.get_target(opt_state)["base"] == {"w": None}
  teacher = jepa_ema.get_target(opt_state, online=p)
  np.testing.assert_array_equal(teacher["base"]["w"], p["base"]["w"])
  assert jax.tree.structure(teacher) == jax.tree.structure(p)
  with pytest.raises(ValueError, match="online"):
    jepa_ema.get_target(opt_state, online={"enc": 1})


def test_options_under_a_policy():
  seq = [params_at(i) for i in range(1, 9)]
  p0 = params_at(0)
  # every=k: copies happen on update steps only.
  ema = jepa_ema.ema(0.5, every=4, policy=POLICY_FULL)
  state = ema.init(p0)
  for i, p in enumerate(seq[:6]):
    state = ema.update(p, state)
    if i == 3:
      np.testing.assert_array_equal(state.target["bn"]["mean"], p["bn"]["mean"])
  np.testing.assert_array_equal(
    state.target["bn"]["mean"], seq[3]["bn"]["mean"]
  )
  # several momenta: each target obeys the policy.
  states = jepa_ema.ema((0.5, 0.9), policy=POLICY_FULL).init(p0)
  assert all(s.target["base"] == {"w": None} for s in states)
  # dtype= applies to averaged leaves; copy and keep leaves keep theirs.
  st16 = jepa_ema.ema(0.5, dtype=jnp.bfloat16, policy=POLICY_FULL).init(p0)
  assert st16.target["enc"]["w"].dtype == jnp.bfloat16
  assert st16.target["bn"]["mean"].dtype == jnp.float32
  # drift: over the averaged leaves only (per module: "enc" and "n" absent:
  # "n" is an int).
  ema = jepa_ema.ema(0.5, drift=True, policy=POLICY_FULL)
  state = ema.update(seq[0], ema.init(p0))
  assert set(state.drift["per_module"]) == {"enc"}
  t, o = state.target["enc"], seq[0]["enc"]
  num = sum(float(jnp.sum((t[k] - o[k]) ** 2)) for k in t)
  den = sum(float(jnp.sum(o[k] ** 2)) for k in t)
  np.testing.assert_allclose(
    float(state.drift["global"]), np.sqrt(num / den), rtol=1e-5
  )
  # skip_nonfinite checks the leaves that enter the target.
  ema = jepa_ema.ema(0.5, skip_nonfinite=True, policy=POLICY_FULL)
  state = ema.init(p0)
  bad_base = {**seq[0], "base": {"w": jnp.full((4, 4), jnp.nan)}}
  assert int(ema.update(bad_base, state).skipped) == 0  # excluded: not read
  bad_var = {**seq[0], "bn": {**seq[0]["bn"], "var": jnp.full(2, jnp.nan)}}
  assert int(ema.update(bad_var, state).skipped) == 0  # kept: not read
  bad_mean = {**seq[0], "bn": {**seq[0]["bn"], "mean": jnp.full(2, jnp.nan)}}
  assert int(ema.update(bad_mean, state).skipped) == 1  # copied: read


def test_checkpoints_with_excluded_leaves_resume_bit_identically(tmp_path):
  seq = [params_at(i) for i in range(10)]
  ema = jepa_ema.ema(0.9, policy=POLICY_FULL)
  update = jax.jit(ema.update)
  a = ema.init(seq[0])
  for p in seq[:5]:
    a = update(p, a)
  # flax.serialization
  restored = flax.serialization.from_bytes(
    ema.init(seq[0]), flax.serialization.to_bytes(a)
  )
  chex_equal(restored, a)
  # orbax
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ck", a)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "ck", jax.eval_shape(ema.init, seq[0]))
  chex_equal(back, a)
  for p in seq[5:]:
    a, back = update(p, a), update(p, back)
  chex_equal(back, a)


def test_state_shardings_leave_excluded_leaves_none():
  p = params_at(0)
  ema = jepa_ema.ema(0.9, policy=POLICY_FULL)
  sh = jepa_ema.state_shardings(p, jax.eval_shape(ema.init, p))
  assert sh.target["base"] == {"w": None}
  assert sh.target["enc"]["w"] == p["enc"]["w"].sharding
  state = jax.jit(ema.init, out_shardings=sh)(p)
  assert state.target["base"] == {"w": None}


def test_policy_by_path_first_match_wins_and_validates():
  pol = jepa_ema.policy_by_path(
    {r"bn": "copy", r"bn\]\['var": "keep"}, default="exclude"
  )
  out = pol(params_at(0))
  assert out["bn"] == {"mean": "copy", "var": "copy"}  # the first rule matched
  assert out["enc"] == {"w": "exclude", "b": "exclude"}
  with pytest.raises(ValueError, match="unknown policy action 'avg'"):
    jepa_ema.policy_by_path([("x", "avg")])
  with pytest.raises(ValueError, match="cannot compile"):
    jepa_ema.policy_by_path([("(", "copy")])
  with pytest.raises(TypeError, match="pair"):
    jepa_ema.policy_by_path(["copy"])


@pytest.mark.parametrize(
  "policy,match",
  [
    ("mean", "unknown policy action 'mean' at <every leaf>"),
    (
      {"enc": "average", "bn": "cpy", "base": "keep", "n": "copy"},
      r"'cpy' at \['bn'\]",
    ),
    ({"enc": "average", "bnn": "copy"}, r"\['bnn'\], which is not a key path"),
    ({"enc": {"w": "copy"}}, "does not fit the params"),
    (lambda p: {"enc": 3}, r"unknown policy action 3 at \['enc'\]"),
  ],
)
def test_bad_policies_are_reported_before_any_state_exists(policy, match):
  with pytest.raises(ValueError, match=match):
    jepa_ema.ema(0.9, policy=policy).init(params_at(0))


def test_a_target_without_the_excluded_nones_gets_a_hint():
  p = params_at(0)
  with pytest.raises(ValueError, match="holds None in their place"):
    jepa_ema.ema_update(p, p, 0, 0.9, policy=POLICY_FULL)


# ------------------------------------------------------------- property test

LEAF_KEYS = ["a", "b", "c", "d"]
actions = st.sampled_from(jepa_ema.policy.ACTIONS)


@st.composite
def trees_and_policies(draw):
  """A two-level tree of float32 / int32 leaves and a random prefix policy:
  per top-level key either one action or one per leaf."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  tree, policy = {}, {}
  for k in draw(
    st.lists(st.sampled_from(LEAF_KEYS), min_size=1, max_size=4, unique=True)
  ):
    sub = {}
    for j in range(draw(st.integers(1, 3))):
      shape = (draw(st.integers(0, 3)),)
      sub[f"x{j}"] = (
        jnp.asarray(rng.integers(-5, 5, shape), jnp.int32)
        if draw(st.booleans()) and j == 0
        else jnp.asarray(
          rng.normal(size=shape) * 10.0 ** draw(st.integers(-3, 3)), jnp.float32
        )
      )
    tree[k] = sub
    policy[k] = (
      draw(actions) if draw(st.booleans()) else {n: draw(actions) for n in sub}
    )
  online = jax.tree.map(lambda x: x + jnp.ones_like(x) * 3, tree)
  return tree, online, policy


@given(case=trees_and_policies(), m=st.floats(0.0, 1.0))
@example(
  case=(
    {"a": {"x0": jnp.zeros(2), "x1": jnp.array([3e38])}},
    {"a": {"x0": jnp.ones(2), "x1": jnp.array([-3e38])}},
    {"a": {"x0": "keep", "x1": "average"}},
  ),
  m=0.5,
)
@example(
  case=({"a": {"x0": jnp.zeros(2)}}, {"a": {"x0": jnp.ones(2)}}, "exclude"),
  m=0.3,
)
def test_property_random_prefix_policies(case, m):
  tree, online, policy = case
  ema = jepa_ema.ema(m, policy=policy)
  state = jax.jit(ema.update)(online, ema.init(tree))
  acts = jepa_ema.policy.resolve(policy, tree)
  init_leaves = jax.tree.leaves(tree)
  online_leaves = jax.tree.leaves(online)
  out = jax.tree.leaves(state.target)
  assert len(out) == sum(a != "exclude" for a in acts)
  it = iter(out)
  for a, t, o in zip(acts, init_leaves, online_leaves):
    if a == "exclude":
      continue
    y = next(it)
    assert y.dtype == t.dtype and y.shape == t.shape
    if a == "keep":
      np.testing.assert_array_equal(y, t)
    elif a == "copy" or not jnp.issubdtype(t.dtype, jnp.floating):
      np.testing.assert_array_equal(y, o)
    else:
      lo, hi = np.minimum(t, o), np.maximum(t, o)
      assert np.all((np.asarray(y) >= lo) & (np.asarray(y) <= hi)), (t, o, y)


# --------------------------------------------------------------- write-back


def test_write_back_against_a_float64_replay_under_jit():
  n, w = 3, 0.25
  tx = optax.chain(
    optax.sgd(0.5),
    jepa_ema.track_ema(0.8, write_back_every=n, write_back_momentum=w),
  )
  params = {"w": jnp.array([1.0, -2.0])}
  grads = lambda p: {"w": p["w"] - 4.0}  # noqa: E731
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(grads(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p64, t64 = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  for t in range(10):
    params, opt_state = step(params, opt_state)
    p64 = p64 - 0.5 * (p64 - 4.0)  # sgd
    t64 = 0.8 * t64 + 0.2 * p64  # EMA of the post-step params
    if t % n == n - 1:
      p64 = w * p64 + (1 - w) * t64  # written back
    np.testing.assert_allclose(params["w"], p64, rtol=1e-6)
    np.testing.assert_allclose(
      jepa_ema.get_target(opt_state)["w"], t64, rtol=1e-6
    )
  assert step._cache_size() == 1


def test_write_back_zero_switches_the_model_to_its_ema_and_respects_the_policy():
  tx = jepa_ema.track_ema(
    0.5, write_back_every=1, policy={"a": "average", "b": "exclude"}
  )
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  state = tx.init(params)
  updates = {"a": jnp.ones(2), "b": jnp.ones(2)}
  out, state = tx.update(updates, state, params)
  new = optax.apply_updates(params, out)
  np.testing.assert_allclose(new["a"], jepa_ema.get_target(state)["a"])  # 0.5
  np.testing.assert_array_equal(new["b"], jnp.ones(2))  # excluded: its step


@pytest.mark.standard_promotion  # optax.MultiSteps' own arithmetic
def test_write_back_under_multisteps_counts_real_steps():
  inner = optax.chain(
    optax.sgd(1.0), jepa_ema.track_ema(0.5, write_back_every=2)
  )
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  for i in range(8):
    updates, state = tx.update({"w": -jnp.ones(1)}, state, params)
    params = optax.apply_updates(params, updates)
    if i % 2 == 1:  # a real step
      target = jepa_ema.get_target(state)
  # 4 real steps; written back on real steps 1 and 3: params == target then.
  np.testing.assert_allclose(params["w"], target["w"])


def test_write_back_bad_arguments():
  with pytest.raises(ValueError, match="write_back_every"):
    jepa_ema.track_ema(0.9, write_back_every=0)
  with pytest.raises(TypeError, match="write_back_every"):
    jepa_ema.track_ema(0.9, write_back_every=2.5)
  with pytest.raises(ValueError, match="write_back_momentum"):
    jepa_ema.track_ema(0.9, write_back_every=2, write_back_momentum=1.5)


def test_posthoc_snapshots_hold_the_stored_leaves_and_fill_completes(tmp_path):
  params = {"a": jnp.ones(3), "b": jnp.zeros(2)}
  sigmas = (0.05, 0.1)
  ema = jepa_ema.ema(
    tuple(jepa_ema.power_momentum(sigma_rel=s) for s in sigmas),
    policy={"a": "average", "b": "exclude"},
  )
  state = ema.init(params)
  snaps = jepa_ema.PostHocSnapshots(tmp_path / "s", sigmas, every=2)
  for i in range(6):
    state = ema.update({"a": jnp.full(3, float(i)), "b": jnp.zeros(2)}, state)
    snaps.maybe_save(state, ema)
  assert all(load()["b"] is None for _, _, load in snaps)  # nothing stored
  out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.1)
  assert out["b"] is None
  np.testing.assert_allclose(out["a"], state[1].target["a"], rtol=1e-6)
  full = jepa_ema.policy.fill(out, params)
  np.testing.assert_array_equal(full["b"], params["b"])


def test_policy_page_prints_what_it_says(capsys):
  import pathlib
  import re

  page = pathlib.Path(__file__).resolve().parents[1] / "docs/howto/policy.md"
  text = page.read_text()
  block = [
    b
    for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if "lora_only" in b
  ][0]
  ns = {"jax": jax, "jnp": jnp, "jepa_ema": jepa_ema}
  exec(compile(block, str(page), "exec"), ns)  # pylint: disable=exec-used
  said = re.search(r"prints\n\n```\n(.*?)```", text, flags=re.S).group(1)
  assert capsys.readouterr().out == said
  # By hand: the adapters' floats against every float, 4 bytes each, plus
  # the two int32 counters of each state.
  per_block = 768 * 8 + 8 * 3 * 768
  full = 12 * (768 * 3 * 768 + per_block + 768 * 4 * 768 + 4 * 768)
  assert ns["small"] == 12 * per_block * 4 + 8 and ns["full"] == full * 4 + 8
