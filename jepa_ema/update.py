"""The EMA update of a parameter pytree: ``target <- m * target + (1 - m) * online``.

The public update: it knows pytrees, dtypes and checks (the kernel and its
rules live in :mod:`jepa_ema._kernel`), and nothing of optax state.
:func:`ema_update` is a pure function that works eagerly and inside any
``jax.jit``; :func:`make_ema_update` binds a schedule once and
returns the jit-compiled, buffer-donating three-argument update a training
loop calls.

Numerics, for every floating-point leaf, real or complex (``a = 1 - m``)::

    m == 1    ->  target                      (bitwise: the old buffer values)
    m == 0    ->  online.astype(target.dtype)
    a <= 1/2  ->  (t + a * (o - t)).astype(target.dtype)
    a >  1/2  ->  (o + m * (t - o)).astype(target.dtype)

computed in float32, or in the target's dtype if that is wider (so a bfloat16
target is blended in float32 and rounded once). This two-sided lerp is exact where target and
online agree (a converged target does not drift by rounding) and, since the
rounded step of weight <= 1/2 cannot overshoot, every output lies between
target and online, which plain ``m * t + (1 - m) * o`` does not guarantee in
floating point. The selects on the scalar momentum are free: XLA fuses them
into the one memory-bound pass (12 bytes per float32 parameter), and the
result runs as fast as the plain formula (``benchmarks/ema_bench.py`` times
it beside a bare jitted ``tree_map``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jepa_ema import _kernel, _options, _plan, _rounding
from jepa_ema import schedules as _schedules
from jepa_ema._kernel import ShardingMismatchWarning
from jepa_ema.policy import Policy

__all__ = [
  "ema_update",
  "make_ema_update",
  "EmaUpdateFn",
  "ShardingMismatchWarning",
]


PyTree = _kernel.PyTree
EmaUpdateFn = Callable[[PyTree, PyTree, jax.typing.ArrayLike], PyTree]
"""``(target, online, step) -> new_target``, as returned by :func:`make_ema_update`."""


def ema_update(
  target: PyTree,
  online: PyTree,
  step: jax.typing.ArrayLike,
  momentum: _schedules.MomentumLike | jax.typing.ArrayLike,
  *,
  policy: Policy = None,
) -> PyTree:
  """One EMA step of a parameter pytree: ``m * target + (1 - m) * online``.

  **Argument order:** the target first. Swapped, the call moves the online
  params towards the target instead, and nothing can detect that (both are
  trees of the same structure).

  ``m = momentum(step)`` for a schedule, or ``momentum`` itself for a number
  (a traced scalar computed in the caller's ``jit`` is accepted too).
  Momentum is the weight on the old target: ``optax.incremental_update``'s
  ``step_size`` is ``1 - m``; ``flax.nnx.EMA``'s ``decay`` and BYOL's ``tau``
  are ``m``.

  * Floating leaves, real and complex, are blended in float32 (or the
    target's dtype if wider) and the result keeps the **target's** dtype (a
    float32 target of bfloat16 params stays float32). ``m == 1`` leaves the
    target bitwise unchanged and ``m == 0`` returns the online values cast to
    the target's dtype. Every output lies between the target and online
    values (also in floating point; complex: each part). The online leaf may
    be any real float or integer (for a complex target also complex); other
    online dtypes are a ``TypeError``.
  * Every other leaf (integer counters, bools, PRNG keys, non-array objects)
    is taken from ``online``, which must then have the target leaf's dtype
    (``TypeError`` naming the key path and both dtypes otherwise).
  * A concrete momentum outside ``[0, 1]`` raises. A traced one (under
    ``jit``) cannot, so it gets a defined value: finite values are clipped to
    ``[0, 1]``, NaN and +-Inf leave the whole target unchanged (its
    integer and copied leaves too). To have them
    reported, wrap the momentum in :func:`jepa_ema.checked_momentum` and run
    under ``jax.experimental.checkify.checkify`` (unchecked, the default, the
    program has no effect and ``jit`` keeps its fast dispatch path).
  * Leaves keep their sharding and the update is elementwise, so it needs no
    communication between devices. Changing ``step`` never recompiles.

  Args:
    target: the target (teacher / EMA) parameter pytree.
    online: the online (student / context encoder) pytree; same structure and
      leaf shapes as ``target``.
    step: the training step ``t`` the schedule is evaluated at; a real number
      (Python ints beyond int32 too) or a traced scalar.
    momentum: a schedule (any callable ``step -> momentum``, optax schedules
      included) or a number in ``[0, 1]``.
    policy: what the target does per leaf (:mod:`jepa_ema.policy`): None
      (every leaf averaged), one of ``"average"``, ``"copy"``, ``"keep"``,
      ``"exclude"``, a prefix tree of them, or a callable ``online -> such a
      tree``. It is resolved against ``online``; ``target`` then holds
      ``None`` where leaves are excluded, and so does the result.

  Returns:
    The new target, with the structure and leaf dtypes of ``target``.

  Raises:
    ValueError: if the tree structures or leaf shapes differ (the message names
      the first offending key path and both sides), or if a concrete momentum
      lies outside ``[0, 1]``.
    TypeError: if ``momentum`` is neither a schedule nor a real number, or a
      leaf's dtypes break the rule above.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> import jepa_ema
    >>> target = {"w": jnp.zeros(2), "count": jnp.array(3)}
    >>> online = {"w": jnp.ones(2), "count": jnp.array(4)}
    >>> new = jepa_ema.ema_update(target, online, step=0, momentum=0.9)
    >>> print(np.asarray(new["w"]).round(4), new["count"])
    [0.1 0.1] 4

    A schedule is evaluated at ``step``:

    >>> schedule = jepa_ema.linear_momentum(0.5, 1.0, total_steps=10)
    >>> print(np.asarray(jepa_ema.ema_update(target, online, 5, schedule)["w"]).round(4))
    [0.25 0.25]
  """
  m, finite = _kernel.resolve_momentum(momentum, step)
  # The plan of this target (checked against the online params).
  plan = _plan.make_plan(_plan.LeafOptions(policy=policy), online, target)
  online = plan.strip(online)
  _kernel.check_shardings(target, online)
  new = _kernel.blend_tree(target, online, m, None, plan.actions)
  if isinstance(finite, jax.core.Tracer):  # a NaN/Inf momentum: no change
    new = _kernel.hold_unblended(
      new, target, jax.numpy.logical_not(finite), plan.flags(_plan.COPIED)
    )
  return new


def make_ema_update(
  momentum: _schedules.MomentumLike,
  *,
  donate: bool = True,
  policy: Policy = None,
) -> EmaUpdateFn:
  """Binds a schedule once; returns the jitted ``(target, online, step)`` update.

  This is the function a hand-written training loop calls::

      ema_update_fn = jepa_ema.make_ema_update(jepa_ema.cosine_momentum(
          0.996, 1.0, total_steps=num_steps))
      target = ema_update_fn(target, online, step)

  With ``donate=True`` (the default) the old target's buffers are donated to
  the computation, so the new target is written in place and no second copy
  of the target is ever allocated. **The old target must not be used after
  the call** (its arrays are deleted); always rebind the result as above.
  Called inside the user's own ``jax.jit`` the function simply inlines (the
  outer jit decides donation). ``step`` is a traced argument: changing it
  never recompiles. On its first call, and on the call after any new
  compilation, it checks that target and online leaves share their shardings
  and emits a :class:`ShardingMismatchWarning` naming the first leaf
  otherwise (not on every call: the check costs about 1.5 us per leaf). On
  its first call and on each call that compiles, a low-precision target
  that, rounded to nearest, would stall gets a
  :class:`~jepa_ema.PrecisionWarning`, as ``ema().init`` does.
  A Python or NumPy integer ``step`` beyond the int32 range is passed as a
  float32 (one more compilation) instead of overflowing or wrapping around.
  As with :func:`ema_update`, the target comes first: swapped arguments
  cannot be detected.

  Args:
    momentum: a schedule or a number in ``[0, 1]``; validated now.
    donate: donate the target's buffers (update in place).
    policy: the per-leaf policy, as for :func:`ema_update` (a string action
      is validated now, a tree or callable when the function is traced).

  Returns:
    A jit-compiled ``ema_update_fn(target, online, step) -> new_target``.

  Raises:
    ValueError: if a number ``momentum`` is outside ``[0, 1]``.
    TypeError: if ``momentum`` is neither a schedule nor a number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jepa_ema
    >>> ema_update_fn = jepa_ema.make_ema_update(0.75)
    >>> target = {"w": jnp.zeros(3)}
    >>> for step in range(2):
    ...   target = ema_update_fn(target, {"w": jnp.ones(3)}, step)
    >>> print(target["w"].round(4))  # 1 - 0.75**2
    [0.4375 0.4375 0.4375]
  """
  schedule = _schedules.as_schedule(momentum)
  _options.check_policy(policy)
  jitted = jax.jit(
    functools.partial(_bound_update, schedule, policy),
    donate_argnums=(0,) if donate else (),
  )
  check_next, first = [True], [True]
  # jax.jit's compilation-cache size (private API; without it, only the first
  # call is checked).
  cache_size = getattr(jitted, "_cache_size", lambda: 0)

  @functools.wraps(jitted)
  def ema_update_fn(
    target: PyTree, online: PyTree, step: jax.typing.ArrayLike
  ) -> PyTree:
    # Layouts only change together with a compilation, so the (~1.5 us per
    # leaf) sharding check runs on the first call and on the call after each
    # new compilation, never per step.
    if check_next[0]:
      plan = _plan.make_plan(_plan.LeafOptions(policy=policy), online)
      _kernel.check_shardings(target, plan.strip(online))
    # Beyond int32, jit would raise OverflowError (int) or wrap (np.int64).
    step = _kernel.fit_step(step)
    before = cache_size()
    out = jitted(target, online, step)
    compiled = cache_size() != before
    if compiled or first[0]:  # dtypes only change with a compilation
      _rounding.check_stagnation((schedule,), out)
      first[0] = False
    check_next[0] = compiled
    return out

  fn: Any = ema_update_fn  # functools.wraps' type does not list attributes
  fn._cache_size = cache_size  # pylint: disable=protected-access
  fn.lower = jitted.lower
  return ema_update_fn


def _bound_update(
  schedule: _schedules.Schedule,
  policy: Policy,
  target: PyTree,
  online: PyTree,
  step: jax.typing.ArrayLike,
) -> PyTree:
  return ema_update(target, online, step, schedule, policy=policy)
