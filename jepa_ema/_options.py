"""The validated options of :func:`jepa_ema.ema` and :func:`jepa_ema.track_ema` (internal).

:func:`parse` checks every argument once, in one place, into an
:class:`Options` record that the transformation holds and reads: the
momenta as schedules, ``dtype``, ``skip_nonfinite``, ``every``, ``drift``,
the rounding and its key, ``policy``, ``target_sharding``, one memory kind
per target, and ``track_ema``'s write-back. The checks shared with other
entry points (:func:`jepa_ema.make_ema_update`, the schedules,
:class:`jepa_ema.PostHocSnapshots`) are :mod:`jepa_ema._checks`'s, so a
mistake gets one exception type and one message wherever it is made.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jepa_ema import _checks, _rounding
from jepa_ema import placement as _placement
from jepa_ema import policy as _policy
from jepa_ema import schedules as _schedules

__all__ = ["Options", "parse", "check_drift", "check_policy"]


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
  """The validated options of one :func:`jepa_ema.ema` /
  :func:`jepa_ema.track_ema`."""

  schedules: tuple[_schedules.Schedule, ...]
  several: bool  # a tuple of momenta: a tuple of EmaStates
  dtype: Any  # None, or the floating dtype of the averaged leaves
  skip_nonfinite: bool
  every: int
  drift: int  # 0: off; N: on every N-th update
  stochastic: bool
  key_data: jax.Array | None
  key_impl: Any
  policy: _policy.Policy  # resolved against the params by the plan
  target_sharding: _placement.TargetSharding
  memory_kinds: tuple  # one per target: None (device) or an offload kind
  write_back_every: int | None = None  # track_ema only
  write_back_momentum: float = 0.0

  @property
  def offloaded(self) -> bool:
    """Some target lives outside device memory."""
    return any(k is not None for k in self.memory_kinds)


def check_drift(drift: Any) -> int:
  """``drift`` as the interval N of updates (0: off; True: 1)."""
  if isinstance(drift, (bool, np.bool_)):
    return int(drift)
  if not isinstance(drift, (int, np.integer)):
    raise TypeError(
      f"`drift` must be a bool or a positive int (compute it on "
      f"every N-th update), got {drift!r}."
    )
  if drift < 1:
    raise ValueError(
      f"`drift` must be True/False or an int >= 1 (compute it "
      f"on every N-th update), got {drift}."
    )
  return int(drift)


def check_policy(policy: Any) -> None:
  """What can be checked of ``policy=`` without the params: one action."""
  if isinstance(policy, str):
    _policy.resolve(policy, ())  # validates the action now


def _check_write_back(every: Any, momentum: Any) -> tuple[int | None, float]:
  every = _checks.check_int("write_back_every", every, 1, optional=True)
  w = _schedules.as_schedule(momentum, "write_back_momentum")
  if not isinstance(w, _schedules.ConstantMomentum):
    raise TypeError(
      f"`write_back_momentum` must be a number in [0, 1], got {momentum!r}."
    )
  return every, w.momentum


def parse(
  momentum: Any,
  *,
  dtype: Any = None,
  skip_nonfinite: Any = False,
  every: Any = 1,
  drift: Any = False,
  rounding: Any = "nearest",
  key: Any = 0,
  policy: Any = None,
  target_sharding: Any = None,
  memory_kind: Any = None,
  write_back_every: Any = None,
  write_back_momentum: Any = 0.0,
) -> Options:
  """Validates every argument of :func:`jepa_ema.ema` /
  :func:`jepa_ema.track_ema` once, in the order of their signatures."""
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
  dtype = _checks.check_dtype(dtype)
  skip_nonfinite = _checks.check_bool("skip_nonfinite", skip_nonfinite)
  drift = check_drift(drift)
  every = _checks.check_int("every", every, 1)
  stochastic = _rounding.check_rounding(rounding, dtype) == "stochastic"
  key_data, key_impl = _rounding.check_key(key) if stochastic else (None, None)
  check_policy(policy)
  _placement.check_target_sharding(target_sharding)
  memory_kinds = _placement.check_memory_kinds(
    memory_kind, len(schedules), several
  )
  wb_every, wb_momentum = _check_write_back(
    write_back_every, write_back_momentum
  )
  return Options(
    schedules=schedules,
    several=several,
    dtype=dtype,
    skip_nonfinite=skip_nonfinite,
    every=every,
    drift=drift,
    stochastic=stochastic,
    key_data=key_data,
    key_impl=key_impl,
    policy=policy,
    target_sharding=target_sharding,
    memory_kinds=memory_kinds,
    write_back_every=wb_every,
    write_back_momentum=wb_momentum,
  )
