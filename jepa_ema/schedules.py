"""Momentum schedules: pure functions ``step -> momentum``.

A momentum schedule is any callable that maps a (possibly traced) integer step
to a float32 scalar in ``[0, 1]``, exactly like an :data:`optax.Schedule`.
Every optax schedule (for instance :func:`optax.linear_schedule`) is therefore
a valid momentum schedule, and every schedule here is a valid optax schedule.

**Momentum** is the weight on the *old target*::

    target <- m(t) * target + (1 - m(t)) * online

It maps to the other conventions as ``optax.incremental_update(step_size=1 - m)``,
``flax.nnx.EMA(decay=m)``, BYOL's ``tau = m`` and timm's ``decay = m``.

The constructors below validate their arguments once, in Python, when the
schedule is built; the returned schedules are frozen dataclasses whose bodies
use ``jax.numpy`` only, so they are ``jit``- and ``vmap``-safe, and they
compare and hash by value (building the same schedule twice does not make a
``jax.jit`` that closes over it, or takes it as a static argument, compile
twice).

References:
  Assran et al., *Self-Supervised Learning from Images with a Joint-Embedding
  Predictive Architecture* (I-JEPA), arXiv:2301.08243.
  Bardes et al., *Revisiting Feature Prediction for Learning Visual
  Representations from Video* (V-JEPA), arXiv:2404.08471.
  Grill et al., *Bootstrap Your Own Latent* (BYOL), arXiv:2006.07733.
  Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*
  (DINO), arXiv:2104.14294.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "MomentumLike",
    "ConstantMomentum",
    "CosineMomentum",
    "LinearMomentum",
    "WarmupMomentum",
    "constant_momentum",
    "cosine_momentum",
    "linear_momentum",
    "warmup_momentum",
    "as_schedule",
]

Schedule = Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike]
"""A momentum schedule: ``step -> momentum`` (same shape as ``optax.Schedule``)."""

MomentumLike = Union[Schedule, float]
"""What every ``momentum=`` argument accepts: a schedule or a plain float."""


# ----------------------------------------------------------------- validation


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_float(name: str, value: Any, lo: float | None = None,
                 hi: float | None = None, *, lo_open: bool = False) -> float:
  """Returns ``value`` as a Python float, or raises a message naming ``name``."""
  if isinstance(value, bool) or not (
      isinstance(value, numbers.Real)
      or (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0)):
    raise TypeError(
        f"`{name}` must be a real number, got {value!r} "
        f"(type {type(value).__name__}).")
  if not _is_concrete(value):
    raise TypeError(
        f"`{name}` must be a concrete number when the schedule is built, got a "
        "traced value; build schedules outside `jax.jit`.")
  v = float(value)
  if not math.isfinite(v):
    raise ValueError(f"`{name}` must be finite, got {v!r}.")
  if lo is not None and (v <= lo if lo_open else v < lo):
    bound = f"> {lo}" if lo_open else f">= {lo}"
    raise ValueError(f"`{name}` must be {bound}, got {v!r}.")
  if hi is not None and v > hi:
    raise ValueError(f"`{name}` must be <= {hi}, got {v!r}.")
  return v


def _check_momentum(name: str, value: Any) -> float:
  try:
    return _check_float(name, value, 0.0, 1.0)
  except ValueError as e:
    raise ValueError(f"{e} A momentum is the weight on the old target and "
                     "must lie in [0, 1].") from None


def _check_int(name: str, value: Any, lo: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Integral, np.integer)):
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    else:
      raise TypeError(
          f"`{name}` must be an integer, got {value!r} "
          f"(type {type(value).__name__}).")
  v = int(value)
  if v < lo:
    raise ValueError(f"`{name}` must be >= {lo}, got {v}.")
  return v


def _step_f32(step: jax.typing.ArrayLike) -> jax.Array:
  """Casts an (int or float, possibly traced) step to float32."""
  return jnp.asarray(step).astype(jnp.float32)


# ------------------------------------------------------------------ schedules


@dataclasses.dataclass(frozen=True)
class ConstantMomentum:
  """``m(t) = momentum``. Built by :func:`constant_momentum`."""

  momentum: float

  def __post_init__(self) -> None:
    object.__setattr__(self, "momentum",
                       _check_momentum("momentum", self.momentum))

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    return jnp.full(jnp.shape(step), self.momentum, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class CosineMomentum:
  """Cosine increase from ``base`` to ``final``. Built by :func:`cosine_momentum`."""

  base: float
  final: float
  total_steps: int

  def __post_init__(self) -> None:
    object.__setattr__(self, "base", _check_momentum("base", self.base))
    object.__setattr__(self, "final", _check_momentum("final", self.final))
    object.__setattr__(self, "total_steps",
                       _check_int("total_steps", self.total_steps))

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = _step_f32(step)
    if self.total_steps == 0:
      return jnp.full(jnp.shape(t), self.final, dtype=jnp.float32)
    frac = jnp.clip(t, 0.0, float(self.total_steps)) / np.float32(
        self.total_steps)
    cos = (1.0 + jnp.cos(np.float32(math.pi) * frac)) / 2.0
    return (np.float32(self.final)
            - np.float32(self.final - self.base) * cos).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LinearMomentum:
  """Linear increase from ``base`` to ``final``. Built by :func:`linear_momentum`."""

  base: float
  final: float
  total_steps: int

  def __post_init__(self) -> None:
    object.__setattr__(self, "base", _check_momentum("base", self.base))
    object.__setattr__(self, "final", _check_momentum("final", self.final))
    object.__setattr__(self, "total_steps",
                       _check_int("total_steps", self.total_steps))

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = _step_f32(step)
    if self.total_steps == 0:
      return jnp.full(jnp.shape(t), self.final, dtype=jnp.float32)
    frac = jnp.clip(t, 0.0, float(self.total_steps)) / np.float32(
        self.total_steps)
    m = np.float32(self.base) + np.float32(self.final - self.base) * frac
    # Rounding may not overshoot the end points (e.g. final=1.0 exactly).
    lo, hi = sorted((self.base, self.final))
    return jnp.clip(m, np.float32(lo), np.float32(hi)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class WarmupMomentum:
  """timm / ema-pytorch warm-up. Built by :func:`warmup_momentum`."""

  max_momentum: float
  min_momentum: float
  inv_gamma: float
  power: float
  start_step: int

  def __post_init__(self) -> None:
    mx = _check_momentum("max_momentum", self.max_momentum)
    mn = _check_momentum("min_momentum", self.min_momentum)
    if mn > mx:
      raise ValueError(
          f"`min_momentum` ({mn!r}) must be <= `max_momentum` ({mx!r}).")
    object.__setattr__(self, "max_momentum", mx)
    object.__setattr__(self, "min_momentum", mn)
    object.__setattr__(self, "inv_gamma", _check_float(
        "inv_gamma", self.inv_gamma, 0.0, lo_open=True))
    object.__setattr__(self, "power", _check_float(
        "power", self.power, 0.0, lo_open=True))
    object.__setattr__(self, "start_step",
                       _check_int("start_step", self.start_step))

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.maximum(_step_f32(step) - np.float32(self.start_step), 0.0)
    m = 1.0 - (1.0 + t / np.float32(self.inv_gamma)) ** np.float32(-self.power)
    return jnp.clip(m, np.float32(self.min_momentum),
                    np.float32(self.max_momentum)).astype(jnp.float32)


# --------------------------------------------------------------- constructors


def constant_momentum(momentum: float) -> ConstantMomentum:
  """Constructs a constant momentum schedule, ``m(t) = momentum``.

  A plain float passed wherever a momentum is accepted means the same thing.

  Args:
    momentum: the weight on the old target, in ``[0, 1]``.

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if ``momentum`` is outside ``[0, 1]`` or not finite.
    TypeError: if ``momentum`` is not a real number.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.constant_momentum(0.996)
    >>> print(f"{schedule(0):.4f} {schedule(10_000):.4f}")
    0.9960 0.9960
    >>> schedule == jepa_ema.constant_momentum(0.996)
    True
  """
  return ConstantMomentum(momentum)


def cosine_momentum(base: float = 0.996, final: float = 1.0, *,
                    total_steps: int) -> CosineMomentum:
  r"""Constructs the cosine momentum schedule of BYOL, DINO and V-JEPA.

  .. math::
    m(t) = f - (f - b) \cdot \frac{1 + \cos(\pi \, t / T)}{2},
    \qquad t \text{ clamped to } [0, T],

  so ``m(0) = base`` and ``m(T) = final``; with ``total_steps == 0`` the
  schedule is the constant ``final``. It equals
  ``1 - optax.cosine_decay_schedule(1 - base, T)`` when ``final == 1``.

  Args:
    base: momentum at step 0, in ``[0, 1]`` (BYOL: 0.996; DINO: 0.996).
    final: momentum at and after ``total_steps``, in ``[0, 1]``.
    total_steps: ``T``, the number of training steps of the increase (BYOL
      and DINO: all training steps, ``epochs * iterations_per_epoch``).

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if a momentum is outside ``[0, 1]`` or ``total_steps < 0``.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.cosine_momentum(0.996, 1.0, total_steps=1000)
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 500, 1000, 2000)])
    0.9960 0.9980 1.0000 1.0000

  References:
    Grill et al., BYOL, arXiv:2006.07733 (section 3.2);
    Caron et al., DINO, arXiv:2104.14294;
    Bardes et al., V-JEPA, arXiv:2404.08471.
  """
  return CosineMomentum(base, final, total_steps)


def linear_momentum(base: float = 0.996, final: float = 1.0, *,
                    total_steps: int) -> LinearMomentum:
  r"""Constructs the linear momentum schedule of I-JEPA.

  .. math::
    m(t) = b + (f - b) \cdot t / T, \qquad t \text{ clamped to } [0, T],

  with ``total_steps == 0`` giving the constant ``final``. I-JEPA's
  ``ipe_scale`` (1.25 in its configs) simply stretches the ramp: use
  ``total_steps = int(ipe * epochs * ipe_scale)``; training then stops before
  the momentum reaches ``final``.

  Args:
    base: momentum at step 0, in ``[0, 1]`` (I-JEPA: 0.996).
    final: momentum at and after ``total_steps``, in ``[0, 1]`` (I-JEPA: 1.0).
    total_steps: ``T``, the length of the ramp in steps.

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if a momentum is outside ``[0, 1]`` or ``total_steps < 0``.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.linear_momentum(0.996, 1.0, total_steps=1000)
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 500, 1000, 2000)])
    0.9960 0.9980 1.0000 1.0000

  References:
    Assran et al., I-JEPA, arXiv:2301.08243.
  """
  return LinearMomentum(base, final, total_steps)


def warmup_momentum(max_momentum: float = 0.9999, min_momentum: float = 0.0,
                    inv_gamma: float = 1.0, power: float = 2 / 3,
                    start_step: int = 0) -> WarmupMomentum:
  r"""Constructs the model-EMA warm-up of timm ``ModelEmaV3`` / ema-pytorch.

  .. math::
    m(t) = \mathrm{clip}\left(1 - (1 + t' / \gamma^{-1})^{-p},\;
           m_{\min},\; m_{\max}\right), \qquad t' = \max(t - t_0, 0).

  The momentum starts at ``min_momentum`` (0 by default: the first update
  copies the online weights) and rises towards ``max_momentum``, so an EMA of
  a freshly initialised model is not dominated by its random start.
  ``power=2/3`` reaches 0.999 near 31.6k steps; ``power=3/4`` near 10k.

  Args:
    max_momentum: upper clip, in ``[0, 1]``.
    min_momentum: lower clip, in ``[0, 1]`` and ``<= max_momentum``.
    inv_gamma: ``> 0``; larger values slow the warm-up down.
    power: ``> 0``; the exponent of the warm-up.
    start_step: ``t0 >= 0``; the warm-up clock starts here (ema-pytorch's
      ``update_after_step``).

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: for a momentum outside ``[0, 1]``, ``min > max``, or a
      non-positive ``inv_gamma`` or ``power``, or ``start_step < 0``.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.warmup_momentum(max_momentum=0.9999, power=3 / 4)
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 10, 10_000, 10**8)])
    0.0000 0.8344 0.9990 0.9999
  """
  return WarmupMomentum(max_momentum, min_momentum, inv_gamma, power,
                        start_step)


def as_schedule(momentum: MomentumLike, name: str = "momentum") -> Schedule:
  """Returns ``momentum`` as a schedule: callables as they are, floats wrapped.

  Args:
    momentum: a schedule (any callable ``step -> momentum``) or a real number
      in ``[0, 1]``.
    name: the argument name used in error messages.

  Returns:
    A schedule.

  Raises:
    ValueError: if a number is outside ``[0, 1]``.
    TypeError: if ``momentum`` is neither callable nor a real number.

  Examples:
    >>> from jepa_ema.schedules import as_schedule
    >>> as_schedule(0.99)
    ConstantMomentum(momentum=0.99)
  """
  if callable(momentum):
    return momentum
  if isinstance(momentum, bool) or not (
      isinstance(momentum, numbers.Real)
      or (isinstance(momentum, (np.ndarray, jax.Array))
          and np.ndim(momentum) == 0)):
    raise TypeError(
        f"`{name}` must be a schedule (a callable step -> momentum) or a "
        f"float in [0, 1], got {momentum!r} (type {type(momentum).__name__}).")
  return ConstantMomentum(_check_momentum(name, momentum))
