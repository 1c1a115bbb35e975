"""The stateful EMA: :func:`ema` (init/update) and :func:`track_ema` (optax).

Both keep an :class:`EmaState` ``(step, target, skipped)``. The step is the
number of updates seen so far (saturating at the int32 maximum) and the
momentum of an update is ``schedule(state.step)``, so the first update uses
``m(0)``. Because the momentum is a pure function of the stored step, a run
restored from a checkpoint continues bit-identically (unlike a Python
generator of momenta, as in the I-JEPA / V-JEPA reference code).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jepa_ema import schedules as _schedules
from jepa_ema import update as _update

__all__ = ["EmaState", "EmaTransformation", "ema", "track_ema", "get_target",
           "state_shardings"]

PyTree = Any
_INT32_MAX = np.iinfo(np.int32).max


class EmaState(NamedTuple):
  """State of :func:`ema` and :func:`track_ema`; a pytree that checkpoints.

  Attributes:
    step: int32 scalar, the number of updates so far (saturating). The next
      update uses momentum ``schedule(step)``.
    target: the EMA target pytree (the structure of the params; floating
      leaves in the ``dtype`` the transformation was built with).
    skipped: int32 scalar, how many updates were skipped because the params
      held NaN/Inf (only with ``skip_nonfinite=True``; otherwise stays 0).
  """

  step: jax.Array
  target: PyTree
  skipped: jax.Array


class EmaTransformation(NamedTuple):
  """The ``(init, update)`` pair returned by :func:`ema`.

  Attributes:
    init: ``init(params) -> EmaState``.
    update: ``update(params, state) -> EmaState``.
  """

  init: Callable[[PyTree], EmaState]
  update: Callable[[PyTree, EmaState], EmaState]

  def jit(self, *, donate: bool = True) -> Callable[[PyTree, EmaState],
                                                    EmaState]:
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


def _safe_increment(count: jax.Array) -> jax.Array:
  return jnp.where(count < _INT32_MAX, count + 1, _INT32_MAX).astype(jnp.int32)


def _check_dtype(dtype: Any) -> Any:
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"`dtype` must be a floating dtype such as jnp.float32, "
                    f"got {dtype!r}.") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
        f"`dtype` must be a floating dtype (the target's floating leaves are "
        f"stored in it), got {dt}.")
  return dt


def _copy_leaf(x: Any, dtype: Any) -> Any:
  if not _update._is_array_like(x):
    return x
  if dtype is not None and _update._is_float_leaf(x):
    return jnp.array(x, dtype=dtype, copy=True)
  return jnp.array(x, copy=True)


def _all_finite(tree: PyTree) -> jax.Array:
  # max(|x|) < inf is False for any NaN (NaN propagates through max) or Inf.
  # Unlike all(isfinite(x)), XLA fuses it into one reduction without a
  # bool temporary the size of the leaf.
  finite = [jnp.max(jnp.abs(jnp.asarray(x))) < jnp.inf
            for x in jax.tree.leaves(tree)
            if _update._is_float_leaf(x) and jnp.size(x) > 0]
  if not finite:
    return jnp.array(True)
  return jnp.stack(finite).all()


def ema(momentum: _schedules.MomentumLike, *, dtype: Any = None,
        skip_nonfinite: bool = False) -> EmaTransformation:
  """A stateful EMA of parameters: ``init(params)``, ``update(params, state)``.

  ``init`` copies the params (an EMA of weights starts at the weights, never
  at zeros, so no debiasing is needed); ``update`` performs one
  :func:`~jepa_ema.ema_update` with ``m = schedule(state.step)`` and then
  increments the step. Both are pure and jit-able. Put ``update`` in your
  jitted train step and donate the train state
  (``jax.jit(train_step, donate_argnums=0)``) so the target is updated in
  place.

  Args:
    momentum: a schedule (any callable ``step -> momentum``, optax schedules
      included) or a number in ``[0, 1]``.
    dtype: if given, the floating leaves of the target are stored in this
      floating dtype, e.g. ``jnp.float32`` for bfloat16 params: bfloat16 has
      8 mantissa bits, so with ``m = 0.999`` an increment ``(1 - m)(o - t)``
      is usually below half an ulp of ``t`` and a bfloat16 target stagnates.
    skip_nonfinite: if True, a step whose params hold a NaN or Inf in any
      floating leaf leaves the target unchanged (bitwise) and increments
      ``state.skipped``. The step counter still advances, so the schedule
      stays aligned with the training step. The check is one extra read of
      the params (a reduction that must finish before the update).

  Returns:
    An :class:`EmaTransformation` ``(init, update)``.

  Raises:
    ValueError: if a number ``momentum`` is outside ``[0, 1]`` or ``dtype`` is
      not floating. ``update`` raises ``ValueError`` if the params do not have
      the structure and shapes of the target.
    TypeError: for a ``momentum`` that is neither callable nor a number.

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
  """
  schedule = _schedules.as_schedule(momentum)
  dtype = _check_dtype(dtype)
  if not isinstance(skip_nonfinite, bool):
    raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}.")

  def init_fn(params: PyTree) -> EmaState:
    return EmaState(
        step=jnp.zeros([], jnp.int32),
        target=jax.tree.map(lambda x: _copy_leaf(x, dtype), params),
        skipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(params: PyTree, state: EmaState) -> EmaState:
    if not isinstance(state, EmaState):
      raise TypeError(
          f"`state` must be the EmaState returned by init, got "
          f"{type(state).__name__}; the call is update(params, state).")
    m = _update._resolve_momentum(schedule, state.step)
    skipped = state.skipped
    if skip_nonfinite:
      finite = _all_finite(params)
      m = jnp.where(finite, m, jnp.float32(1.0))
      skipped = jnp.where(finite, skipped, _safe_increment(skipped))
    target = _update.ema_update(state.target, params, state.step, m)
    return EmaState(step=_safe_increment(state.step), target=target,
                    skipped=skipped.astype(jnp.int32))

  return EmaTransformation(init_fn, update_fn)


def track_ema(momentum: _schedules.MomentumLike, *, dtype: Any = None,
              skip_nonfinite: bool = False) -> optax.GradientTransformation:
  """An optax transformation that keeps an EMA of the updated params.

  Put it **last** in ``optax.chain(...)``. Its ``update(updates, state,
  params)`` returns ``updates`` unchanged and advances the EMA of the
  post-step parameters ``optax.apply_updates(params, updates)``, which are
  exactly the params your train step is about to hold. Its state is an
  :class:`EmaState`; read the target with :func:`get_target`.

  Under ``optax.MultiSteps`` (gradient accumulation) put it inside the
  wrapped chain: MultiSteps keeps the inner state of non-final mini-steps
  unchanged, so the EMA advances only on real optimizer steps. (Outside the
  MultiSteps wrapper it would advance on every mini-step.)

  Args:
    momentum: a schedule or a number in ``[0, 1]`` (see :func:`ema`).
    dtype: optional floating dtype for the target's floating leaves.
    skip_nonfinite: skip EMA steps whose new params hold NaN/Inf.

  Returns:
    An ``optax.GradientTransformation``.

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
  inner = ema(momentum, dtype=dtype, skip_nonfinite=skip_nonfinite)

  def init_fn(params: optax.Params) -> EmaState:
    return inner.init(params)

  def update_fn(updates: optax.Updates, state: EmaState,
                params: optax.Params | None = None
                ) -> tuple[optax.Updates, EmaState]:
    if params is None:
      raise ValueError(
          "track_ema needs the current params: call "
          "`tx.update(grads, opt_state, params)` (it keeps an EMA of "
          "`params + updates`).")
    new_params = optax.apply_updates(params, updates)
    return updates, inner.update(new_params, state)

  return optax.GradientTransformation(init_fn, update_fn)


