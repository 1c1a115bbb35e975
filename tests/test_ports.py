"""The ports of docs/howto/porting.md against each PyTorch library's rule.

Each reference below transcribes a library's update: its counters, the order
of increment and read, its branches (ema-pytorch 0.7 ``EMA.update`` /
``get_current_decay``; diffusers ``EMAModel.step`` / ``get_decay``; timm
``ModelEmaV3.update`` / ``get_decay`` as timm's ``train.py`` calls it), in
float64 on scalars. The page's schedules drive ``jepa_ema.ema`` over the
same random-walk params; the momentum of every update (read back with
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


def page_ports() -> dict:
  ns: dict = {}
  blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
  for block in blocks[:3]:  # the three ports
    exec(compile(block, str(PAGE), "exec"), ns)  # pylint: disable=exec-used
  return ns


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


CASES = [  # (page function, reference, keyword arguments)
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
  ("diffusers_momentum", Diffusers, {}),
  ("diffusers_momentum", Diffusers, dict(use_ema_warmup=True)),
  (
    "diffusers_momentum",
    Diffusers,
    dict(update_after_step=7, min_decay=0.5, decay=0.99),
  ),
  ("timm_momentum", Timm, {}),
  (
    "timm_momentum",
    Timm,
    dict(
      use_warmup=True, update_after_step=10, min_decay=0.2, warmup_power=0.75
    ),
  ),
]
IDS = [
  "ema-pytorch defaults",
  "ema-pytorch other",
  "diffusers defaults",
  "diffusers warmup",
  "diffusers other",
  "timm defaults",
  "timm warmup",
]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_port_matches_the_library_update_by_update(case):
  name, reference, kwargs = case
  schedule = page_ports()[name](**kwargs)
  rng = np.random.default_rng(0)
  walk = np.cumsum(rng.normal(size=(N, 4)), axis=0) + 3.0  # the params
  x0 = rng.normal(size=4)  # the model at construction
  ref = reference(x0, **kwargs)
  ema = jepa_ema.ema(schedule)
  update = jax.jit(ema.update)
  field = {EmaPytorch: "ema", Diffusers: "shadow", Timm: "module"}[reference]
  dm = dx = dx_replay = 0.0
  replay = np.array(x0, np.float64)  # the library's rule, with our momenta
  # float64 params and target: only the momentum differs (held in float32).
  with jax.enable_x64(True):
    state = ema.init({"w": jnp.asarray(x0, jnp.float64)})
    for t in range(N):
      want = ref.update(walk[t])
      state = update({"w": jnp.asarray(walk[t], jnp.float64)}, state)
      got = float(ema.momentum(state))
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
  schedule = page_ports()["ema_pytorch_momentum"](update_after_step=0)
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
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  ns = page_ports()
  exec(compile(blocks[3], str(PAGE), "exec"), ns)  # pylint: disable=exec-used
  said = re.search(r"prints\n\n```\n(.*?)```", text, flags=re.S).group(1)
  assert capsys.readouterr().out == said
  # The printed warm-up value, by hand: 1 - (1 + 120 - 100) ** (-2/3).
  assert said.split()[0] == f"{1 - 21 ** (-2 / 3):.4f}"


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
