"""The stateful EMA: :func:`ema` (init/update) and :func:`track_ema` (optax).

Both keep an :class:`EmaState` ``(step, target, skipped)``. The step is the
number of updates seen so far (saturating at the int32 maximum) and the
momentum of an update is ``schedule(state.step)``, so the first update uses
``m(0)``. Because the momentum is a pure function of the stored step, a run
restored from a checkpoint continues bit-identically (unlike a Python
generator of momenta, as in the I-JEPA / V-JEPA reference code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jepa_ema import _drift, _every, _kernel, _rounding
from jepa_ema import placement as _placement
from jepa_ema import policy as _policy
from jepa_ema import schedules as _schedules
from jepa_ema._rounding import PrecisionWarning

__all__ = [
  "PrecisionWarning",
  "EmaState",
  "EmaTransformation",
  "TrackEmaTransformation",
  "ema",
  "track_ema",
  "get_target",
  "state_shardings",
]

PyTree = _kernel.PyTree
_INT32_MAX = np.iinfo(np.int32).max


class EmaState(NamedTuple):
  """State of :func:`ema` and :func:`track_ema`; a pytree that checkpoints.

  Attributes:
    step: int32 scalar, the number of updates so far (saturating). The next
      update uses momentum ``schedule(step)``.
    target: the EMA target pytree (the structure of the params; floating
      leaves in the ``dtype`` the transformation was built with).
    skipped: int32 scalar, how many updates (``every=k``: windows) dropped
      something: a non-finite momentum from the schedule under ``jit``
      (counted as 1, always), or params holding NaN/Inf (the whole update,
      only with ``skip_nonfinite=True``). 0 in a healthy run.
    drift: with ``drift=True`` (or ``drift=N``), ``{"global": x,
      "per_module": {name: x}}``: float32 scalars ``||target - params|| /
      ||params||`` after the last update that computed them (every update,
      or every N-th), over all floating leaves and per top-level entry of the
      params tree. ``None`` otherwise.
    key: with ``rounding="stochastic"``, the uint32 PRNG key data the
      rounding noise is derived from (with the step). ``None`` otherwise.
  """

  step: jax.Array
  target: PyTree
  skipped: jax.Array
  drift: Any = None
  key: Any = None


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
    placement = getattr(self.update, "placement", None)
    if placement is None:
      raise TypeError(
        "state_shardings() needs an EmaTransformation built by "
        "jepa_ema.ema(...)."
      )
    target_sharding, kinds = placement
    return state_shardings(
      params,
      jax.eval_shape(self.init, params),
      target_sharding=target_sharding,
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
    return _momentum_of(
      getattr(self.update, "momentum_at", None), state_or_step, "ema"
    )


class TrackEmaTransformation(optax.GradientTransformation):
  """What :func:`track_ema` returns: an ``optax.GradientTransformation``.

  Exactly optax's ``(init, update)`` pair (it chains, wraps and compares as
  one), with :meth:`momentum` to read the momentum back.
  """

  # No __slots__: each instance keeps its momentum reader in its __dict__,
  # not in a field, so the tuple stays optax's (init, update).

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
      self.__dict__.get("momentum_at"), opt_state_or_step, "track_ema"
    )


def _momentum_of(momentum_at: Any, state_or_step: Any, built_by: str) -> Any:
  """``momentum()`` of :class:`EmaTransformation` and
  :class:`TrackEmaTransformation`: the last update's momentum of the
  EmaState(s) found in ``state_or_step``, or the momentum of update
  ``state_or_step``."""
  if momentum_at is None:
    kind = "an EmaTransformation" if built_by == "ema" else "a transformation"
    raise TypeError(
      f"momentum() needs {kind} built by jepa_ema.{built_by}(...)."
    )
  found = _find_states(state_or_step)
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
    return momentum_at(steps[0] - 1)
  step = state_or_step
  if isinstance(step, (int, np.integer)) and step < 0:
    raise ValueError(f"`step` must be >= 0, got {step}.")
  return momentum_at(step)


def _safe_increment(count: jax.Array) -> jax.Array:
  return jnp.where(count < _INT32_MAX, count + 1, _INT32_MAX).astype(jnp.int32)


def _check_dtype(dtype: Any) -> Any:
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(
      f"`dtype` must be a floating dtype such as jnp.float32, got {dtype!r}."
    ) from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
      f"`dtype` must be a floating dtype (the target's floating leaves are "
      f"stored in it), got {dt}."
    )
  return dt


def _copy_leaf(x: Any, dtype: Any) -> Any:
  """A leaf of a new target: a copy, real floating leaves cast to ``dtype``
  (complex leaves keep theirs: a real ``dtype`` would drop a part)."""
  if not _kernel.is_array_like(x):
    return x
  if dtype is not None and _kernel.is_real_float_leaf(x):
    return jnp.array(x, dtype=dtype, copy=True)
  return jnp.array(x, copy=True)


def _finite(x: Any) -> jax.Array:
  """Whether every element of the floating leaf ``x`` is finite (a bool).

  ``x - x`` is 0 where ``x`` is finite and NaN where it is NaN or +-Inf (XLA
  folds it to 0 for floats only under fast math), and the sum of those is 0
  or NaN: additions propagate NaN, also when XLA adds the partial sums of a
  sharded leaf across devices. A maximum is not safe there (XLA:CPU's max
  all-reduce drops a NaN), nor is a comparison with Inf (float8_e4m3fn has
  none). XLA fuses the difference into the reduction: no temporary the size
  of the leaf, as ``all(isfinite(x))`` makes (and ``x * 0`` on CPU, whose
  zeros it materialises).
  """
  return jnp.sum(x - x) == 0


def _local_all_finite(leaves: Sequence[Any]) -> jax.Array:
  return jnp.stack([_finite(x) for x in leaves]).all()


def _explicit_mesh(leaves: Sequence[Any]) -> Any:
  """The mesh all ``leaves`` are laid out on, if its axes are all Explicit.

  None otherwise: leaves on no mesh, on several, on auto or manual axes (the
  layout is then unknown at trace time), or with unreduced / reduced axes.
  """
  meshes = set()
  for x in leaves:
    found = _kernel.mesh_and_spec(x)
    if found is None:
      return None
    mesh, spec = found
    if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
      return None
    meshes.add(mesh)
  if len(meshes) != 1:
    return None
  (mesh,) = meshes
  explicit = jax.sharding.AxisType.Explicit
  return mesh if all(t == explicit for t in mesh.axis_types) else None


def _all_finite(tree: PyTree) -> jax.Array:
  """Whether every floating leaf of ``tree`` is finite (a scalar bool).

  On explicit mesh axes it costs one scalar all-reduce, however many leaves:
  each device checks its own shards of every leaf (a ``shard_map``: no data
  moves) and one ``pmin`` of the combined flag crosses devices. Otherwise
  (auto axes: the layouts are chosen after tracing) XLA partitions each
  leaf's reduction by itself: one scalar all-reduce per sharded dimension of
  the leaf, merged across leaves where the device groups and their order
  allow (3 for the five leaves of tests/scripts/sharded_ema.py on a 4 x 2
  mesh).
  """
  leaves = [
    x
    for x in jax.tree.leaves(tree)
    if _kernel.is_float_leaf(x) and jnp.size(x) > 0
  ]
  if not leaves:
    return jnp.array(True)
  mesh = _explicit_mesh(leaves)
  if mesh is None:
    return _local_all_finite(leaves)

  def check(*shards: jax.Array) -> jax.Array:
    local = _local_all_finite(shards).astype(jnp.int32)
    return jax.lax.pmin(local, mesh.axis_names) > 0

  return jax.shard_map(
    check,
    mesh=mesh,
    in_specs=tuple(jax.typeof(x).sharding.spec for x in leaves),
    out_specs=jax.sharding.PartitionSpec(),
  )(*leaves)


def ema(
  momentum: _schedules.MomentumLike | Sequence[_schedules.MomentumLike],
  *,
  dtype: Any = None,
  skip_nonfinite: bool = False,
  every: int = 1,
  drift: bool | int = False,
  rounding: str = "nearest",
  key: Any = 0,
  policy: _policy.Policy = None,
  target_sharding: _placement.TargetSharding = None,
  memory_kind: _placement.MemoryKind = None,
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
  init_fn, update_lazy = _make_ema(
    momentum,
    dtype,
    skip_nonfinite,
    every,
    drift,
    rounding,
    key,
    policy,
    target_sharding,
    memory_kind,
  )

  def update_fn(
    params: PyTree, state: EmaState | tuple[EmaState, ...]
  ) -> EmaState | tuple[EmaState, ...]:
    return update_lazy(lambda: params, state)

  update_fn.momentum_at = update_lazy.momentum_at  # type: ignore[attr-defined]
  update_fn.placement = update_lazy.placement  # type: ignore[attr-defined]
  return EmaTransformation(init_fn, update_fn)


class _Options(NamedTuple):
  """The validated options of one :func:`ema` / :func:`track_ema`."""

  schedules: tuple[_schedules.Schedule, ...]
  several: bool  # a tuple of momenta: a tuple of EmaStates
  dtype: Any
  skip_nonfinite: bool
  every: int
  drift: int  # 0: off; N: on every N-th update
  stochastic: bool
  key_data: jax.Array | None
  key_impl: Any
  policy: Any  # jepa_ema.policy.Policy, resolved against the params
  target_sharding: Any = None  # jepa_ema.placement.TargetSharding
  memory_kinds: tuple = ()  # one per target: None (device) or an offload kind


def _parse_options(
  momentum: Any,
  dtype: Any,
  skip_nonfinite: Any,
  every: Any,
  drift: Any,
  rounding: Any,
  key: Any,
  policy: Any = None,
  target_sharding: Any = None,
  memory_kind: Any = None,
) -> _Options:
  """Validates every argument of :func:`ema` / :func:`track_ema` once."""
  several = isinstance(momentum, (tuple, list))
  if several:
    if not momentum:
      raise ValueError(
        "`momentum` is an empty sequence; give at least one "
        "momentum or schedule."
      )
    schedules = tuple(_schedules.as_schedule(m) for m in momentum)
  else:
    schedules = (_schedules.as_schedule(momentum),)
  dtype = _check_dtype(dtype)
  if not isinstance(skip_nonfinite, bool):
    raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}.")
  drift = _drift.check_drift(drift)
  every = _every.check_every(every)
  stochastic = _rounding.check_rounding(rounding, dtype) == "stochastic"
  key_data, key_impl = _rounding.check_key(key) if stochastic else (None, None)
  if isinstance(policy, str):
    _policy.resolve(policy, ())  # validates the action now
  _placement.check_target_sharding(target_sharding)
  memory_kinds = _placement.check_memory_kinds(
    memory_kind, len(schedules), several
  )
  return _Options(
    schedules,
    several,
    dtype,
    skip_nonfinite,
    every,
    drift,
    stochastic,
    key_data,
    key_impl,
    policy,
    target_sharding,
    memory_kinds,
  )


def _init_states(
  opts: _Options, params: PyTree
) -> EmaState | tuple[EmaState, ...]:
  """``init``: one EmaState per momentum, its target a copy of ``params``."""
  states = []
  actions = _policy.resolve(opts.policy, params)
  # Checked against the params before any state exists.
  shardings = _placement.stored(
    _placement.resolve(opts.target_sharding, params), actions
  )
  leaves, treedef = jax.tree.flatten(params)
  acts = actions if actions is not None else ("average",) * len(leaves)
  for i in range(len(opts.schedules)):
    # dtype= applies to averaged leaves; copied and kept ones keep theirs.
    stored = [
      None
      if a == "exclude"
      else _copy_leaf(x, opts.dtype if a == "average" else None)
      for x, a in zip(leaves, acts)
    ]
    target = jax.tree.unflatten(treedef, stored)
    averaged = jax.tree.unflatten(
      treedef, [t if a == "average" else None for t, a in zip(stored, acts)]
    )
    if shardings is not None or opts.memory_kinds[i] is not None:
      target = _placement.place(target, shardings, opts.memory_kinds[i])
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
      assert opts.key_data is not None  # checked by _parse_options
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
          _drift.zero_drift(_policy.only(params, actions, ("average",)))
          if opts.drift
          else None
        ),
        key=None if k is None else jnp.array(k, copy=True),
      )
    )
  return tuple(states) if opts.several else states[0]


def _advance(
  opts: _Options, get_params: Callable[[], PyTree], states: tuple[EmaState, ...]
) -> tuple[EmaState, ...]:
  """One real update of every target (params built lazily, in-branch)."""
  params = get_params()
  step = states[0].step
  actions = _policy.resolve(opts.policy, params)
  kept = _policy.kept(actions)
  read = _policy.only(params, actions, ("average", "copy"))  # enters the target
  shardings = None
  if opts.target_sharding is not None:
    shardings = _placement.stored(
      _placement.resolve(opts.target_sharding, params), actions
    )
  params = _policy.stored(params, actions)
  finite = _all_finite(read) if opts.skip_nonfinite else None
  # The online values in the target's layout: the blend is then elementwise.
  params = _placement.reshard(params, shardings)
  out = []
  for i, (schedule, state) in enumerate(zip(opts.schedules, states)):
    m, m_finite = _every.window_momentum(schedule, step, opts.every)
    lost = jnp.logical_not(m_finite)
    if finite is not None:
      m = jnp.where(finite, m, jnp.float32(1.0))
      lost = lost | jnp.logical_not(finite)
    skipped = jnp.where(lost, _safe_increment(state.skipped), state.skipped)
    kind = opts.memory_kinds[i] if opts.memory_kinds else None
    old = state.target if kind is None else _placement.to_device(state.target)
    _policy.check_stored(old, params, actions)
    _kernel.check_shardings(old, params)
    rounders = None
    if opts.stochastic:
      rounders = _rounding.rounders(
        state.key, opts.key_impl, step, len(jax.tree.leaves(old))
      )
    target = _kernel.blend_tree(old, params, m, rounders, kept)
    # A skip leaves the whole target: copied and integer leaves too. (With
    # every=k a non-finite momentum counts as 1 for its own step only: the
    # window still updates, as the per-step EMA would.)
    held: jax.Array | bool = lost
    if opts.every > 1:
      held = False if finite is None else jnp.logical_not(finite)
    if isinstance(held, jax.core.Tracer) or bool(held):
      target = _kernel.hold_unblended(target, old, held, kept)
    if shardings is not None:
      target = _placement.reshard(target, shardings)  # auto axes: pinned
    if any(k is not None for k in opts.memory_kinds):
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
            _policy.only(target, kept, ("average",)),
            _policy.only(params, kept, ("average",)),
            step,
            opts.every,
            opts.drift,
          ),
        ),
      )
    )
  return tuple(out)


def _update_states(
  opts: _Options,
  get_params: Callable[[], PyTree],
  state: EmaState | tuple[EmaState, ...],
) -> EmaState | tuple[EmaState, ...]:
  """``update``: advance on update steps (every one, or every ``every``-th
  under a ``lax.cond``), then count the step."""
  states = _as_states(state, len(opts.schedules), opts.several)
  step = states[0].step
  every = opts.every
  offloaded = any(k is not None for k in opts.memory_kinds)
  if every == 1:
    states = _advance(opts, get_params, states)
  elif not isinstance(step, jax.core.Tracer):  # eager: a Python branch
    if int(step) % every == every - 1:
      states = _advance(opts, get_params, states)
  else:
    # Offloaded targets: the transfers are inside the update branch (none on
    # the other steps); the idle branch names the same memory (a no-op for
    # targets already there), so both branches have one type.
    idle = (lambda s: _in_memory(opts, s)) if offloaded else (lambda s: s)
    states = jax.lax.cond(
      step % every == every - 1,
      lambda s: _advance(opts, get_params, s),
      idle,
      states,
    )
  if offloaded:
    # Each state counts its own step: an unused donated step would let
    # jax.jit pair buffers of other memories by shape and dtype alone.
    states = tuple(s._replace(step=_safe_increment(s.step)) for s in states)
  else:
    states = tuple(s._replace(step=_safe_increment(step)) for s in states)
  return states if opts.several else states[0]


def _in_memory(
  opts: _Options, states: tuple[EmaState, ...]
) -> tuple[EmaState, ...]:
  return tuple(
    s._replace(target=_placement.to_memory(s.target, k))
    for s, k in zip(states, opts.memory_kinds)
  )


def _momentum_at(opts: _Options, step: Any) -> Any:
  """The momentum update ``step`` applies (see EmaTransformation.momentum)."""
  every = opts.every
  update_step = None
  if every > 1:
    update_step = step % every == every - 1
    if not isinstance(step, jax.core.Tracer) and not bool(update_step):
      ones = tuple(jnp.float32(1.0) for _ in opts.schedules)
      return ones if opts.several else ones[0]
  out = []
  for schedule in opts.schedules:
    m, _ = _every.window_momentum(schedule, jnp.asarray(step), every)
    if update_step is not None:
      m = jnp.where(update_step, m, jnp.float32(1.0))
    out.append(m)
  return tuple(out) if opts.several else out[0]


def _make_ema(
  momentum: Any,
  dtype: Any,
  skip_nonfinite: Any,
  every: Any,
  drift: Any,
  rounding: Any,
  key: Any,
  policy: Any = None,
  target_sharding: Any = None,
  memory_kind: Any = None,
) -> tuple[Callable[[PyTree], Any], Callable[[Callable[[], PyTree], Any], Any]]:
  """Validates the options; returns ``init`` and ``update_lazy``, the update
  taking a params thunk (so that track_ema builds ``params + updates`` only
  inside the every=k branch)."""
  opts = _parse_options(
    momentum,
    dtype,
    skip_nonfinite,
    every,
    drift,
    rounding,
    key,
    policy,
    target_sharding,
    memory_kind,
  )
  update_lazy: Any = functools.partial(_update_states, opts)
  update_lazy.momentum_at = functools.partial(_momentum_at, opts)
  update_lazy.placement = (opts.target_sharding, opts.memory_kinds)
  return functools.partial(_init_states, opts), update_lazy


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
  policy: _policy.Policy = None,
  target_sharding: _placement.TargetSharding = None,
  memory_kind: _placement.MemoryKind = None,
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
  init_fn, update_lazy = _make_ema(
    momentum,
    dtype,
    skip_nonfinite,
    every,
    drift,
    rounding,
    key,
    policy,
    target_sharding,
    memory_kind,
  )
  wb_every, wb_momentum = _check_write_back(
    write_back_every, write_back_momentum
  )

  def update_fn(
    updates: optax.Updates,
    state: EmaState | tuple[EmaState, ...],
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, EmaState | tuple[EmaState, ...]]:
    if params is None:
      raise ValueError(
        "track_ema needs the current params: call "
        "`tx.update(grads, opt_state, params)` (it keeps an EMA of "
        "`params + updates`)."
      )
    new_state = update_lazy(lambda: optax.apply_updates(params, updates), state)
    if wb_every is None:
      return updates, new_state
    first = state if isinstance(state, EmaState) else state[0]
    # Counted in target updates, as drift=N is: never on an idle call of
    # every=k (the target would be stale).
    k = _every.check_every(every)
    new_first = new_state if isinstance(new_state, EmaState) else new_state[0]
    due = (
      (first.step % k == k - 1)
      & ((first.step // k) % wb_every == wb_every - 1)
      # Not on an update counted in `skipped`: the params were refused.
      & (new_first.skipped == first.skipped)
    )

    def write_back() -> optax.Updates:
      post = optax.apply_updates(params, updates)
      target = (
        new_state if isinstance(new_state, EmaState) else new_state[0]
      ).target
      return _write_back_updates(
        params, post, target, updates, wb_momentum, policy
      )

    if not isinstance(due, jax.core.Tracer):  # eager: a Python branch
      return (write_back() if bool(due) else updates), new_state
    return jax.lax.cond(due, write_back, lambda: updates), new_state

  tx = TrackEmaTransformation(init_fn, update_fn)
  tx.__dict__["momentum_at"] = update_lazy.momentum_at  # type: ignore[attr-defined]
  return tx


def _check_write_back(every: Any, momentum: Any) -> tuple[int | None, float]:
  if every is not None and (
    isinstance(every, bool) or not isinstance(every, (int, np.integer))
  ):
    raise TypeError(
      f"`write_back_every` must be None or a positive int, got {every!r}."
    )
  if every is not None and every < 1:
    raise ValueError(f"`write_back_every` must be >= 1, got {every}.")
  w = _schedules.as_schedule(momentum, "write_back_momentum")
  if not isinstance(w, _schedules.ConstantMomentum):
    raise TypeError(
      f"`write_back_momentum` must be a number in [0, 1], got {momentum!r}."
    )
  return (None if every is None else int(every)), w.momentum


def _write_back_updates(
  params: PyTree,
  post: PyTree,
  target: PyTree,
  updates: PyTree,
  w: float,
  policy: Any,
) -> PyTree:
  """Updates that move ``params`` to ``w * post + (1 - w) * target`` on the
  averaged floating leaves (the others keep ``updates``)."""
  actions = _policy.resolve(policy, post)
  p_leaves, treedef = jax.tree.flatten(post)
  acts = actions if actions is not None else ("average",) * len(p_leaves)
  t_iter = iter(jax.tree.leaves(target))
  new = []
  for p, a in zip(p_leaves, acts):
    t = next(t_iter) if a != "exclude" else None
    if a == "average" and _kernel.is_float_leaf(p):
      new.append(_kernel.blend_leaf(p, t, jnp.float32(w)))
    else:
      new.append(None)  # not written back: the step's own update
  new_tree = jax.tree.unflatten(treedef, new)
  return jax.tree.map(
    lambda n, p, u: u if n is None else (n - p).astype(jnp.asarray(u).dtype),
    new_tree,
    params,
    updates,
    is_leaf=lambda x: x is None,
  )


def _find_states(tree: Any) -> list[tuple[str, EmaState]]:
  is_state = lambda x: isinstance(x, EmaState)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state)
  return [
    (jax.tree_util.keystr(p) or "<root>", x) for p, x in leaves if is_state(x)
  ]


def get_target(
  opt_state: Any, index: int | None = None, *, online: PyTree = None
) -> PyTree:
  """Returns the EMA target held anywhere inside a (nested) optax state.

  Works on the state of ``optax.chain``, ``optax.MultiSteps``,
  ``optax.inject_hyperparams``, ``optax.multi_transform`` ... and on an
  :class:`EmaState` itself. An EMA with several momenta
  (``ema((m1, m2))``) holds a tuple of EmaStates: ``index`` picks one.

  Args:
    opt_state: an optimizer state containing :class:`EmaState` s.
    index: which EmaState, counted in the order ``jax.tree`` flattens
      ``opt_state`` (for a several-momenta EMA: the position of the momentum).
      Required when there is more than one; negative values count from the
      end.
    online: optional; the online params. The result is then the teacher's
      weights, laid out and placed like ``online``: the leaves a ``policy``
      excluded (``None`` in the target) are taken from it, and the leaves
      stored in their own layout (``target_sharding=``) or memory
      (``memory_kind=``) are brought to the online leaf's sharding and
      memory kind, each keeping its dtype. That costs an all-gather per
      leaf sharded finer than its param (ZeRO-style) and a host-to-device
      copy per offloaded leaf, on every call (the stored state is not
      changed); leaves already laid out like their param cost nothing.
      Eagerly (``jax.device_put``) and inside ``jit``: there, on Explicit
      mesh axes, ``jax.sharding.reshard`` to the online leaf's layout (so a
      data-parallel forward pass of the teacher type-checks); on Auto axes
      XLA chooses the layout and inserts the all-gather where it is needed.

  Returns:
    The target pytree (with ``online``: a complete tree like ``online``).

  Raises:
    ValueError: if there is no :class:`EmaState` in ``opt_state``, or more
      than one and no ``index`` (the message lists their paths), or ``index``
      is out of range.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jepa_ema
    >>> tx = optax.chain(optax.adam(1e-3), jepa_ema.track_ema(0.99))
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(jepa_ema.get_target(state)["w"])
    [1. 1.]
    >>> states = jepa_ema.ema((0.99, 0.999)).init({"w": jnp.ones(2)})
    >>> print(jepa_ema.get_target(states, 1)["w"])
    [1. 1.]
  """
  found = _find_states(opt_state)
  if not found:
    raise ValueError(
      f"No EmaState found in the given optimizer state (of type "
      f"{type(opt_state).__name__}). Add `jepa_ema.track_ema(...)` as the "
      "last element of your `optax.chain(...)`."
    )
  if index is None:
    if len(found) > 1:
      paths = ", ".join(p for p, _ in found)
      raise ValueError(
        f"Found {len(found)} EmaStates in the optimizer state, at {paths}; "
        "pass `index` (get_target(state, i)) to pick one."
      )
    return _filled(found[0][1].target, online)
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
    raise TypeError(f"`index` must be an int, got {index!r}.")
  if not -len(found) <= index < len(found):
    raise ValueError(
      f"`index` {index} is out of range: the state holds {len(found)} "
      f"EmaState(s), at {', '.join(p for p, _ in found)}."
    )
  return _filled(found[index][1].target, online)


def _filled(target: PyTree, online: PyTree) -> PyTree:
  """The teacher's weights: excluded leaves from ``online``, the stored ones
  laid out and placed like their ``online`` leaf."""
  if online is None:
    return target
  return _placement.like(_policy.fill(target, online), online)


def _is_concrete(x: Any) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _carried(leaf: Any, computed: Any, meshes: set) -> Any:
  """The layout an abstract target leaf carries (``jax.eval_shape`` keeps it
  on Explicit mesh axes) on its concrete mesh, else ``computed``.

  The memory kind is ``computed``'s unless the leaf carries one other than
  the device's: an abstract state does not always say.
  """
  own = getattr(leaf, "sharding", None)
  if _is_concrete(leaf):
    return own
  if not isinstance(own, jax.sharding.NamedSharding):
    return computed
  mesh = own.mesh
  if not isinstance(mesh, jax.sharding.Mesh):
    matches = [m for m in meshes if m.abstract_mesh == mesh]
    if len(matches) != 1:
      return computed
    (mesh,) = matches
  kind = own.memory_kind
  if kind in (None, "device") and computed is not None:
    kind = computed.memory_kind
  carried = jax.sharding.NamedSharding(mesh, own.spec, memory_kind=kind)
  if (
    computed is not None
    and computed.memory_kind == carried.memory_kind
    and computed.is_equivalent_to(carried, len(leaf.shape))
  ):
    return computed  # the same layout, as the params spell it
  return carried


def _sharding_of(x: Any) -> Any:
  if isinstance(x, jax.sharding.Sharding):
    return x
  return getattr(x, "sharding", None)


def state_shardings(
  params: PyTree,
  state: Any = None,
  *,
  target_sharding: _placement.TargetSharding = None,
  memory_kind: _placement.MemoryKind = None,
) -> Any:
  """The shardings of the :class:`EmaState` of ``params``.

  By default the target inherits each parameter's sharding (the update is
  elementwise, so it then needs no communication); ``step``, ``skipped`` and
  the small ``drift`` / ``key`` fields are replicated on the same mesh. Use
  it as ``out_shardings`` of a jitted ``init``, or to build the abstract
  state for a sharded checkpoint restore::

      shardings = jepa_ema.state_shardings(params)
      state = jax.jit(ema.init, out_shardings=shardings)(params)

  For an EMA built with options (``drift``, ``rounding="stochastic"``,
  several momenta, ``policy``), pass the state's structure too, e.g.
  ``state_shardings(params, jax.eval_shape(ema.init, params))``.

  It never reports a layout other than the state's, where the state says:

  * a ``state`` of concrete arrays is read as it is: every leaf's own
    sharding, memory kind included;
  * an abstract state whose target leaves carry shardings (what
    ``jax.eval_shape`` gives on **Explicit** mesh axes) gives those
    layouts, on the params' concrete mesh;
  * where the state carries no layout (``jax.eval_shape`` on **Auto** mesh
    axes drops shardings, and memory kinds on either kind of axes), it
    cannot know: the target then gets the params' shardings, changed by the
    ``target_sharding`` and ``memory_kind`` you pass, which must be those
    the EMA was built with. :meth:`EmaTransformation.state_shardings`
    (``ema(...).state_shardings(params)``) knows them: prefer it for a
    state built by :func:`ema`; pass the keywords for :func:`track_ema`'s
    state inside an optax state.

  Args:
    params: a pytree of arrays, ``jax.ShapeDtypeStruct`` s with shardings, or
      ``jax.sharding.Sharding`` s (e.g. the ``out_shardings`` of your params).
      Leaves without a sharding map to ``None`` (unspecified).
    state: optional; an EmaState, a tuple of them, or any pytree holding
      them (arrays or ``ShapeDtypeStruct`` s), whose structure is returned.
    target_sharding: the ``target_sharding=`` the EMA was built with.
    memory_kind: the ``memory_kind=`` the EMA was built with (a tuple: one
      per EmaState of ``state``, in its order).

  Returns:
    An :class:`EmaState` (or ``state``'s structure) whose leaves are
    shardings.

  Raises:
    ValueError: if ``params`` holds no sharding, ``state`` no EmaState, or
      ``target_sharding`` / ``memory_kind`` do not fit (as for :func:`ema`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jepa_ema
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    >>> params = {"w": jax.device_put(jnp.zeros(4), sh)}
    >>> shardings = jepa_ema.state_shardings(params)
    >>> shardings.target["w"] == sh, shardings.step.spec
    (True, P())
    >>> host = jepa_ema.state_shardings(params, memory_kind="pinned_host")
    >>> host.target["w"].memory_kind
    'pinned_host'
  """
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  target = jax.tree.map(_sharding_of, params, is_leaf=is_sharding)
  found = [
    s for s in jax.tree.leaves(target, is_leaf=is_sharding) if is_sharding(s)
  ]
  if not found:
    raise ValueError(
      "state_shardings: `params` has no leaf with a sharding (got leaves "
      f"of types {sorted({type(x).__name__ for x in jax.tree.leaves(params)})}"
      "); pass arrays, ShapeDtypeStructs with shardings, or shardings."
    )
  first = found[0]
  if isinstance(first, jax.sharding.NamedSharding):
    scalar: Any = jax.sharding.NamedSharding(
      first.mesh, jax.sharding.PartitionSpec()
    )
  else:
    devices = sorted(first.device_set, key=lambda d: d.id)
    scalar = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), ("_replica",)),
      jax.sharding.PartitionSpec(),
    )
  if target_sharding is not None:
    _placement.check_target_sharding(target_sharding)
    own = _placement.resolve(target_sharding, params)
    assert own is not None
    treedef: Any = jax.tree.structure(params, is_leaf=is_sharding)
    leaves = treedef.flatten_up_to(target)
    target = jax.tree.unflatten(
      treedef, [p if t is None else t for p, t in zip(leaves, own)]
    )
  n = 1 if state is None else max(len(_find_states(state)), 1)
  kinds = _placement.check_memory_kinds(memory_kind, n, True)

  def in_memory(tree: Any, kind: str | None) -> Any:
    if kind is None:
      return tree
    return jax.tree.map(lambda s: s.with_memory_kind(kind), tree)

  if state is None:
    return EmaState(
      step=scalar, target=in_memory(target, kinds[0]), skipped=scalar
    )
  if not _find_states(state):
    raise ValueError(
      f"state_shardings: `state` holds no EmaState (got "
      f"{type(state).__name__})."
    )
  is_state = lambda x: isinstance(x, EmaState)
  counter = iter(kinds)

  meshes = {
    s.mesh
    for s in found
    if isinstance(s, jax.sharding.NamedSharding)
    and isinstance(s.mesh, jax.sharding.Mesh)
  }

  def one(x: Any) -> Any:
    if not is_state(x):
      return x.sharding if _is_concrete(x) else scalar
    kind = next(counter)
    if all(_is_concrete(v) for v in jax.tree.leaves(x)):
      return jax.tree.map(lambda v: v.sharding, x)  # the state as it is
    # None where a policy excluded a leaf, as in the state's target.
    stored = jax.tree.map(
      lambda t, sh: None if t is None else sh,
      x.target,
      target,
      is_leaf=lambda v: v is None or is_sharding(v),
    )
    stored = jax.tree.map(
      lambda t, sh: _carried(t, sh, meshes),
      x.target,
      in_memory(stored, kind),
    )
    return EmaState(
      step=scalar,
      target=stored,
      skipped=scalar,
      drift=jax.tree.map(lambda _: scalar, x.drift),
      key=None if x.key is None else scalar,
    )

  return jax.tree.map(one, state, is_leaf=is_state)