def _find_states(tree: Any) -> list[tuple[str, EmaState]]:
  is_state = lambda x: isinstance(x, EmaState)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state)
  return [(jax.tree_util.keystr(p) or "<root>", x) for p, x in leaves
          if is_state(x)]


def get_target(opt_state: Any) -> PyTree:
  """Returns the EMA target held anywhere inside a (nested) optax state.

  Works on the state of ``optax.chain``, ``optax.MultiSteps``,
  ``optax.inject_hyperparams``, ``optax.multi_transform`` ... and on an
  :class:`EmaState` itself.

  Args:
    opt_state: an optimizer state containing exactly one :class:`EmaState`.

  Returns:
    The target pytree.

  Raises:
    ValueError: if there is no :class:`EmaState` in ``opt_state``, or more
      than one (the message lists their paths; index into the state then).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jepa_ema
    >>> tx = optax.chain(optax.adam(1e-3), jepa_ema.track_ema(0.99))
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(jepa_ema.get_target(state)["w"])
    [1. 1.]
  """
  found = _find_states(opt_state)
  if not found:
    raise ValueError(
        f"No EmaState found in the given optimizer state (of type "
        f"{type(opt_state).__name__}). Add `jepa_ema.track_ema(...)` as the "
        "last element of your `optax.chain(...)`.")
  if len(found) > 1:
    paths = ", ".join(p for p, _ in found)
    raise ValueError(
        f"Found {len(found)} EmaStates in the optimizer state, at {paths}; "
        "get_target needs exactly one. Index into the state and pass the one "
        "you want.")
  return found[0][1].target


