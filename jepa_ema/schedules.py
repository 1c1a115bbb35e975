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
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import _checks

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
  "TfWarmupMomentum",
  "ExpWarmupMomentum",
  "tf_warmup_momentum",
  "exp_warmup_momentum",
  "ScaledMomentum",
  "HalflifeMomentum",
  "PowerMomentum",
  "scale_momentum",
  "halflife_momentum",
  "power_momentum",
  "gamma_to_sigma_rel",
  "sigma_rel_to_gamma",
  "as_schedule",
  "EmaPytorchMomentum",
  "TimmMomentum",
  "DiffusersMomentum",
  "ema_pytorch_momentum",
  "timm_momentum",
  "diffusers_momentum",
  "CheckedMomentum",
  "checked_momentum",
]

Schedule = Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike]
"""A momentum schedule: ``step -> momentum`` (same shape as ``optax.Schedule``)."""

MomentumLike = Union[Schedule, float]
"""What every ``momentum=`` argument accepts: a schedule or a plain float."""


# ----------------------------------------------------------------- validation


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_float(
  name: str,
  value: Any,
  lo: float | None = None,
  hi: float | None = None,
  *,
  lo_open: bool = False,
) -> float:
  """Returns ``value`` as a Python float, or raises a message naming ``name``."""
  if isinstance(value, bool) or not (
    isinstance(value, numbers.Real)
    or (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0)
  ):
    raise TypeError(
      f"`{name}` must be a real number, got {value!r} "
      f"(type {type(value).__name__})."
    )
  if not _is_concrete(value):
    raise TypeError(
      f"`{name}` must be a concrete number when the schedule is built, got a "
      "traced value; build schedules outside `jax.jit`."
    )
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
    raise ValueError(
      f"{e} A momentum is the weight on the old target and must lie in [0, 1]."
    ) from None


def _check_int(name: str, value: Any, lo: int = 0) -> int:
  # Integral floats (a step count of 1e4) are taken as ints here.
  return _checks.check_int(name, value, lo, integral_floats=True)


def _step_f32(step: jax.typing.ArrayLike) -> jax.Array:
  """Casts a real (int or float, possibly traced) step to float32.

  Python and NumPy numbers are converted by NumPy first, so a step beyond
  the int32 range (2**31 and up) is a large float, not an OverflowError.
  """
  if isinstance(step, jax.Array):  # tracers included
    if _is_real_dtype(step.dtype):
      return step.astype(jnp.float32)
  elif isinstance(step, numbers.Real) and not isinstance(
    step, (bool, np.bool_)
  ):
    try:
      return jnp.asarray(np.float32(step))
    except OverflowError:  # beyond even float64
      return jnp.asarray(np.float32(np.inf if step > 0 else -np.inf))
  elif isinstance(step, (np.ndarray, list, tuple)):
    arr = np.asarray(step)
    if _is_real_dtype(arr.dtype):
      return jnp.asarray(arr.astype(np.float32))
  raise TypeError(
    f"a schedule's step must be a real number or array of them, got "
    f"{_short_repr(step)} (type {type(step).__name__}"
    f"{f', dtype {step.dtype}' if hasattr(step, 'dtype') else ''})."
  )


def _reciprocal(x: float) -> np.float32:
  """``1 / x`` rounded to float32, as XLA folds it.

  Inside a program XLA rewrites a division by a constant as a product with
  its float32 reciprocal; eagerly each op runs alone and divides. Writing
  the product here makes a schedule's value the same however it is
  evaluated (eager, ``jit``, ``vmap``), bit for bit.
  """
  return np.float32(1.0) / np.float32(x)


def _is_real_dtype(dtype: Any) -> bool:
  return bool(
    jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
  )


def _short_repr(x: Any, limit: int = 200) -> str:
  s = repr(x)
  return s if len(s) <= limit else s[:limit] + "..."


# ------------------------------------------------------------------ schedules


