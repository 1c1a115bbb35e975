"""The stateful EMA: :func:`ema` (init/update) and :func:`track_ema` (optax).

Both keep an :class:`EmaState` ``(step, target, skipped)``. The step is the
number of updates seen so far (saturating at the int32 maximum) and the
momentum of an update is ``schedule(state.step)``, so the first update uses
``m(0)``. Because the momentum is a pure function of the stored step, a run
restored from a checkpoint continues bit-identically (unlike a Python
generator of momenta, as in the I-JEPA / V-JEPA reference code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jepa_ema import (
  _drift,
  _every,
  _kernel,
  _options,
  _plan,
  _rounding,
  _skip,
  _write_back,
)
from jepa_ema import placement as _placement
from jepa_ema import schedules as _schedules
from jepa_ema._rounding import PrecisionWarning
from jepa_ema.placement import MemoryKind, TargetSharding
from jepa_ema.policy import Policy
from jepa_ema.state import EmaState, find_states, get_target, state_shardings

__all__ = [
  "EmaTransformation",
  "TrackEmaTransformation",
  "ema",
  "track_ema",
  # Re-exported (they live in jepa_ema.state and jepa_ema._rounding).
  "PrecisionWarning",
  "EmaState",
  "get_target",
  "state_shardings",
]

PyTree = _kernel.PyTree
_INT32_MAX = np.iinfo(np.int32).max


class EmaTransformation(NamedTuple):
  """The ``(init, update)`` pair returned by :func:`ema`.

  Attributes:
    init: ``init(params) -> EmaState`` (a tuple of EmaStates for several
      momenta).
    update: ``update(params, state) -> EmaState`` (or the tuple).
  """

  init: Callable[[PyTree], Any]  # EmaState, or a tuple of them
  update: Callable[[PyTree, Any], Any]

  def jit(
    self, *, donate: bool = True
  ) -> Callable[[PyTree, EmaState], EmaState]:
    """``update`` compiled with ``jax.jit``, the state donated (in place).

    The fast path for a standalone EMA step (outside your own jitted train
    step): the new target is written into the old target's buffers, so no
    second copy is allocated. **The old state must not be used after the
    call**; rebind it: ``state = update(params, state)``. Build it once and
    reuse it (each call of ``jit()`` makes a new compilation cache).

    Args:
      donate: donate the state's buffers (default True).

    Returns:
      ``update(params, state) -> state``, jit-compiled.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jepa_ema
      >>> ema = jepa_ema.ema(0.5)
      >>> update = ema.jit()
      >>> state = ema.init({"w": jnp.zeros(2)})
      >>> state = update({"w": jnp.ones(2)}, state)
      >>> print(state.target["w"])
      [0.5 0.5]
    """
    return jax.jit(self.update, donate_argnums=(1,) if donate else ())

  def state_shardings(self, params: PyTree) -> Any:
    """The shardings of ``init(params)``, memory kinds included.

    :func:`~jepa_ema.state_shardings` of the state's structure with this
    EMA's ``target_sharding`` and ``memory_kind``: the ``out_shardings`` of
    a jitted ``init``, or the layout of a sharded checkpoint restore.

    Args:
      params: the params (arrays or ``ShapeDtypeStruct`` s with shardings).

    Returns:
      An :class:`EmaState` (a tuple of them for several momenta) whose
      leaves are shardings.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jepa_ema
      >>> ema = jepa_ema.ema((0.99, 0.9999), memory_kind=(None, "pinned_host"))
      >>> params = {"w": jnp.zeros(4)}
      >>> shardings = ema.state_shardings(params)
      >>> [s.target["w"].memory_kind for s in shardings]
      ['device', 'pinned_host']
      >>> states = jax.jit(ema.init, out_shardings=shardings)(params)
      >>> states[1].target["w"].sharding.memory_kind
      'pinned_host'
    """
    opts = _options_of(self.update)
    if opts is None:
      raise TypeError(
        "state_shardings() needs an EmaTransformation built by "
        "jepa_ema.ema(...)."
      )
    kinds = opts.memory_kinds
    return state_shardings(
      params,
      jax.eval_shape(self.init, params),
      target_sharding=opts.target_sharding,
      memory_kind=kinds if len(kinds) > 1 else kinds[0],
    )

  def momentum(self, state_or_step: Any) -> Any:
    """The momentum an update applies, for logging.

    Given the state (an :class:`EmaState`, or the tuple of them), the
    momentum of its **last** update: update ``state.step - 1``. Given a step
    ``t``, the momentum update ``t`` (counted from 0) applies. That is
    ``schedule(t)``, with ``every=k`` the window's product on update steps
    and 1 on the steps in between (the target does not move). A traced
    momentum gets its defined value (NaN counts as 1); an update dropped by
    ``skip_nonfinite`` is not seen here, but counted in ``state.skipped``.
    It reads only the step, so it also reads a :func:`track_ema` state built
    with the same momentum and options.

    Args:
      state_or_step: the state after some updates (``state.step >= 1``), or
        an integer step ``>= 0``; may be traced.

    Returns:
      A float32 scalar; a tuple of them for several momenta.

    Raises:
      ValueError: for a concrete state that has seen no update, or a negative
        step.
      TypeError: for an EmaTransformation not built by :func:`ema`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jepa_ema
      >>> ema = jepa_ema.ema(jepa_ema.linear_momentum(0.5, 1.0, total_steps=4))
      >>> state = ema.init({"w": jnp.zeros(2)})
      >>> for _ in range(3):
      ...   state = ema.update({"w": jnp.ones(2)}, state)
      >>> print(ema.momentum(state), ema.momentum(4))  # updates 2 and 4
      0.75 1.0
    """
    return _momentum_of(_options_of(self.update), state_or_step, "ema")


class TrackEmaTransformation(optax.GradientTransformation):
  """What :func:`track_ema` returns: an ``optax.GradientTransformation``.

  Exactly optax's ``(init, update)`` pair (it chains, wraps and compares as
  one), with :meth:`momentum` to read the momentum back.
  """

  # The options live in the object whose methods init and update are
  # (_options_of), not in a field: the tuple stays optax's (init, update).

  def momentum(self, opt_state_or_step: Any) -> Any:
    """The momentum an update applies, for logging (as :meth:`EmaTransformation.momentum`).

    Given an optimizer state, the momentum of the **last** update of the
    :class:`EmaState` found anywhere inside it (``optax.chain``,
    ``optax.MultiSteps``, ``optax.masked``, ...): update ``state.step - 1``.
    Under ``MultiSteps`` that is the last real optimizer step's. Given a step
    ``t``, the momentum update ``t`` (counted from 0) applies. With
    ``every=k`` the window's product on update steps and 1 in between.

    Args:
      opt_state_or_step: an optimizer state holding this transformation's
        state (``step >= 1``), or an integer step ``>= 0``; may be traced.

    Returns:
      A float32 scalar; a tuple of them for several momenta.

    Raises:
      ValueError: for a state that has seen no update, EmaStates at
        different steps, or a negative step.
      TypeError: for a transformation not built by :func:`track_ema`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import jepa_ema
      >>> tx = jepa_ema.track_ema(jepa_ema.linear_momentum(0.5, 1.0, total_steps=4))
      >>> opt = optax.MultiSteps(optax.chain(optax.sgd(0.1), tx), every_k_schedule=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> for _ in range(6):  # three real optimizer steps
      ...   _, state = opt.update({"w": jnp.ones(2)}, state, params)
      >>> print(tx.momentum(state), tx.momentum(4))  # updates 2 and 4
      0.75 1.0
    """
    return _momentum_of(
      _options_of(self.update), opt_state_or_step, "track_ema"
    )


def _momentum_of(
  opts: _options.Options | None, state_or_step: Any, built_by: str
) -> Any:
  """``momentum()`` of :class:`EmaTransformation` and
  :class:`TrackEmaTransformation`: the last update's momentum of the
  EmaState(s) found in ``state_or_step``, or the momentum of update
  ``state_or_step``."""
  if opts is None:
    kind = "an EmaTransformation" if built_by == "ema" else "a transformation"
    raise TypeError(
      f"momentum() needs {kind} built by jepa_ema.{built_by}(...)."
    )
  found = find_states(state_or_step)
  if found:
    steps = [s.step for _, s in found]
    if not any(isinstance(t, jax.core.Tracer) for t in steps):
      if len({int(t) for t in steps}) > 1:
        raise ValueError(
          "the state holds EmaStates at different steps, at "
          f"{', '.join(p for p, _ in found)}; pass this EMA's own state."
        )
      if int(steps[0]) < 1:
        raise ValueError(
          "the state has seen no update yet (state.step == 0): there is no "
          "last momentum; pass a step for the momentum update `step` applies."
        )
    return _momentum_at(opts, steps[0] - 1)
  step = state_or_step
  if isinstance(step, (int, np.integer)) and step < 0:
    raise ValueError(f"`step` must be >= 0, got {step}.")
  return _momentum_at(opts, step)


def _options_of(update: Any) -> _options.Options | None:
  """The options of the EMA whose ``update`` this is (None: not built by
  :func:`ema` or :func:`track_ema`)."""
  core = getattr(update, "__self__", None)
  return core.options if isinstance(core, (_Ema, _TrackEma)) else None


def _momentum_at(opts: _options.Options, step: Any) -> Any:
  """The momentum update ``step`` applies (see EmaTransformation.momentum)."""
  out = tuple(
    _every.applied_momentum(schedule, step, opts.every)
    for schedule in opts.schedules
  )
  return out if opts.several else out[0]


def _safe_increment(count: jax.Array) -> jax.Array:
  return jnp.where(count < _INT32_MAX, count + 1, _INT32_MAX).astype(jnp.int32)


def ema(
  momentum: _schedules.MomentumLike | Sequence[_schedules.MomentumLike],
  *,
  dtype: Any = None,
  skip_nonfinite: bool = False,
  every: int = 1,
  drift: bool | int = False,
  rounding: str = "nearest",
  key: Any = 0,
  policy: Policy = None,
  target_sharding: TargetSharding = None,
  memory_kind: MemoryKind = None,
) -> EmaTransformation:
  """A stateful EMA of parameters: ``init(params)``, ``update(params, state)``.

  ``init`` copies the params (an EMA of weights starts at the weights, never
  at zeros, so no debiasing is needed); ``update`` performs one
  :func:`~jepa_ema.ema_update` with ``m = schedule(state.step)`` and then
  increments the step. Both are pure and jit-able. Put ``update`` in your
  jitted train step and donate the train state
  (``jax.jit(train_step, donate_argnums=0)``) so the target is updated in
  place.

  The options ``every``, several momenta, ``drift`` and ``rounding`` are off
  by default and combine freely; each is exact about what it computes:

  * ``every=k`` updates the target only on every k-th step (steps k-1,
    2k-1, ... counted from 0), with the **product** of the schedule's momenta
    over the k steps of the window, ``m_eff = m(s-k+1) * ... * m(s)``, so the
    averaging horizon is that of the per-step EMA (skipping steps with the
    per-step momentum, as ema-pytorch's ``update_every`` does, stretches it
    k-fold in steps: the target lags k times further behind). The
    approximation: the params of the k-1 steps in between are
    not seen (the result is exact when they do not change). Under ``jit`` the
    choice is a ``lax.cond`` on the stored step: no recompilation, and the
    other steps only increment the step.
  * ``momentum=(m1, m2, ...)`` keeps one target per momentum (schedule),
    all updated in one computation that reads the params once where the
    compiler fuses sibling loops (XLA on GPU/TPU; on CPU only with
    ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=true``).
    The state is then a tuple of :class:`EmaState`, one per momentum; pick
    one with ``get_target(state, i)``.
  * ``drift=True`` stores ``||target - params|| / ||params||`` (after the
    update; global and per top-level entry of the params) in
    ``state.drift``, computed in the same jitted computation as the update.
    Small: the target follows closely; near 1 or growing: it lags or the
    online encoder is moving fast. On non-update steps of ``every=k`` it
    keeps the last value. ``drift=N`` (an int) computes it on every N-th
    update only (updates N-1, 2N-1, ... counted from 0; a ``lax.cond`` on the
    stored step, no recompilation) and keeps the last value in between: on
    compilers that do not fuse the norms into the update (XLA:CPU) they are a
    second read of both trees, and this makes their cost 1/N.
  * ``rounding="stochastic"`` (with a bfloat16 or float16 target:
    ``dtype=jnp.bfloat16`` / ``jnp.float16`` or half-precision params)
    blends in float32 and rounds each result up or down
    at random with the probability that makes it exact in expectation, so a
    momentum of 0.999 does not stagnate the way round-to-nearest does. The
    noise is a pure function of ``key`` (stored in the state), the step and
    the element position: runs are reproducible and independent of the
    sharding.

  Args:
    momentum: a schedule (any callable ``step -> momentum``, optax schedules
      included) or a number in ``[0, 1]``; or a tuple/list of them for
      several targets.
    dtype: if given, the real floating leaves of the target are stored in
      this floating dtype (complex leaves keep theirs), e.g. ``jnp.float32``
      for bfloat16 params: bfloat16 has 8 mantissa bits, so with
      ``m = 0.999`` an increment ``(1 - m)(o - t)`` is usually below half an
      ulp of ``t`` and a bfloat16 target stagnates (unless
      ``rounding="stochastic"``). ``init`` warns
      (:class:`~jepa_ema.PrecisionWarning`) when a low-precision target
      rounded to nearest would stall (see ``PrecisionWarning``).
    skip_nonfinite: if True, a step whose params hold a NaN or Inf in any
      floating leaf leaves the target unchanged (bitwise) and increments
      ``state.skipped``. The step counter still advances, so the schedule
      stays aligned with the training step. The check is one extra read of
      the params (a reduction that must finish before the update).
    every: update the target on every ``every``-th step only, with the
      product of the momenta of the skipped steps (default 1: every step).
    drift: keep ``||target - params|| / ||params||`` in ``state.drift``:
      ``True`` after every update, an int ``N >= 1`` after every N-th.
    rounding: ``"nearest"`` (default) or ``"stochastic"``: the target's
      bfloat16 and float16 leaves are rounded stochastically (other leaves
      as usual).
    key: the seed (int) or ``jax.random.key`` of the stochastic rounding.
    policy: what the target does per leaf (:mod:`jepa_ema.policy`): None
      (every floating leaf averaged, the rest copied), one of ``"average"``,
      ``"copy"``, ``"keep"``, ``"exclude"`` for every leaf, a pytree prefix
      of the params whose leaves are actions, or a callable ``params -> such
      a prefix`` (see :func:`~jepa_ema.policy_by_path`). Resolved against the
      params' structure at ``init`` and when ``update`` is traced (no cost per
      step under ``jit``). Excluded leaves are ``None`` in the target (no
      memory); ``dtype`` applies to averaged leaves only (copied and kept
      ones keep the params' dtype); ``skip_nonfinite`` checks the leaves that
      enter the target (averaged and copied); ``drift`` is measured over the
      averaged leaves; copied leaves are copied on every update step (with
      ``every=k``: on steps k-1, 2k-1, ...).
    target_sharding: where the target's leaves live across devices
      (:mod:`jepa_ema.placement`): None (default: each leaf like its param),
      a ``jax.sharding.Sharding``, a pytree prefix of the params whose
      leaves are shardings (``None``: that subtree like the params), or a
      callable ``params -> such a prefix``. ``init`` creates the target in
      that layout (eagerly and under ``jit``) and ``update`` keeps it: the
      online value is resharded into the target's layout before the
      elementwise blend (bitwise the values without the option). A target
      sharded over the data axis of replicated params (ZeRO-style) costs
      1/n of the memory per device and its update moves no data between
      devices; a target coarser than its params (replicated target, sharded
      params) costs an all-gather of each param per update. Checked against
      the params (fit, divisibility, devices) before any state exists.
    memory_kind: the memory the target's leaves live in, each keeping its
      sharding: None or ``"device"`` (default), or ``"pinned_host"`` (host
      memory: no device memory between updates). The blend runs on the
      device; the transfers (to the device before it, back after) are part
      of the compiled update, and with ``every=k`` they are inside the
      update branch (no transfer on the other steps). With several momenta,
      a tuple gives one per target (e.g. ``(None, "pinned_host")``: the
      training target on the device, an evaluation EMA on the host).
      ``state.step`` and the other small fields stay on the device.

  Returns:
    An :class:`EmaTransformation` ``(init, update)``.

  Raises:
    ValueError: if a number ``momentum`` is outside ``[0, 1]``, ``dtype`` is
      not floating, ``every < 1``, ``rounding`` is unknown or stochastic
      without a half-precision target, ``memory_kind`` is not a memory of
      the device (or a tuple of the wrong length); from ``init``, if
      ``target_sharding`` does not fit the params (naming the key path).
      ``update`` raises ``ValueError`` if the params do not have the
      structure and shapes of the target.
    TypeError: for a ``momentum`` that is neither callable nor a number, or
      a non-int ``every``; from ``update``, for params whose leaf dtypes the
      target cannot keep (see :func:`~jepa_ema.ema_update`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jepa_ema
    >>> ema = jepa_ema.ema(0.9)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = ema.init(params)
    >>> update = jax.jit(ema.update, donate_argnums=1)  # in place
    >>> for _ in range(3):
    ...   state = update({"w": jnp.ones(2)}, state)
    >>> print(int(state.step), state.target["w"].round(4))  # 1 - 0.9**3
    3 [0.271 0.271]

    Every 4th step with the momentum of 4 steps, two horizons, and drift:

    >>> ema = jepa_ema.ema((0.9, 0.99), every=4, drift=True)
    >>> states = ema.init(params)
    >>> for _ in range(8):
    ...   states = ema.update({"w": jnp.ones(2)}, states)
    >>> print(jepa_ema.get_target(states, 0)["w"].round(4))  # 1 - 0.9**8
    [0.5695 0.5695]
    >>> print(round(float(states[1].drift["global"]), 4))  # 0.99**8
    0.9227
  """
  return _Ema.build(
    _options.parse(
      momentum,
      dtype=dtype,
      skip_nonfinite=skip_nonfinite,
      every=every,
      drift=drift,
      rounding=rounding,
      key=key,
      policy=policy,
      target_sharding=target_sharding,
      memory_kind=memory_kind,
    )
  )


@dataclasses.dataclass(frozen=True, eq=False)
class _Ema:
  """One :func:`ema`: its options, and ``init`` / ``update`` as methods (the
  transformation reads the options through them)."""

  options: _options.Options

  @classmethod
  def build(cls, options: _options.Options) -> EmaTransformation:
    core = cls(options)
    return EmaTransformation(core.init, core.update)

  def init(self, params: PyTree) -> EmaState | tuple[EmaState, ...]:
    return _init_states(self.options, params)

  def update(
    self, params: PyTree, state: EmaState | tuple[EmaState, ...]
  ) -> EmaState | tuple[EmaState, ...]:
    return _update_states(self.options, lambda: params, state)


def _init_states(
  opts: _options.Options, params: PyTree
) -> EmaState | tuple[EmaState, ...]:
  """``init``: one EmaState per momentum, its target a copy of ``params``."""
  states = []
  # Checked against the params before any state exists.
  plan = _plan.make_plan(opts, params)
  shardings = plan.shardings()
  leaves = plan.treedef.flatten_up_to(params)
  for i in range(len(opts.schedules)):
    # New buffers in the planned dtypes (dtype= applies to averaged leaves).
    target = jax.tree.unflatten(
      plan.treedef,
      [
        _kernel.copy_leaf(x, lp.dtype, fresh=True) if lp.stored else None
        for x, lp in zip(leaves, plan.leaves)
      ],
    )
    averaged = plan.select(target, _plan.BLENDED)
    if shardings is not None or plan.memory_kinds[i] is not None:
      target = _placement.place(target, shardings, plan.memory_kinds[i])
    if i == 0 and opts.stochastic:
      if not any(
        _kernel.is_float_leaf(x)
        and _kernel.leaf_dtype(x) in _kernel.HALF_DTYPES
        for x in jax.tree.leaves(averaged)
      ):
        raise ValueError(
          "rounding='stochastic' needs half-precision target leaves (averaged ones), "
          "but the target has none; pass dtype=jnp.bfloat16 or jnp.float16 (or "
          "half-precision params)."
        )
    elif i == 0:
      # Judged on the momentum each update applies (an every=k window's).
      _rounding.check_stagnation(
        [_every.window_schedule(m, opts.every) for m in opts.schedules],
        averaged,
      )
    k = None
    if opts.stochastic:
      assert opts.key_data is not None  # checked by _options.parse
      k = (
        opts.key_data
        if not opts.several
        else jax.random.key_data(
          jax.random.fold_in(
            _rounding.wrap_key(opts.key_data, opts.key_impl), i
          )
        )
      )
    states.append(
      EmaState(
        step=jnp.zeros([], jnp.int32),
        target=target,
        skipped=jnp.zeros([], jnp.int32),
        drift=(
          _drift.zero_drift(plan.select(params, _plan.MEASURED))
          if opts.drift
          else None
        ),
        key=None if k is None else jnp.array(k, copy=True),
      )
    )
  return tuple(states) if opts.several else states[0]


def _advance(
  opts: _options.Options,
  get_params: Callable[[], PyTree],
  states: tuple[EmaState, ...],
) -> tuple[EmaState, ...]:
  """One real update of every target (params built lazily, in-branch)."""
  params = get_params()
  step = states[0].step
  # The plan of this state: checked against the params, traced once.
  plan = _plan.make_plan(opts, params, states[0].target)
  finite = None
  if opts.skip_nonfinite:  # the leaves that enter the target
    finite = _skip.all_finite(plan.select(params, _plan.CHECKED))
  shardings = plan.shardings()
  # The online values in the target's layout: the blend is then elementwise.
  params = _placement.reshard(plan.strip(params), shardings)
  measured = plan.select_stored(params, _plan.MEASURED)
  out = []
  for i, (schedule, state) in enumerate(zip(opts.schedules, states)):
    m, m_finite = _every.window_momentum(schedule, step, opts.every)
    lost = jnp.logical_not(m_finite)
    if finite is not None:
      m = jnp.where(finite, m, jnp.float32(1.0))
      lost = lost | jnp.logical_not(finite)
    skipped = jnp.where(lost, _safe_increment(state.skipped), state.skipped)
    kind = plan.memory_kinds[i]
    old = state.target if kind is None else _placement.to_device(state.target)
    plan.check(old, params)
    _kernel.check_shardings(old, params)
    rounders = None
    if opts.stochastic:
      rounders = _rounding.rounders(
        state.key, opts.key_impl, step, len(jax.tree.leaves(old))
      )
    target = _kernel.blend_tree(old, params, m, rounders, plan.actions)
    # A skip leaves the whole target: copied and integer leaves too. (With
    # every=k a non-finite momentum counts as 1 for its own step only: the
    # window still updates, as the per-step EMA would.)
    held: jax.Array | bool = lost
    if opts.every > 1:
      held = False if finite is None else jnp.logical_not(finite)
    if isinstance(held, jax.core.Tracer) or bool(held):
      target = _kernel.hold_unblended(
        target, old, held, plan.flags(_plan.COPIED)
      )
    if shardings is not None:
      target = _placement.reshard(target, shardings)  # auto axes: pinned
    if plan.offloaded:
      # Every target, also one on the device: jit pools donated inputs.
      target = _placement.tie(target, old)
    out.append(
      state._replace(
        target=_placement.to_memory(target, kind),
        skipped=skipped.astype(jnp.int32),
        drift=_drift.held(
          held,
          state.drift,
          _drift.next_drift(
            state.drift,
            plan.select_stored(target, _plan.MEASURED),
            measured,
            step,
            opts.every,
            opts.drift,
          ),
        ),
      )
    )
  return tuple(out)


def _update_states(
  opts: _options.Options,
  get_params: Callable[[], PyTree],
  state: EmaState | tuple[EmaState, ...],
) -> EmaState | tuple[EmaState, ...]:
  """``update``: advance on update steps (every one, or every ``every``-th:
  :func:`jepa_ema._every.gated`), then count the step."""
  states = _as_states(state, len(opts.schedules), opts.several)
  step = states[0].step
  # Offloaded targets: the transfers are inside the update branch (none on
  # the other steps); the idle branch names the same memory (a no-op for
  # targets already there), so both branches have one type.
  idle = (lambda s: _in_memory(opts, s)) if opts.offloaded else (lambda s: s)
  states = _every.gated(
    step, opts.every, lambda s: _advance(opts, get_params, s), idle, states
  )
  if opts.offloaded:
    # Each state counts its own step: an unused donated step would let
    # jax.jit pair buffers of other memories by shape and dtype alone.
    states = tuple(s._replace(step=_safe_increment(s.step)) for s in states)
  else:
    states = tuple(s._replace(step=_safe_increment(step)) for s in states)
  return states if opts.several else states[0]


def _in_memory(
  opts: _options.Options, states: tuple[EmaState, ...]
) -> tuple[EmaState, ...]:
  return tuple(
    s._replace(target=_placement.to_memory(s.target, k))
    for s, k in zip(states, opts.memory_kinds)
  )


def _as_states(state: Any, n: int, several: bool) -> tuple[EmaState, ...]:
  states = (
    tuple(state)
    if several
    and isinstance(state, (tuple, list))
    and not isinstance(state, EmaState)
    else (state,)
  )
  for s in states:
    if not isinstance(s, EmaState):
      raise TypeError(
        f"`state` must be the {'tuple of EmaStates' if several else 'EmaState'}"
        f" returned by init, got {type(state).__name__}; the call is "
        "update(params, state)."
      )
  if len(states) != n:
    raise ValueError(
      f"`state` holds {len(states)} EmaStates but this EMA has {n} momenta."
    )
  return states


def track_ema(
  momentum: _schedules.MomentumLike | Sequence[_schedules.MomentumLike],
  *,
  dtype: Any = None,
  skip_nonfinite: bool = False,
  every: int = 1,
  drift: bool | int = False,
  rounding: str = "nearest",
  key: Any = 0,
  policy: Policy = None,
  target_sharding: TargetSharding = None,
  memory_kind: MemoryKind = None,
  write_back_every: int | None = None,
  write_back_momentum: float = 0.0,
) -> optax.GradientTransformation:
  """An optax transformation that keeps an EMA of the updated params.

  Put it **last** in ``optax.chain(...)``. Its ``update(updates, state,
  params)`` returns ``updates`` unchanged and advances the EMA of the
  post-step parameters ``optax.apply_updates(params, updates)``, which are
  exactly the params your train step is about to hold. Its state is an
  :class:`EmaState` (a tuple of them for several momenta); read the target
  with :func:`get_target`.

  Under ``optax.MultiSteps`` (gradient accumulation) put it inside the
  wrapped chain: MultiSteps keeps the inner state of non-final mini-steps
  unchanged, so the EMA advances only on real optimizer steps. (Outside the
  MultiSteps wrapper it would advance on every mini-step.)

  Args:
    momentum: a schedule or a number in ``[0, 1]``, or a tuple of them (see
      :func:`ema`).
    dtype: optional floating dtype for the target's floating leaves.
    skip_nonfinite: skip EMA steps whose new params hold NaN/Inf.
    every: update every ``every``-th step with the product momentum; the
      post-step params are then only computed on those steps.
    drift: keep ``||target - params|| / ||params||`` in the state (``True``:
      every update; an int ``N``: every N-th update).
    rounding: ``"nearest"`` or ``"stochastic"`` (bfloat16 / float16
      targets).
    key: the seed or key of the stochastic rounding.
    policy: the per-leaf policy, as for :func:`ema`.
    target_sharding: the target's own layout, as for :func:`ema`.
    memory_kind: the target's memory (e.g. ``"pinned_host"``), as for
      :func:`ema`.
    write_back_every: ``N``: on the target's updates ``N-1, 2N-1, ...``
      (counted from 0, like ``drift=N``; with ``every=k`` only calls that
      update the target count) the returned updates also move the params to ``write_back_momentum *
      params + (1 - write_back_momentum) * target`` (the post-step params the
      EMA has just averaged in, and its just-updated target; with several
      momenta, the first), on the averaged floating leaves: ema-pytorch's
      ``update_model_with_ema_every``; ``write_back_momentum=0`` switches the
      model to its EMA (Switch EMA, arXiv:2402.09240). Not for a JEPA's
      training target: the online encoder would be pulled to the target it
      is trained against. None (default): never.
    write_back_momentum: the weight on the params in a write-back, in
      ``[0, 1]``.

  Returns:
    A :class:`TrackEmaTransformation`: an ``optax.GradientTransformation``
    with ``.momentum(opt_state_or_step)``, the momentum of the last update
    of its state found anywhere in the optimizer state.

  Raises:
    ValueError: from ``update`` when ``params`` is not given, and see
      :func:`ema`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jepa_ema
    >>> tx = optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.5))
    >>> params = {"w": jnp.ones(2)}
    >>> opt_state = tx.init(params)
    >>> grads = {"w": jnp.ones(2)}
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(params["w"], jepa_ema.get_target(opt_state)["w"].round(4))
    [0.9 0.9] [0.95 0.95]
  """
  return _TrackEma.build(
    _options.parse(
      momentum,
      dtype=dtype,
      skip_nonfinite=skip_nonfinite,
      every=every,
      drift=drift,
      rounding=rounding,
      key=key,
      policy=policy,
      target_sharding=target_sharding,
      memory_kind=memory_kind,
      write_back_every=write_back_every,
      write_back_momentum=write_back_momentum,
    )
  )


@dataclasses.dataclass(frozen=True, eq=False)
class _TrackEma:
  """One :func:`track_ema`: its options, and optax's ``init`` / ``update``
  as methods."""

  options: _options.Options

  @classmethod
  def build(cls, options: _options.Options) -> TrackEmaTransformation:
    core = cls(options)
    return TrackEmaTransformation(core.init, core.update)

  def init(self, params: optax.Params) -> EmaState | tuple[EmaState, ...]:
    return _init_states(self.options, params)

  def update(
    self,
    updates: optax.Updates,
    state: EmaState | tuple[EmaState, ...],
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, EmaState | tuple[EmaState, ...]]:
    opts = self.options
    if params is None:
      raise ValueError(
        "track_ema needs the current params: call "
        "`tx.update(grads, opt_state, params)` (it keeps an EMA of "
        "`params + updates`)."
      )
    new_state = _update_states(
      opts, lambda: optax.apply_updates(params, updates), state
    )
    if opts.write_back_every is None:
      return updates, new_state
    first = state if isinstance(state, EmaState) else state[0]
    new_first = new_state if isinstance(new_state, EmaState) else new_state[0]
    due = _write_back.due(first, new_first, opts.every, opts.write_back_every)

    def write_back() -> optax.Updates:
      post = optax.apply_updates(params, updates)
      return _write_back.write_back_updates(
        _plan.make_plan(opts, post),
        params,
        post,
        new_first.target,
        updates,
        opts.write_back_momentum,
      )

    if not isinstance(due, jax.core.Tracer):  # eager: a Python branch
      return (write_back() if bool(due) else updates), new_state
    return jax.lax.cond(due, write_back, lambda: updates), new_state