def _sharding_of(x: Any) -> Any:
  if isinstance(x, jax.sharding.Sharding):
    return x
  return getattr(x, "sharding", None)


def state_shardings(params: PyTree) -> EmaState:
  """The shardings of the :class:`EmaState` of ``params``.

  The target inherits each parameter's sharding (the update is elementwise,
  so it then needs no communication); ``step`` and ``skipped`` are replicated
  scalars on the same mesh. Use it as ``out_shardings`` of a jitted ``init``,
  or to build the abstract state for a sharded checkpoint restore::

      shardings = jepa_ema.state_shardings(params)
      state = jax.jit(ema.init, out_shardings=shardings)(params)

  Args:
    params: a pytree of arrays, ``jax.ShapeDtypeStruct`` s with shardings, or
      ``jax.sharding.Sharding`` s (e.g. the ``out_shardings`` of your params).
      Leaves without a sharding map to ``None`` (unspecified).

  Returns:
    An :class:`EmaState` whose leaves are shardings.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jepa_ema
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    >>> params = {"w": jax.device_put(jnp.zeros(4), sh)}
    >>> shardings = jepa_ema.state_shardings(params)
    >>> shardings.target["w"] == sh, shardings.step.spec
    (True, P())
  """
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  target = jax.tree.map(_sharding_of, params, is_leaf=is_sharding)
  found = [s for s in jax.tree.leaves(target, is_leaf=is_sharding)
           if is_sharding(s)]
  if not found:
    raise ValueError(
        "state_shardings: `params` has no leaf with a sharding (got leaves "
        f"of types {sorted({type(x).__name__ for x in jax.tree.leaves(params)})}"
        "); pass arrays, ShapeDtypeStructs with shardings, or shardings.")
  first = found[0]
  if isinstance(first, jax.sharding.NamedSharding):
    scalar = jax.sharding.NamedSharding(first.mesh,
                                        jax.sharding.PartitionSpec())
  else:
    devices = sorted(first.device_set, key=lambda d: d.id)
    scalar = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), ("_replica",)),
        jax.sharding.PartitionSpec())
  return EmaState(step=scalar, target=target, skipped=scalar)
