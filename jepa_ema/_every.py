"""The ``every=k`` option: update on every k-th step with the window's momentum (internal).

The target moves on steps ``k-1, 2k-1, ...`` (:func:`is_update_step`; the
gate around the update is :func:`gated`) with the product of the schedule's
momenta over the window (:func:`window_momentum`), so the horizon in steps
stays that of the per-step EMA; :func:`applied_momentum` is the momentum a
step applies (1 between updates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import _kernel
from jepa_ema import schedules as _schedules

__all__ = [
  "WindowSchedule",
  "window_schedule",
  "is_update_step",
  "gated",
  "applied_momentum",
  "window_momentum",
  "exact_product",
]

T = TypeVar("T")


def is_update_step(step: Any, every: int) -> Any:
  """Whether the target moves on ``step`` (counted from 0): steps ``k-1,
  2k-1, ...``; a Python bool for a concrete step, a traced one otherwise."""
  return step % every == every - 1


def gated(
  step: Any,
  every: int,
  update: Callable[[T], T],
  idle: Callable[[T], T],
  operand: T,
) -> T:
  """``update(operand)`` on the update steps of ``every=k``, else ``operand``.

  Every step for ``every=1``; eagerly a Python branch (``operand`` as it is
  on the other steps); under ``jit`` a ``lax.cond`` on the stored step (no
  recompilation), whose other branch is ``idle`` (it must return the type
  ``update`` returns).
  """
  if every == 1:
    return update(operand)
  if not isinstance(step, jax.core.Tracer):  # eager: a Python branch
    return update(operand) if is_update_step(int(step), every) else operand
  return jax.lax.cond(is_update_step(step, every), update, idle, operand)


def applied_momentum(
  schedule: _schedules.Schedule, step: Any, every: int
) -> jax.Array:
  """The momentum update ``step`` applies: ``schedule(step)``; with
  ``every=k`` the window's product on update steps and 1 in between (the
  target does not move), traced steps included."""
  if every > 1:
    update_step = is_update_step(step, every)
    if not isinstance(step, jax.core.Tracer) and not bool(update_step):
      return jnp.float32(1.0)
  m, _ = window_momentum(schedule, jnp.asarray(step), every)
  if every > 1:
    m = jnp.where(update_step, m, jnp.float32(1.0))
  return m


def window_momentum(
  schedule: _schedules.Schedule, step: jax.Array, every: int
) -> tuple[jax.Array, jax.Array]:
  """``prod(schedule(s))`` over the ``every`` steps that end at ``step``.

  The product is accumulated in double-float32 arithmetic
  (:func:`exact_product`: error below ``every * 2**-44`` relative) and rounded
  to float32 once, so the effective momentum is the exact product of the
  float32 momenta to one float32 rounding (half an ulp, and the rest).
  Traced momenta get their defined values first
  (:func:`jepa_ema._kernel.sanitize_momentum`: a non-finite one counts as 1,
  exactly what the per-step EMA would do on that step). Returns the product
  and whether every momentum of the window was finite.
  """
  if every == 1:
    return _kernel.resolve_momentum(schedule, step)
  steps = step - (every - 1) + jnp.arange(every, dtype=jnp.int32)
  ms = jnp.asarray(jax.vmap(schedule)(steps))
  if ms.shape != (every,):
    raise ValueError(
      f"the schedule {schedule!r} must return a scalar per "
      f"step, got shape {ms.shape[1:]}."
    )
  ms = ms.astype(jnp.float32)
  if not isinstance(ms, jax.core.Tracer):
    bad = np.asarray(ms)
    if not np.all((bad >= 0) & (bad <= 1)):
      raise ValueError(
        f"the schedule {schedule!r} returned momenta {bad} for "
        f"steps {np.asarray(steps)}; a momentum must lie in "
        "[0, 1]."
      )
    finite = jnp.array(True)
  else:
    ms, finites = _kernel.sanitize_momentum(ms, step)
    finite = jnp.all(finites)
  return exact_product(ms), finite


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a = hi + lo`` with 12-bit ``hi`` and ``lo`` (Veltkamp; ``|a| <= 1``)."""
  c = jnp.float32(4097.0) * a  # 2**12 + 1
  hi = c - (c - a)
  return hi, a - hi


def _two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a * b = p + e`` exactly in float32 (Dekker's product, no FMA needed)."""
  p = a * b
  ah, al = _split(a)
  bh, bl = _split(b)
  e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
  return p, e


def exact_product(ms: jax.Array) -> jax.Array:
  """``prod(ms)`` of float32 values in ``[0, 1]``, rounded to float32 once.

  The running product is kept as an unevaluated sum ``hi + lo`` of two
  float32 numbers (double-float32, about 46 significant bits): each factor
  multiplies it with Dekker's error-free product, and the pair is
  renormalised. Each step adds a relative error below ``2**-44``, so the
  result is the exact product rounded to nearest, up to ``len(ms) * 2**-44``
  relative (an exact tie can round either way). Products in the subnormal
  range lose this precision (XLA:CPU flushes them); a plain float32 product
  (or ``exp(sum(log(m)))``) is off by up to ``len(ms)`` roundings instead.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> ms = jnp.full(8, 0.9999, jnp.float32)
    >>> exact = np.prod(np.full(8, np.float32(0.9999), np.float64))
    >>> bool(exact_product(ms) == np.float32(exact))
    True
  """
  ms = jnp.asarray(ms, jnp.float32)

  def mul(
    i: jax.Array, acc: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    hi, lo = acc
    p, e = _two_product(hi, ms[i])
    e = e + lo * ms[i]
    s = p + e  # fast two-sum: |p| >= |e|
    return s, e - (s - p)

  one, zero = jnp.float32(1.0), jnp.float32(0.0)
  hi, lo = jax.lax.fori_loop(0, ms.shape[0], mul, (one, zero))
  return (hi + lo).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class WindowSchedule:
  """The momentum one ``every=k`` update applies, by the window's first
  step: ``t -> prod(schedule(s) for s in t .. t + k - 1)`` (what
  :func:`window_momentum` gives at the window's last step)."""

  schedule: _schedules.Schedule
  every: int

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    last = jnp.asarray(step) + self.every - 1
    m, _ = window_momentum(self.schedule, last, self.every)
    return m


def window_schedule(
  schedule: _schedules.Schedule, every: int
) -> _schedules.Schedule:
  """``schedule`` itself for ``every == 1``, else its :class:`WindowSchedule`
  (what the stagnation check judges: the momentum each update applies)."""
  return schedule if every == 1 else WindowSchedule(schedule, every)
