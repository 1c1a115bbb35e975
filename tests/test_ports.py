"""The library's ports (``ema_pytorch_momentum``, ``diffusers_momentum``,
``timm_momentum``; docs/howto/porting.md) against each PyTorch library's rule.

Each reference below transcribes a library's update: its counters, the order
of increment and read, its branches (ema-pytorch 0.7 / 0.8 ``EMA.update`` /
``get_current_decay``; diffusers ``EMAModel.step`` / ``get_decay``; timm
``ModelEmaV3.update`` / ``get_decay`` as timm's ``train.py`` calls it), in
float64 on scalars. The schedules drive ``jepa_ema.ema`` over the same
random-walk params; the momentum of every update (read back with
``EmaTransformation.momentum``) and the target after it must agree.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jepa_ema

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs/howto/porting.md"
N = 400  # updates compared


def page_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


class EmaPytorch:
  """ema_pytorch.EMA: copy at the first call, act every ``update_every``-th
  call (a copy up to ``update_after_step``), the warm-up counted in calls
  after ``self.step += 1``."""

  def __init__(
    self,
    x0,
    beta=0.9999,
    update_after_step=100,
    update_every=10,
    inv_gamma=1.0,
    power=2 / 3,
    min_value=0.0,
  ):
    self.ema, self.step, self.initted = np.array(x0, np.float64), 0, False
    self.beta, self.u, self.every = beta, update_after_step, update_every
    self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value

  def current_decay(self):
    epoch = max(self.step - self.u - 1, 0)
    value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
    if epoch <= 0:
      return 0.0
    return min(max(value, self.min_value), self.beta)

  def update(self, online):
    step = self.step
    self.step += 1
    if not self.initted:
      self.ema, self.initted = np.array(online, np.float64), True
      return 0.0
    should_update = step % self.every == 0
    if should_update and step <= self.u:
      self.ema = np.array(online, np.float64)
      return 0.0
    if should_update:
      decay = self.current_decay()
      self.ema = self.ema + (1 - decay) * (online - self.ema)
      return decay
    return 1.0


class Diffusers:
  """diffusers EMAModel: ``optimization_step += 1`` before ``get_decay``."""

  def __init__(
    self,
    x0,
    decay=0.9999,
    min_decay=0.0,
    update_after_step=0,
    use_ema_warmup=False,
    inv_gamma=1.0,
    power=2 / 3,
  ):
    self.shadow, self.optimization_step = np.array(x0, np.float64), 0
    self.decay, self.min_decay, self.u = decay, min_decay, update_after_step
    self.warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power

  def get_decay(self, optimization_step):
    step = max(0, optimization_step - self.u - 1)
    if step <= 0:
      return 0.0
    if self.warmup:
      cur = 1 - (1 + step / self.inv_gamma) ** -self.power
    else:
      cur = (1 + step) / (10 + step)
    cur = min(cur, self.decay)
    return max(cur, self.min_decay)

  def update(self, online):
    self.optimization_step += 1
    decay = self.get_decay(self.optimization_step)
    self.shadow = self.shadow - (1 - decay) * (self.shadow - online)
    return decay


class Timm:
  """timm ModelEmaV3, updated as train.py does (``num_updates += 1`` then
  ``update(model, step=num_updates)``)."""

  def __init__(
    self,
    x0,
    decay=0.9999,
    min_decay=0.0,
    update_after_step=0,
    use_warmup=False,
    warmup_gamma=1.0,
    warmup_power=2 / 3,
  ):
    self.module, self.num_updates = np.array(x0, np.float64), 0
    self.decay, self.min_decay, self.u = decay, min_decay, update_after_step
    self.warmup, self.gamma, self.power = use_warmup, warmup_gamma, warmup_power

  def get_decay(self, step):
    step = max(0, step - self.u - 1)
    if step <= 0:
      return 0.0
    if self.warmup:
      decay = 1 - (1 + step / self.gamma) ** -self.power
      return max(min(decay, self.decay), self.min_decay)
    return self.decay

  def update(self, online):
    self.num_updates += 1
    decay = self.get_decay(self.num_updates)
    self.module = self.module + (1 - decay) * (online - self.module)
    return decay


CASES = [  # (jepa_ema's port, reference, keyword arguments)
  ("ema_pytorch_momentum", EmaPytorch, {}),
  (
    "ema_pytorch_momentum",
    EmaPytorch,
    dict(
      beta=0.999,
      update_after_step=20,
      update_every=3,
      power=3 / 4,
      min_value=0.1,
    ),
  ),
  (
    "ema_pytorch_momentum",
    EmaPytorch,
    dict(update_after_step=0, update_every=1, inv_gamma=5.0, beta=0.99),
  ),
  ("diffusers_momentum", Diffusers, {}),
  ("diffusers_momentum", Diffusers, dict(use_ema_warmup=True)),
  (
    "diffusers_momentum",
    Diffusers,
    dict(update_after_step=7, min_decay=0.5, decay=0.99),
  ),
  (
    "diffusers_momentum",
    Diffusers,
    dict(use_ema_warmup=True, inv_gamma=3.0, power=0.75, update_after_step=4),
  ),
  ("timm_momentum", Timm, {}),
  (
    "timm_momentum",
    Timm,
    dict(
      use_warmup=True, update_after_step=10, min_decay=0.2, warmup_power=0.75
    ),
  ),
  ("timm_momentum", Timm, dict(decay=0.998, update_after_step=30)),
]
IDS = [
  "ema-pytorch defaults",
  "ema-pytorch other",
  "ema-pytorch every call",
  "diffusers defaults",
  "diffusers warmup",
  "diffusers other",
  "diffusers warmup other",
  "timm defaults",
  "timm warmup",
  "timm late copy",
]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_port_matches_the_library_update_by_update(case):
  name, reference, kwargs = case
  schedule = getattr(jepa_ema, name)(**kwargs)
  rng = np.random.default_rng(0)
  walk = np.cumsum(rng.normal(size=(N, 4)), axis=0) + 3.0  # the params
  x0 = rng.normal(size=4)  # the model at construction
  ref = reference(x0, **kwargs)
  ema = jepa_ema.ema(schedule)
  update = jax.jit(ema.update)
  # Read back under jit, as the update computes it: XLA may round a
  # chain of float32 operations differently from eager dispatch.
  momentum = jax.jit(ema.momentum)
  field = {EmaPytorch: "ema", Diffusers: "shadow", Timm: "module"}[reference]
  dm = dx = dx_replay = 0.0
  replay = np.array(x0, np.float64)  # the library's rule, with our momenta
  # float64 params and target: only the momentum differs (held in float32).
  with jax.enable_x64(True):
    state = ema.init({"w": jnp.asarray(x0, jnp.float64)})
    for t in range(N):
      want = ref.update(walk[t])
      state = update({"w": jnp.asarray(walk[t], jnp.float64)}, state)
      got = float(momentum(state))
      dm = max(dm, abs(got - want))
      if want in (0.0, 1.0):  # a copy, or a call that does not act
        assert got == want, (t, got, want)
      replay = replay + (1 - got) * (walk[t] - replay)
      target = np.asarray(state.target["w"], np.float64)
      dx = max(dx, float(np.max(np.abs(target - getattr(ref, field)))))
      dx_replay = max(dx_replay, float(np.max(np.abs(target - replay))))
  scale = float(np.max(np.abs(walk)))
  print(
    f"\n{name}{kwargs}: max |dm| {dm:.2g}, max |d target| {dx:.2g} "
    f"(params up to {scale:.0f})"
  )
  assert dm <= 1e-7  # the float32 rounding of the momentum, no more
  assert dx_replay <= 1e-12 * scale  # the same update rule
  # What the float32 momentum costs over 400 updates: at 0.9999, 1 - m is
  # 1.00002e-4 (0.017 % more than PyTorch's float64 1e-4).
  assert dx <= 1e-5 * scale, (dx, scale)


def test_ema_pytorch_update_every_is_not_every_k():
  """The reason for the port: every=10 moves at calls 9, 19, ... with the
  window's product; ema-pytorch at 0, 10, 20, ... with one step's
  momentum. Both hold the target between their moves."""
  schedule = jepa_ema.ema_pytorch_momentum(update_after_step=0)
  ms = [float(schedule(c)) for c in range(31)]
  assert [c for c, m in enumerate(ms) if m != 1.0] == [0, 10, 20, 30]
  every = jepa_ema.ema(0.9, every=10)
  assert [c for c in range(31) if float(every.momentum(c)) != 1.0] == [
    9,
    19,
    29,
  ]


def test_page_prints_what_it_says(capsys):
  text = PAGE.read_text()
  ns: dict = {}
  for block in page_blocks()[:4]:  # the three ports, then the read-back
    exec(compile(block, str(PAGE), "exec"), ns)  # pylint: disable=exec-used
  said = re.search(r"prints\n\n```\n(.*?)```", text, flags=re.S).group(1)
  assert capsys.readouterr().out == said
  # The printed warm-up value, by hand: 1 - (1 + 120 - 100) ** (-2/3).
  assert said.split()[0] == f"{1 - 21 ** (-2 / 3):.4f}"


PORTS = [
  jepa_ema.ema_pytorch_momentum,
  jepa_ema.diffusers_momentum,
  jepa_ema.timm_momentum,
]


@pytest.mark.parametrize("make", PORTS, ids=lambda f: f.__name__)
def test_ports_are_schedules_like_the_others(make):
  """Defaults are the library's; frozen, equal and hashed by value (one
  compilation for two equal schedules); jit and vmap give the eager values."""
  import dataclasses
  import inspect

  want = {
    "ema_pytorch_momentum": dict(
      beta=0.9999,
      update_after_step=100,
      update_every=10,
      inv_gamma=1.0,
      power=2 / 3,
      min_value=0.0,
    ),
    "diffusers_momentum": dict(
      decay=0.9999,
      min_decay=0.0,
      update_after_step=0,
      use_ema_warmup=False,
      inv_gamma=1.0,
      power=2 / 3,
    ),
    "timm_momentum": dict(
      decay=0.9999,
      min_decay=0.0,
      update_after_step=0,
      use_warmup=False,
      warmup_gamma=1.0,
      warmup_power=2 / 3,
    ),
  }[make.__name__]
  defaults = {
    k: p.default for k, p in inspect.signature(make).parameters.items()
  }
  assert defaults == want
  a, b = make(), make()
  assert a == b and hash(a) == hash(b) and dataclasses.asdict(a) == want
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.update_after_step = 3  # type: ignore[misc]
  steps = jnp.arange(0, 300, dtype=jnp.int32)
  eager = np.array([float(a(int(t))) for t in steps])
  np.testing.assert_array_equal(np.asarray(jax.vmap(a)(steps)), eager)
  f = jax.jit(lambda s, t: s(t), static_argnums=0)
  np.testing.assert_array_equal(
    np.array([float(f(a, t)) for t in steps[:20]]), eager[:20]
  )
  assert f(b, jnp.int32(5)) == f(a, jnp.int32(5))
  assert f._cache_size() == 1  # pylint: disable=protected-access
  assert a(jnp.int32(7)).dtype == jnp.float32


@pytest.mark.parametrize(
  "make,kwargs,exc,match",
  [
    (jepa_ema.ema_pytorch_momentum, dict(beta=1.5), ValueError, "`beta`"),
    (
      jepa_ema.ema_pytorch_momentum,
      dict(update_every=0),
      ValueError,
      "`update_every`",
    ),
    (
      jepa_ema.ema_pytorch_momentum,
      dict(update_after_step=-1),
      ValueError,
      "`update_after_step`",
    ),
    (jepa_ema.ema_pytorch_momentum, dict(power=0.0), ValueError, "`power`"),
    (
      jepa_ema.ema_pytorch_momentum,
      dict(update_every=2.5),
      TypeError,
      "integer",
    ),
    (
      jepa_ema.diffusers_momentum,
      dict(min_decay=-0.1),
      ValueError,
      "`min_decay`",
    ),
    (
      jepa_ema.diffusers_momentum,
      dict(inv_gamma=0.0),
      ValueError,
      "`inv_gamma`",
    ),
    (jepa_ema.diffusers_momentum, dict(use_ema_warmup=1), TypeError, "bool"),
    (jepa_ema.timm_momentum, dict(decay=float("nan")), ValueError, "`decay`"),
    (
      jepa_ema.timm_momentum,
      dict(warmup_power=-1.0),
      ValueError,
      "`warmup_power`",
    ),
    # 0 is refused too (the warm-up would be constant: 1 - 1 = 0 forever).
    (
      jepa_ema.timm_momentum,
      dict(warmup_power=0.0),
      ValueError,
      "`warmup_power`",
    ),
    (
      jepa_ema.timm_momentum,
      dict(warmup_gamma=0.0),
      ValueError,
      "`warmup_gamma`",
    ),
    (jepa_ema.timm_momentum, dict(use_warmup="yes"), TypeError, "`use_warmup`"),
    (
      jepa_ema.timm_momentum,
      dict(update_after_step=1.5),
      TypeError,
      "`update_after_step`",
    ),
  ],
)
def test_ports_are_validated_when_built(make, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    make(**kwargs)


def test_ema_pytorch_port_counts_calls_exactly_past_float32():
  """An int32 step beyond 2**24 (where float32 loses integers) still acts on
  every update_every-th call only."""
  schedule = jepa_ema.ema_pytorch_momentum()
  base = 2**25
  got = [float(schedule(jnp.int32(base + i))) for i in range(10)]
  acts = [i for i, m in enumerate(got) if m != 1.0]
  assert acts == [(10 - base % 10) % 10]
  assert 0.9998 < got[acts[0]] <= np.float32(0.9999)


def test_momentum_reads_the_last_update_and_any_step():
  ema = jepa_ema.ema(jepa_ema.linear_momentum(0.5, 1.0, total_steps=10))
  state = ema.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="no update yet"):
    ema.momentum(state)
  with pytest.raises(ValueError, match=">= 0"):
    ema.momentum(-1)
  for t in range(4):
    state = ema.update({"w": jnp.ones(2)}, state)
    assert float(ema.momentum(state)) == pytest.approx(0.5 + 0.05 * t)
  # Traced, inside the user's jit; several momenta give a tuple.
  assert float(jax.jit(ema.momentum)(state)) == pytest.approx(0.65)
  several = jepa_ema.ema((0.5, 0.9), every=2)
  states = several.init({"w": jnp.zeros(2)})
  for _ in range(2):
    states = several.update({"w": jnp.ones(2)}, states)
  m = several.momentum(states)
  assert [float(x) for x in m] == pytest.approx([0.25, 0.81])
  assert [float(x) for x in several.momentum(2)] == [1.0, 1.0]
  # It reads only the step: a track_ema state of the same momentum too.
  tx = jepa_ema.track_ema(0.9, every=2)
  opt_state = tx.init({"w": jnp.zeros(2)})
  for _ in range(3):
    _, opt_state = tx.update({"w": jnp.ones(2)}, opt_state, {"w": jnp.ones(2)})
  assert float(jepa_ema.ema(0.9, every=2).momentum(opt_state)) == 1.0
  with pytest.raises(TypeError, match="built by jepa_ema.ema"):
    jepa_ema.EmaTransformation(lambda p: p, lambda p, s: s).momentum(3)


# --------------------------------------------- the concepts page's presets


def concepts_ports() -> dict:
  text = (PAGE.parent.parent / "concepts.md").read_text()
  block = [
    b
    for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if "tf_warmup_momentum" in b
  ]
  assert len(block) == 1
  ns: dict = {}
  exec(compile(block[0], "concepts.md", "exec"), ns)  # pylint: disable=exec-used
  return ns


def praxis_decays(d, n):
  """praxis apply_ema_weights -> TF ExponentialMovingAverage(num_updates):
  decay = min(d, (1 + num_updates) / (10 + num_updates)), the count read
  before it is incremented."""
  out, num_updates = [], 0
  for _ in range(n):
    out.append(min(d, (1 + num_updates) / (10 + num_updates)))
    num_updates += 1
  return out


def ultralytics_decays(d, tau, n):
  """ultralytics ModelEMA.update: self.updates += 1, then
  d = decay * (1 - exp(-updates / tau))."""
  import math

  out, updates = [], 0
  for _ in range(n):
    updates += 1
    out.append(d * (1 - math.exp(-updates / tau)))
  return out


def test_concepts_presets_match_their_libraries_for_50_updates():
  ns = concepts_ports()
  d, n = ns["d"], 50
  ref = Diffusers(np.zeros(1), decay=d)
  diffusers = [ref.update(np.zeros(1)) for _ in range(n)]
  for name, want in (
    ("praxis", praxis_decays(d, n)),
    ("diffusers", diffusers),
    ("ultralytics", ultralytics_decays(0.9999, 2000.0, n)),
  ):
    schedule = jax.jit(ns[name])
    got = [float(schedule(jnp.int32(t))) for t in range(n)]
    np.testing.assert_allclose(got, want, rtol=0, atol=6e-8, err_msg=name)
  assert diffusers[0] == 0.0 and float(ns["diffusers"](0)) == 0.0


def test_kauldron_debias_is_not_a_moving_average():
  """The concepts page's claim, from kauldron's update rule: optax's bias
  correction applied to an average started at the params scales a
  constant model by 1 / (1 - d) at the first update."""
  d, p = 0.999, 2.0
  ema, count = p, 0  # init: the params
  count += 1
  ema = ((1 - d) * p + d * ema) / (1 - d**count)  # update_moment + debias
  assert ema == pytest.approx(p / (1 - d))  # 1000x, not p
