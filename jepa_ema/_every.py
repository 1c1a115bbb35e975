"""The ``every=k`` option: update on every k-th step with the window's momentum (internal).

The target moves on steps ``k-1, 2k-1, ...`` with the product of the
schedule's momenta over the window (:func:`window_momentum`), so the horizon
in steps stays that of the per-step EMA.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import _kernel
from jepa_ema import schedules as _schedules

__all__ = ["check_every", "window_momentum"]


def check_every(every: Any) -> int:
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)):
    raise TypeError(f"`every` must be a positive int, got {every!r}.")
  if every < 1:
    raise ValueError(
      f"`every` must be >= 1 (update the target on every "
      f"`every`-th step), got {every}."
    )
  return int(every)


def window_momentum(
  schedule: _schedules.Schedule, step: jax.Array, every: int
) -> tuple[jax.Array, jax.Array]:
  """``prod(schedule(s))`` over the ``every`` steps that end at ``step``.

  Computed as ``exp(sum(log1p(-(1 - m_s))))``: ``1 - m_s`` is exact in float32
  for ``m_s >= 1/2`` and log1p keeps the small step sizes accurate, so the
  effective momentum is within one float32 rounding of the exact product.
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
  return jnp.exp(jnp.sum(jnp.log1p(-(1.0 - ms)))).astype(jnp.float32), finite
