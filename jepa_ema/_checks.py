"""Argument checks shared by every entry point (internal).

One exception type and one message per mistake, whichever function receives
it: the schedules, :func:`jepa_ema.ema`, :func:`jepa_ema.track_ema`,
:func:`jepa_ema.make_ema_update` and :class:`jepa_ema.PostHocSnapshots` call
these. Nothing of the package is imported here.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["ACTIONS", "check_action", "check_int", "check_bool", "check_dtype"]

ACTIONS = ("average", "copy", "keep", "exclude")
"""The per-leaf actions of a policy, in the order the docs list them
(re-exported as :data:`jepa_ema.policy.ACTIONS`)."""


def check_action(action: Any, where: str) -> str:
  """``action`` if it is one of :data:`ACTIONS`, else a ValueError naming
  ``where`` (a phrase: "at ['bn']", "for the policy key ...")."""
  if not isinstance(action, str) or action not in ACTIONS:
    raise ValueError(
      f"unknown policy action {action!r} {where}; the actions are "
      f"{', '.join(repr(a) for a in ACTIONS)}."
    )
  return action


def check_int(
  name: str,
  value: Any,
  lo: int = 0,
  *,
  optional: bool = False,
  integral_floats: bool = False,
) -> Any:
  """``value`` as a Python int ``>= lo`` (None passes if ``optional``).

  Raises:
    TypeError: for anything but an integer (bools included); with
      ``integral_floats`` a float that holds an integer is taken as one.
    ValueError: for an integer below ``lo``.
  """
  if optional and value is None:
    return None
  if isinstance(value, bool) or not isinstance(
    value, (numbers.Integral, np.integer)
  ):
    if integral_floats and isinstance(value, float) and value.is_integer():
      value = int(value)
    else:
      what = {0: "a non-negative integer", 1: "a positive integer"}.get(
        lo, f"an integer >= {lo}"
      )
      raise TypeError(
        f"`{name}` must be {'None or ' if optional else ''}{what}, got "
        f"{value!r} (type {type(value).__name__})."
      )
  v = int(value)
  if v < lo:
    raise ValueError(f"`{name}` must be >= {lo}, got {v}.")
  return v


def check_bool(name: str, value: Any) -> bool:
  """``value`` as a Python bool (NumPy bools too); TypeError otherwise."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(
      f"`{name}` must be a bool, got {value!r} (type {type(value).__name__})."
    )
  return bool(value)


def check_dtype(dtype: Any, name: str = "dtype") -> Any:
  """A storage dtype: None, or a floating dtype (as ``np.dtype``).

  Raises:
    TypeError: for something that is not a dtype.
    ValueError: for a dtype that is not floating.
  """
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(
      f"`{name}` must be a floating dtype such as jnp.float32, got {dtype!r}."
    ) from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
      f"`{name}` must be a floating dtype (the target's floating leaves are "
      f"stored in it), got {dt}."
    )
  return dt