@dataclasses.dataclass(frozen=True)
class ConstantMomentum:
  """``m(t) = momentum``. Built by :func:`constant_momentum`."""

  momentum: float

  def __post_init__(self) -> None:
    object.__setattr__(
      self, "momentum", _check_momentum("momentum", self.momentum)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    return jnp.full(jnp.shape(_step_f32(step)), self.momentum, jnp.float32)


@dataclasses.dataclass(frozen=True)
class CosineMomentum:
  """Cosine increase from ``base`` to ``final``. Built by :func:`cosine_momentum`."""

  base: float
  final: float
  total_steps: float

  def __post_init__(self) -> None:
    object.__setattr__(self, "base", _check_momentum("base", self.base))
    object.__setattr__(self, "final", _check_momentum("final", self.final))
    object.__setattr__(
      self, "total_steps", _check_float("total_steps", self.total_steps, 0.0)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = _step_f32(step)
    if self.total_steps == 0:
      return jnp.full(jnp.shape(t), self.final, dtype=jnp.float32)
    frac = jnp.clip(t * _reciprocal(self.total_steps), 0.0, 1.0)
    cos = (1.0 + jnp.cos(np.float32(math.pi) * frac)) / 2.0
    return (
      np.float32(self.final) - np.float32(self.final - self.base) * cos
    ).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LinearMomentum:
  """Linear increase from ``base`` to ``final``. Built by :func:`linear_momentum`."""

  base: float
  final: float
  total_steps: float

  def __post_init__(self) -> None:
    object.__setattr__(self, "base", _check_momentum("base", self.base))
    object.__setattr__(self, "final", _check_momentum("final", self.final))
    object.__setattr__(
      self, "total_steps", _check_float("total_steps", self.total_steps, 0.0)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = _step_f32(step)
    if self.total_steps == 0:
      return jnp.full(jnp.shape(t), self.final, dtype=jnp.float32)
    frac = jnp.clip(t * _reciprocal(self.total_steps), 0.0, 1.0)
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
        f"`min_momentum` ({mn!r}) must be <= `max_momentum` ({mx!r})."
      )
    object.__setattr__(self, "max_momentum", mx)
    object.__setattr__(self, "min_momentum", mn)
    object.__setattr__(
      self,
      "inv_gamma",
      _check_float("inv_gamma", self.inv_gamma, 0.0, lo_open=True),
    )
    object.__setattr__(
      self, "power", _check_float("power", self.power, 0.0, lo_open=True)
    )
    object.__setattr__(
      self, "start_step", _check_int("start_step", self.start_step)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.maximum(_step_f32(step) - np.float32(self.start_step), 0.0)
    m = 1.0 - (1.0 + t * _reciprocal(self.inv_gamma)) ** np.float32(-self.power)
    return jnp.clip(
      m, np.float32(self.min_momentum), np.float32(self.max_momentum)
    ).astype(jnp.float32)


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


def cosine_momentum(
  base: float = 0.996, final: float = 1.0, *, total_steps: float
) -> CosineMomentum:
  r"""Constructs the cosine momentum schedule of BYOL, DINO and MoCo v3.

  .. math::
    m(t) = f - (f - b) \cdot \frac{1 + \cos(\pi \, t / T)}{2},
    \qquad t \text{ clamped to } [0, T],

  so ``m(0) = base`` and ``m(T) = final``; with ``total_steps == 0`` the
  schedule is the constant ``final``. It equals
  ``1 - optax.cosine_decay_schedule(1 - base, T)`` when ``final == 1``.

  Args:
    base: momentum at step 0, in ``[0, 1]`` (BYOL: 0.996; DINO: 0.996).
    final: momentum at and after ``total_steps``, in ``[0, 1]``.
    total_steps: ``T >= 0``, the number of training steps of the increase
      (BYOL and DINO: all training steps, ``epochs * iterations_per_epoch``).
      A real number is accepted (the step is a real number too).

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
    Caron et al., DINO, arXiv:2104.14294.
  """
  return CosineMomentum(base, final, total_steps)


def linear_momentum(
  base: float = 0.996, final: float = 1.0, *, total_steps: float
) -> LinearMomentum:
  r"""Constructs the linear momentum schedule of I-JEPA and V-JEPA.

  .. math::
    m(t) = b + (f - b) \cdot t / T, \qquad t \text{ clamped to } [0, T],

  with ``total_steps == 0`` giving the constant ``final``. The released
  I-JEPA and V-JEPA code draws ``m`` from a generator that divides by the
  *unrounded* ``ipe * epochs * ipe_scale`` (I-JEPA's configs: ``ipe_scale``
  1.0; V-JEPA's: 1.25, which stretches the ramp so that training stops before
  the momentum reaches ``final``). Pass that product as it is, without
  ``int(...)``: ``total_steps`` is a real number and the port is exact.

  Args:
    base: momentum at step 0, in ``[0, 1]`` (I-JEPA: 0.996).
    final: momentum at and after ``total_steps``, in ``[0, 1]`` (I-JEPA: 1.0).
    total_steps: ``T >= 0``, the length of the ramp in steps (a real number).

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
    Assran et al., I-JEPA, arXiv:2301.08243;
    Bardes et al., V-JEPA, arXiv:2404.08471.
  """
  return LinearMomentum(base, final, total_steps)


def warmup_momentum(
  max_momentum: float = 0.9999,
  min_momentum: float = 0.0,
  inv_gamma: float = 1.0,
  power: float = 2 / 3,
  start_step: int = 0,
) -> WarmupMomentum:
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
  return WarmupMomentum(
    max_momentum, min_momentum, inv_gamma, power, start_step
  )


@dataclasses.dataclass(frozen=True)
class TfWarmupMomentum:
  """TF's ``num_updates`` warm-up. Built by :func:`tf_warmup_momentum`."""

  max_momentum: float

  def __post_init__(self) -> None:
    object.__setattr__(
      self, "max_momentum", _check_momentum("max_momentum", self.max_momentum)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.maximum(_step_f32(step), 0.0)
    m = (1.0 + t) / (10.0 + t)
    return jnp.minimum(m, np.float32(self.max_momentum)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ExpWarmupMomentum:
  """ultralytics ``ModelEMA``'s warm-up. Built by :func:`exp_warmup_momentum`."""

  max_momentum: float
  tau: float

  def __post_init__(self) -> None:
    object.__setattr__(
      self, "max_momentum", _check_momentum("max_momentum", self.max_momentum)
    )
    object.__setattr__(
      self, "tau", _check_float("tau", self.tau, 0.0, lo_open=True)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.maximum(_step_f32(step), 0.0)
    m = np.float32(self.max_momentum) * -jnp.expm1(
      -(t + 1.0) * _reciprocal(self.tau)
    )
    return m.astype(jnp.float32)


def tf_warmup_momentum(max_momentum: float) -> TfWarmupMomentum:
  r"""Constructs TensorFlow's ``num_updates`` warm-up, as praxis calls it.

  .. math::
    m(t) = \min\left(m_{\max},\; \frac{1 + t}{10 + t}\right),

  with ``t`` the number of updates before this one (update 0 uses 0.1). This
  is ``tf.train.ExponentialMovingAverage(decay, num_updates=t)`` as praxis'
  ``apply_ema_weights`` calls it (the count is read before it is
  incremented). kauldron's ``ema_params(debias=True)`` reads it after the
  increment: ``lambda t: schedule(t + 1)``; diffusers' ``EMAModel`` copies at
  its first update and uses the formula from the second on (see the porting
  guide).

  Args:
    max_momentum: the cap, in ``[0, 1]`` (TF's ``decay``).

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if ``max_momentum`` is outside ``[0, 1]``.
    TypeError: if it is not a real number.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.tf_warmup_momentum(0.999)
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 1, 90, 10**5)])
    0.1000 0.1818 0.9100 0.9990
  """
  return TfWarmupMomentum(max_momentum)


def exp_warmup_momentum(
  max_momentum: float, tau: float = 2000.0
) -> ExpWarmupMomentum:
  r"""Constructs the exponential warm-up of ultralytics / YOLOv5 ``ModelEMA``.

  .. math::
    m(t) = m_{\max} \left(1 - e^{-(t + 1) / \tau}\right),

  with ``t`` the number of updates before this one: ``ModelEMA.update``
  increments its ``updates`` counter before it computes the decay.

  Args:
    max_momentum: the limit, in ``[0, 1]`` (ultralytics' ``decay``, 0.9999).
    tau: ``> 0``, the warm-up's time constant in updates (ultralytics: 2000).

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if ``max_momentum`` is outside ``[0, 1]`` or ``tau <= 0``.
    TypeError: if an argument is not a real number.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.exp_warmup_momentum(0.9999, tau=2000.0)
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 1999, 10**5)])
    0.0005 0.6321 0.9999
  """
  return ExpWarmupMomentum(max_momentum, tau)


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
    or (
      isinstance(momentum, (np.ndarray, jax.Array)) and np.ndim(momentum) == 0
    )
  ):
    raise TypeError(
      f"`{name}` must be a schedule (a callable step -> momentum) or a "
      f"float in [0, 1], got {momentum!r} (type {type(momentum).__name__})."
    )
  return ConstantMomentum(_check_momentum(name, momentum))


# -------------------------------------------------------------- horizon tools


@dataclasses.dataclass(frozen=True)
class ScaledMomentum:
  """``m(kappa * t) ** kappa``. Built by :func:`scale_momentum`."""

  momentum: Schedule
  kappa: float

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    m = jnp.asarray(
      self.momentum(_step_f32(step) * np.float32(self.kappa)), jnp.float32
    )
    # pow(0, k) = 0 and pow(1, k) = 1 exactly, for every k > 0.
    return jnp.power(m, np.float32(self.kappa)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class HalflifeMomentum:
  """``0.5 ** (1 / H_t)``. Built by :func:`halflife_momentum`."""

  halflife: float
  rampup: float | None = None

  def __post_init__(self) -> None:
    object.__setattr__(
      self,
      "halflife",
      _check_float("halflife", self.halflife, 0.0, lo_open=True),
    )
    if self.rampup is not None:
      object.__setattr__(
        self, "rampup", _check_float("rampup", self.rampup, 0.0, lo_open=True)
      )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = _step_f32(step)
    h = jnp.full(jnp.shape(t), self.halflife, jnp.float32)
    if self.rampup is not None:
      h = jnp.minimum(h, np.float32(self.rampup) * (jnp.maximum(t, 0.0) + 1.0))
    # 0.5 ** (1 / h) = exp(-ln 2 / h): one rounding.
    return jnp.exp(np.float32(-math.log(2.0)) / h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PowerMomentum:
  """EDM2's power-function EMA. Built by :func:`power_momentum`."""

  gamma: float

  def __post_init__(self) -> None:
    object.__setattr__(
      self, "gamma", _check_float("gamma", self.gamma, 0.0, lo_open=True)
    )

  @property
  def sigma_rel(self) -> float:
    """The relative standard deviation of the averaging profile."""
    return gamma_to_sigma_rel(self.gamma)

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.maximum(_step_f32(step), 0.0)
    # (1 - 1/(t+1)) ** (g+1) = exp((g+1) * log1p(-1/(t+1))): exact 0 at t=0.
    return jnp.exp(
      np.float32(self.gamma + 1.0) * jnp.log1p(-1.0 / (t + 1.0))
    ).astype(jnp.float32)


def scale_momentum(momentum: MomentumLike, kappa: float) -> Schedule:
  r"""Ports a momentum (schedule) to a batch size ``kappa`` times larger.

  The EMA Scaling Rule of Busbridge et al. (2023): when the batch grows by
  ``kappa`` (so the run has ``kappa`` times fewer steps over the same data),
  the EMA must take ``kappa`` of the reference's steps at once,

  .. math::
    \hat m(t) = m(\kappa t)^{\kappa},

  so that after ``n`` new steps the old target weighs what it did after
  ``kappa * n`` reference steps. Pair it with the optimizer's own scaling
  rule (Adam: ``lr * sqrt(kappa)``; SGD: ``lr * kappa``).

  ``kappa == 1`` returns ``momentum`` (as a schedule) unchanged; momenta 0
  and 1 stay 0 and 1. ``momentum(kappa * t)`` is called with a real step, so
  a schedule must accept one (all of this module's and optax's do).

  Args:
    momentum: the reference momentum: a float in ``[0, 1]`` or a schedule.
    kappa: ``new_batch / reference_batch``, a positive, finite real.

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if ``kappa`` is not positive and finite, or a float momentum
      is outside ``[0, 1]``.
    TypeError: if an argument has the wrong type.

  Examples:
    DINO's 0.996 at batch 256 (cosine to 1 over 100 epochs of 5000 steps),
    ported to batch 1024: 4x fewer steps, so the ramp is 4x shorter too.

    >>> import jepa_ema
    >>> ref = jepa_ema.cosine_momentum(0.996, 1.0, total_steps=500_000)
    >>> big = jepa_ema.scale_momentum(ref, 1024 / 256)
    >>> print(f"{big(0):.6f} {big(62_500):.6f} {big(125_000):.6f}")
    0.984096 0.992024 1.000000
    >>> print(f"{jepa_ema.scale_momentum(0.999, 0.5)(0):.6f}")
    0.999500

  References:
    Busbridge et al., *How to Scale Your EMA*, arXiv:2307.13813.
  """
  k = _check_float("kappa", kappa, 0.0, lo_open=True)
  schedule = as_schedule(momentum)
  if k == 1.0:
    return schedule
  return ScaledMomentum(schedule, k)


def halflife_momentum(
  halflife: float, *, rampup: float | None = None
) -> HalflifeMomentum:
  r"""Constructs the momentum of an EMA stated as a half-life (EDM).

  .. math::
    m(t) = 0.5^{1 / H_t}, \qquad H_t = \begin{cases}
      H & \text{without ramp-up} \\
      \min(H,\; r \cdot (t + 1)) & \text{with } \texttt{rampup} = r
    \end{cases}

  After ``H`` steps the old target's weight has halved. The ramp-up is EDM /
  EDM2's ``ema_rampup_ratio`` (0.05 there), with EDM2's counting
  (``cur_nimg`` is incremented before the EMA update, so update ``t`` has
  seen ``(t + 1) * batch`` images): the window grows with training, so the
  random initialisation is forgotten quickly.

  A half-life stated in images (EDM: ``ema_halflife_kimg * 1000``) is
  ``halflife = images / batch_size`` steps.

  Args:
    halflife: ``H > 0``, in steps (a real number).
    rampup: ``r > 0`` or ``None`` (no ramp-up).

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: if ``halflife`` or ``rampup`` is not positive and finite.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> print(f"{jepa_ema.halflife_momentum(693.1)(0):.6f}")  # ~ 0.999
    0.999000
    >>> edm = jepa_ema.halflife_momentum(500_000 / 512, rampup=0.05)
    >>> print(*[f"{edm(t):.4f}" for t in (0, 99, 100_000)])
    0.0000 0.8706 0.9993

  References:
    Karras et al., *Elucidating the Design Space of Diffusion-Based
    Generative Models* (EDM), arXiv:2206.00364; EDM2, arXiv:2312.02696.
  """
  return HalflifeMomentum(halflife, rampup)


def gamma_to_sigma_rel(gamma: float) -> float:
  r"""The relative width of a power-function EMA profile (EDM2 eq. 123).

  .. math::
    \sigma_{\mathrm{rel}} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2
    (\gamma + 3)}}

  Args:
    gamma: the exponent ``gamma > 0``.

  Returns:
    ``sigma_rel`` as a Python float, in ``(0, sqrt(1/12))``.

  Raises:
    ValueError: if ``gamma`` is not positive and finite.

  Examples:
    >>> import jepa_ema
    >>> print(f"{jepa_ema.gamma_to_sigma_rel(6.94):.4f}")
    0.1000

  References:
    Karras et al., EDM2, arXiv:2312.02696 (appendix C).
  """
  g = _check_float("gamma", gamma, 0.0, lo_open=True)
  return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  r"""The exponent of the power-function EMA of width ``sigma_rel`` (EDM2 eq. 126).

  The largest real root of
  :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma^{-2})\gamma + (12 - \sigma^{-2})`,
  the inverse of :func:`gamma_to_sigma_rel`.

  Args:
    sigma_rel: in ``(0, sqrt(1/12))`` (``sqrt(1/12)`` is ``gamma = 0``).

  Returns:
    ``gamma > 0`` as a Python float (polished to float64 rounding).

  Raises:
    ValueError: if ``sigma_rel`` is outside ``(0, sqrt(1/12))``.

  Examples:
    >>> import jepa_ema
    >>> print(f"{jepa_ema.sigma_rel_to_gamma(0.05):.4f} "
    ...       f"{jepa_ema.sigma_rel_to_gamma(0.10):.4f}")
    16.9722 6.9372

  References:
    Karras et al., EDM2, arXiv:2312.02696 (appendix C).
  """
  s = _check_float("sigma_rel", sigma_rel, 0.0, lo_open=True)
  if s >= math.sqrt(1.0 / 12.0):
    raise ValueError(
      f"`sigma_rel` must be < sqrt(1/12) = {math.sqrt(1 / 12):.6f} (that is "
      f"gamma > 0), got {s!r}."
    )
  t = s**-2.0
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  g = float(np.max(roots[np.abs(roots.imag) < 1e-6 * (1 + np.abs(roots))].real))
  for _ in range(3):  # Newton polish of the root
    f = ((g + 7.0) * g + 16.0 - t) * g + 12.0 - t
    df = (3.0 * g + 14.0) * g + 16.0 - t
    if df == 0.0:
      break
    g -= f / df
  return g


def power_momentum(
  *, sigma_rel: float | None = None, gamma: float | None = None
) -> PowerMomentum:
  r"""Constructs EDM2's power-function EMA as a momentum schedule.

  .. math::
    m(t) = \left(1 - \frac{1}{t + 1}\right)^{\gamma + 1},

  EDM2's ``beta`` with its update counter ``t + 1`` (EDM2 calls the update
  after incrementing its image counter), so update 0 copies the online
  params (``m(0) = 0``) and the averaging window then grows with training:
  after ``n`` updates the target averages the params it saw with weights
  ``proportional to tau ** gamma``, a profile whose width relative to ``n`` is
  ``sigma_rel`` (:func:`gamma_to_sigma_rel`). This is what
  :func:`jepa_ema.posthoc_reconstruct` combines after training.

  Give exactly one of ``sigma_rel`` (EDM2's parameter) and ``gamma``.

  Args:
    sigma_rel: in ``(0, sqrt(1/12))``; EDM2 tracks 0.05 and 0.10.
    gamma: ``> 0``.

  Returns:
    A schedule ``step -> momentum`` (float32); its ``gamma`` and
    ``sigma_rel`` are attributes.

  Raises:
    ValueError: if neither or both are given, or one is out of range.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.power_momentum(gamma=7.0)
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 1, 9, 999)])
    0.0000 0.0039 0.4305 0.9920
    >>> print(f"{jepa_ema.power_momentum(sigma_rel=0.05).gamma:.4f}")
    16.9722

  References:
    Karras et al., *Analyzing and Improving the Training Dynamics of
    Diffusion Models* (EDM2), arXiv:2312.02696.
  """
  if (sigma_rel is None) == (gamma is None):
    raise ValueError(
      "power_momentum takes exactly one of `sigma_rel` and `gamma`, got "
      f"sigma_rel={sigma_rel!r}, gamma={gamma!r}."
    )
  if sigma_rel is not None:
    return PowerMomentum(sigma_rel_to_gamma(sigma_rel))
  assert gamma is not None
  return PowerMomentum(gamma)


# -------------------------------------------------- ports of PyTorch EMAs


_check_bool = _checks.check_bool


def _multiple_of(step: jax.typing.ArrayLike, k: int) -> jax.Array:
  """Whether ``step`` is a multiple of ``k``, exactly for integer steps
  (in integer arithmetic: float32 holds every integer up to 2**24 only)."""
  if isinstance(step, jax.Array) and jnp.issubdtype(step.dtype, jnp.integer):
    return step % k == 0
  if isinstance(step, (numbers.Integral, np.integer)) and not isinstance(
    step, (bool, np.bool_)
  ):
    return jnp.asarray(int(step) % k == 0)
  if isinstance(step, (np.ndarray, list, tuple)):
    arr = np.asarray(step)
    if jnp.issubdtype(arr.dtype, jnp.integer):
      return jnp.asarray(arr % k == 0)
  return jnp.mod(_step_f32(step), np.float32(k)) == 0


def _warm_up(s: jax.Array, inv_gamma: float, power: float) -> jax.Array:
  """``1 - (1 + s / inv_gamma) ** -power`` in float32.

  ``s`` times the float32 reciprocal, which is what XLA makes of a division
  by a constant under ``jit`` anyway: eager calls then round alike."""
  return 1.0 - (1.0 + s * _reciprocal(inv_gamma)) ** np.float32(-power)


@dataclasses.dataclass(frozen=True)
class EmaPytorchMomentum:
  """ema-pytorch's ``EMA``, call by call. Built by :func:`ema_pytorch_momentum`."""

  beta: float
  update_after_step: int
  update_every: int
  inv_gamma: float
  power: float
  min_value: float

  def __post_init__(self) -> None:
    object.__setattr__(self, "beta", _check_momentum("beta", self.beta))
    object.__setattr__(
      self, "min_value", _check_momentum("min_value", self.min_value)
    )
    object.__setattr__(
      self,
      "update_after_step",
      _check_int("update_after_step", self.update_after_step),
    )
    object.__setattr__(
      self, "update_every", _check_int("update_every", self.update_every, 1)
    )
    object.__setattr__(
      self,
      "inv_gamma",
      _check_float("inv_gamma", self.inv_gamma, 0.0, lo_open=True),
    )
    object.__setattr__(
      self, "power", _check_float("power", self.power, 0.0, lo_open=True)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.maximum(_step_f32(step), 0.0)  # calls so far
    s = t - np.float32(self.update_after_step)
    # torch's clamp(min, max): max wins where min > max, as jnp.clip.
    warm = jnp.clip(
      _warm_up(s, self.inv_gamma, self.power),
      np.float32(self.min_value),
      np.float32(self.beta),
    )
    m = jnp.where(s <= 0.0, 0.0, warm)  # call 0, and up to update_after_step
    idle = (t > 0.0) & jnp.logical_not(_multiple_of(step, self.update_every))
    return jnp.where(idle, 1.0, m).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TimmMomentum:
  """timm's ``ModelEmaV3`` as ``train.py`` calls it. Built by :func:`timm_momentum`."""

  decay: float
  min_decay: float
  update_after_step: int
  use_warmup: bool
  warmup_gamma: float
  warmup_power: float

  def __post_init__(self) -> None:
    object.__setattr__(self, "decay", _check_momentum("decay", self.decay))
    object.__setattr__(
      self, "min_decay", _check_momentum("min_decay", self.min_decay)
    )
    object.__setattr__(
      self,
      "update_after_step",
      _check_int("update_after_step", self.update_after_step),
    )
    object.__setattr__(
      self, "use_warmup", _check_bool("use_warmup", self.use_warmup)
    )
    object.__setattr__(
      self,
      "warmup_gamma",
      _check_float("warmup_gamma", self.warmup_gamma, 0.0, lo_open=True),
    )
    object.__setattr__(
      self,
      "warmup_power",
      _check_float("warmup_power", self.warmup_power, 0.0, lo_open=True),
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    # timm's step is t + 1; max(0, step - update_after_step - 1) = t - u.
    s = jnp.maximum(_step_f32(step), 0.0) - np.float32(self.update_after_step)
    if self.use_warmup:
      m = jnp.maximum(
        jnp.minimum(
          _warm_up(s, self.warmup_gamma, self.warmup_power),
          np.float32(self.decay),
        ),
        np.float32(self.min_decay),
      )
    else:
      m = jnp.full(jnp.shape(s), self.decay, jnp.float32)
    return jnp.where(s <= 0.0, 0.0, m).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DiffusersMomentum:
  """diffusers' ``EMAModel``, step by step. Built by :func:`diffusers_momentum`."""

  decay: float
  min_decay: float
  update_after_step: int
  use_ema_warmup: bool
  inv_gamma: float
  power: float

  def __post_init__(self) -> None:
    object.__setattr__(self, "decay", _check_momentum("decay", self.decay))
    object.__setattr__(
      self, "min_decay", _check_momentum("min_decay", self.min_decay)
    )
    object.__setattr__(
      self,
      "update_after_step",
      _check_int("update_after_step", self.update_after_step),
    )
    object.__setattr__(
      self, "use_ema_warmup", _check_bool("use_ema_warmup", self.use_ema_warmup)
    )
    object.__setattr__(
      self,
      "inv_gamma",
      _check_float("inv_gamma", self.inv_gamma, 0.0, lo_open=True),
    )
    object.__setattr__(
      self, "power", _check_float("power", self.power, 0.0, lo_open=True)
    )

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    # optimization_step is t + 1 when get_decay reads it: s = t - u.
    s = jnp.maximum(_step_f32(step), 0.0) - np.float32(self.update_after_step)
    if self.use_ema_warmup:
      m = _warm_up(s, self.inv_gamma, self.power)
    else:
      m = (1.0 + s) / (10.0 + s)
    m = jnp.maximum(
      jnp.minimum(m, np.float32(self.decay)), np.float32(self.min_decay)
    )
    return jnp.where(s <= 0.0, 0.0, m).astype(jnp.float32)


def ema_pytorch_momentum(
  beta: float = 0.9999,
  *,
  update_after_step: int = 100,
  update_every: int = 10,
  inv_gamma: float = 1.0,
  power: float = 2 / 3,
  min_value: float = 0.0,
) -> EmaPytorchMomentum:
  r"""Ports ``ema_pytorch.EMA(model, beta=..., ...)``, called on every step.

  With ``t`` the number of ``ema.update()`` calls before this one (the
  state's step; call the update wherever ``ema.update()`` was called):

  .. math::
    m(t) = \begin{cases}
      0 & t = 0 \text{ (the first call copies)} \\
      1 & t \bmod k \ne 0 \text{ (the calls in between do not act)} \\
      0 & t \le u \text{ (a copy up to update\_after\_step)} \\
      \mathrm{clip}\left(1 - (1 + (t - u)/\gamma^{-1})^{-p},\;
        m_{\min},\; \beta\right) & \text{otherwise,}
    \end{cases}

  with ``k = update_every`` and ``u = update_after_step``: the warm-up is
  counted in *calls*, not in the updates that act. Momentum 1 leaves the
  target bitwise unchanged; ``every=k`` of :func:`jepa_ema.ema` is a
  different EMA (it acts on calls ``k-1, 2k-1, ...`` with the window's
  product of momenta). The keyword defaults are ema-pytorch's own.

  Args:
    beta: the cap of the warm-up, in ``[0, 1]``.
    update_after_step: ``u >= 0``: calls up to ``u`` copy.
    update_every: ``k >= 1``: only every ``k``-th call acts.
    inv_gamma: ``> 0``, the warm-up's time scale.
    power: ``> 0``, the warm-up's exponent.
    min_value: the warm-up's floor, in ``[0, 1]`` (where it exceeds
      ``beta``, ``beta`` wins, as in torch's ``clamp``).

  Returns:
    A schedule ``step -> momentum`` (float32). A step is exact up to
    ``2**24`` calls for a float step, and for any integer step.

  Raises:
    ValueError: for a momentum outside ``[0, 1]``, ``update_every < 1``, a
      negative ``update_after_step`` or a non-positive ``inv_gamma`` /
      ``power``.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.ema_pytorch_momentum()
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 5, 100, 110, 120, 121)])
    0.0000 1.0000 0.0000 0.7978 0.8686 1.0000
  """
  return EmaPytorchMomentum(
    beta, update_after_step, update_every, inv_gamma, power, min_value
  )


def timm_momentum(
  decay: float = 0.9999,
  *,
  min_decay: float = 0.0,
  update_after_step: int = 0,
  use_warmup: bool = False,
  warmup_gamma: float = 1.0,
  warmup_power: float = 2 / 3,
) -> TimmMomentum:
  r"""Ports ``timm.utils.ModelEmaV3(model, decay=..., ...)`` as timm trains.

  timm's ``train.py`` calls ``num_updates += 1;
  model_ema.update(model, step=num_updates)``, so with ``t`` the updates
  before this one (timm's ``step`` is ``t + 1``) and ``u =
  update_after_step``:

  .. math::
    m(t) = \begin{cases}
      0 & t \le u \text{ (copies)} \\
      \max(\min(1 - (1 + (t - u)/\gamma)^{-p},\; d),\; d_{\min})
        & \text{with use\_warmup} \\
      d & \text{otherwise.}
    \end{cases}

  The defaults copy at the first update, then use the constant ``decay``.
  ``ModelEmaV3.update(model)`` *without* ``step=`` uses ``decay`` from the
  first call (no copy): that is ``jepa_ema.ema(decay)``. The keyword
  defaults are timm's own.

  Args:
    decay: ``d``, in ``[0, 1]``.
    min_decay: ``d_min``, the warm-up's floor, in ``[0, 1]`` (it wins over
      ``decay`` where larger, as in timm; unused without warm-up).
    update_after_step: ``u >= 0``: updates up to ``u`` copy.
    use_warmup: the warm-up (a bool).
    warmup_gamma: ``> 0``, the warm-up's time scale.
    warmup_power: ``> 0``, the warm-up's exponent.

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: for a momentum outside ``[0, 1]``, a negative
      ``update_after_step`` or a non-positive ``warmup_gamma`` /
      ``warmup_power``.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.timm_momentum()
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 1, 1000)])
    0.0000 0.9999 0.9999
    >>> warm = jepa_ema.timm_momentum(use_warmup=True, update_after_step=10)
    >>> print(*[f"{warm(t):.4f}" for t in (10, 11, 10_010)])
    0.0000 0.3700 0.9978
  """
  return TimmMomentum(
    decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power
  )


def diffusers_momentum(
  decay: float = 0.9999,
  *,
  min_decay: float = 0.0,
  update_after_step: int = 0,
  use_ema_warmup: bool = False,
  inv_gamma: float = 1.0,
  power: float = 2 / 3,
) -> DiffusersMomentum:
  r"""Ports ``diffusers.training_utils.EMAModel(parameters, decay=..., ...)``.

  ``EMAModel.step()`` increments ``optimization_step`` before it reads the
  decay, so with ``t`` the ``step()`` calls before this one and ``u =
  update_after_step``, ``s = t - u``:

  .. math::
    m(t) = \begin{cases}
      0 & s \le 0 \text{ (copies)} \\
      \max(\min(w(s),\; d),\; d_{\min}) & \text{otherwise,}
    \end{cases}
    \quad w(s) = \begin{cases}
      1 - (1 + s/\gamma^{-1})^{-p} & \text{with use\_ema\_warmup} \\
      (1 + s) / (10 + s) & \text{otherwise.}
    \end{cases}

  The defaults are **not** a constant ``decay``: the first update copies,
  and ``(1 + s) / (10 + s)`` reaches 0.999 only after ~9,000 updates. The
  keyword defaults are diffusers' own.

  Args:
    decay: ``d``, the cap, in ``[0, 1]``.
    min_decay: ``d_min``, the floor, in ``[0, 1]`` (it wins over ``decay``
      where larger, as in diffusers).
    update_after_step: ``u >= 0``: updates up to ``u`` copy.
    use_ema_warmup: the power warm-up instead of ``(1 + s) / (10 + s)``.
    inv_gamma: ``> 0``, the warm-up's time scale.
    power: ``> 0``, the warm-up's exponent.

  Returns:
    A schedule ``step -> momentum`` (float32).

  Raises:
    ValueError: for a momentum outside ``[0, 1]``, a negative
      ``update_after_step`` or a non-positive ``inv_gamma`` / ``power``.
    TypeError: if an argument has the wrong type.

  Examples:
    >>> import jepa_ema
    >>> schedule = jepa_ema.diffusers_momentum()
    >>> print(*[f"{schedule(t):.4f}" for t in (0, 1, 2, 9000)])
    0.0000 0.1818 0.2500 0.9990
  """
  return DiffusersMomentum(
    decay, min_decay, update_after_step, use_ema_warmup, inv_gamma, power
  )


# -------------------------------------------------------------------- checks


@dataclasses.dataclass(frozen=True)
class CheckedMomentum:
  """A schedule whose out-of-range values are reported under ``checkify``.

  Built by :func:`checked_momentum`.
  """

  momentum: Schedule | jax.Array

  def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
    m = self.momentum(step) if callable(self.momentum) else self.momentum
    m = jnp.asarray(m)
    from jax.experimental import checkify  # pylint: disable=g-import-not-at-top

    checkify.debug_check(
      jnp.all(jnp.isfinite(m) & (m >= 0.0) & (m <= 1.0)),
      "momentum {m} at step {step} is outside [0, 1]: NaN/Inf leaves the "
      "target unchanged, other values are clipped to [0, 1]",
      m=m,
      step=jnp.asarray(step),
    )
    return m


def checked_momentum(
  momentum: MomentumLike | jax.Array,
) -> CheckedMomentum:
  """Reports a traced momentum outside ``[0, 1]`` (or NaN / Inf) on request.

  Under ``jit`` a momentum cannot raise, so the update gives it a defined
  value (NaN and Inf leave the target unchanged and count in
  ``state.skipped``; other values are clipped to ``[0, 1]``), silently. Wrap
  a schedule you do not trust in ``checked_momentum`` and run the update
  under ``jax.experimental.checkify.checkify``: the error names the momentum
  and the step. Without ``checkify`` the check does nothing, but it is an
  effect in the program, and JAX dispatches a jitted function with an
  effect on its slow path (about 17 us more per argument of every
  call): use it while debugging, not in the step you time. The library's
  own schedules are validated when built and need no check.

  Args:
    momentum: a schedule (any callable ``step -> momentum``), a number, or a
      scalar array (a traced one too: the momentum your own ``jit`` computed).

  Returns:
    The same schedule, checked.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> import jepa_ema
    >>> ema = jepa_ema.ema(
    ...     jepa_ema.checked_momentum(lambda step: 1.25 + 0 * step))
    >>> state = ema.init({"w": jnp.zeros(2)})
    >>> err, _ = checkify.checkify(jax.jit(ema.update))({"w": jnp.ones(2)}, state)
    >>> print(err.get().split(":")[0])
    momentum 1.25 at step 0 is outside [0, 1]
  """
  if isinstance(momentum, (jax.Array, np.ndarray)):
    return CheckedMomentum(momentum)  # checked (and resolved) when applied
  return CheckedMomentum(as_schedule(momentum))
