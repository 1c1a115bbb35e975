"""Rounding of half-precision targets (internal): the ``rounding="stochastic"``
option, its checks and numerics, and the stagnation warning of round-to-nearest.

A bfloat16 or float16 target is blended in float32 and rounded up or down with
the probability that makes it exact in expectation
(:func:`stochastic_round_bf16`, :func:`stochastic_round_f16`). The noise is a
counter-based hash of the element position and a per-leaf seed derived from
the state's ``key`` and the step (:func:`round_seeds`), so it is reproducible,
independent of the sharding and needs no key update.

Rounded to nearest, a low-precision target stops moving once the increment
``(1 - m)(o - t)`` is below half an ulp of ``t``: :func:`check_stagnation`
warns at ``init`` (:class:`PrecisionWarning`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import _kernel

__all__ = [
  "PrecisionWarning",
  "STALL_TOLERANCE",
  "PROBE_STEPS",
  "check_rounding",
  "check_stagnation",
  "check_key",
  "wrap_key",
  "round_seeds",
  "hash32",
  "element_index",
  "stochastic_round_bf16",
  "stochastic_round_f16",
  "stochastic_round",
  "rounders",
]


class PrecisionWarning(UserWarning):
  """A low-precision target would stop following the params.

  Rounded to nearest, a bfloat16 / float16 / float8 target moves only while
  the increment ``(1 - m)(online - target)`` is at least half an ulp of the
  target; with a high momentum it stalls well away from the params. Fix:
  keep the target in float32 (``dtype=jnp.float32``) or, for bfloat16 and
  float16, pass ``rounding="stochastic"``.

  Emitted by ``init`` of :func:`~jepa_ema.ema` and :func:`~jepa_ema.track_ema`
  (and the first call of :func:`~jepa_ema.make_ema_update`'s function) when
  a target leaf is narrower than float32, the rounding is to nearest, and
  ``u / (1 - m)`` exceeds 1 % for its unit roundoff ``u`` (2**-8 bfloat16,
  2**-11 float16) and the largest momentum ``m < 1`` the schedule takes at
  steps 0, 1, 10, ..., 10**6: the relative distance at which the target
  stops following.

  Examples:
    >>> import warnings, jax.numpy as jnp, jepa_ema
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   state = jepa_ema.ema(0.999).init({"w": jnp.zeros(3, jnp.float16)})
    >>> caught[0].category.__name__
    'PrecisionWarning'
    >>> print(str(caught[0].message)[:60])
    the target's float16 leaves (first at ['w']) are rounded to
  """


STALL_TOLERANCE = 0.01
"""The relative distance :func:`check_stagnation` tolerates."""


def check_rounding(rounding: Any, dtype: Any) -> str:
  if rounding not in ("nearest", "stochastic"):
    raise ValueError(
      f"`rounding` must be 'nearest' or 'stochastic', got {rounding!r}."
    )
  if (
    rounding == "stochastic"
    and dtype is not None
    and dtype not in _kernel.HALF_DTYPES
  ):
    raise ValueError(
      f"rounding='stochastic' rounds float32 results to a half-precision "
      f"target; it needs dtype=jnp.bfloat16 or jnp.float16 (or dtype=None "
      f"with half-precision params), got dtype={dtype}."
    )
  return rounding


PROBE_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
"""The steps :func:`check_stagnation` evaluates a schedule at."""


def check_stagnation(
  schedules: Sequence[Callable[[Any], Any]], target: Any, stacklevel: int = 3
) -> None:
  """Warns if round-to-nearest would stall a low-precision target leaf.

  An update moves a leaf by ``(1 - m)(o - t)``; rounded to nearest it is
  lost once that is below half an ulp of ``t``, at most ``u |t|`` with the
  unit roundoff ``u`` (2**-8 for bfloat16, 2**-11 for float16, 2**-4 and
  2**-3 for the float8 formats e4m3 and e5m2). So the target
  stops following the params once within ``u / (1 - m)`` of them, relative
  to its magnitude. A :class:`PrecisionWarning` is emitted, for the first
  leaf of each half dtype, when that exceeds :data:`STALL_TOLERANCE` (1 %)
  at the largest momentum below 1 that a schedule takes at the steps
  :data:`PROBE_STEPS` (so a warm-up that starts at 0 is caught; a momentum
  of exactly 1 is a target meant to stand still). A schedule that cannot be
  evaluated concretely is not checked. ``stacklevel``: the frame the warning
  names, counted from this function (3: its caller's caller).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(target)
  first: dict[np.dtype, str] = {}
  for path, x in leaves:
    if _kernel.is_float_leaf(x) and _is_low_precision(_kernel.leaf_dtype(x)):
      first.setdefault(_kernel.leaf_dtype(x), jax.tree_util.keystr(path))
  if not first:
    return
  worst = None  # (m, step): the largest momentum below 1
  for schedule in schedules:
    for step in PROBE_STEPS:
      try:
        with jax.ensure_compile_time_eval():
          m = float(schedule(step))
      except Exception:  # pylint: disable=broad-except
        break  # not concrete (or fails): the update will tell
      if m < 1.0 and (worst is None or m > worst[0]):
        worst = (m, step)
  if worst is None:
    return
  m, step = worst
  for dtype, where in first.items():
    u = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
    stall = u / (1.0 - m)
    if stall > STALL_TOLERANCE:
      fix = (
        "Keep the target in float32 (dtype=jnp.float32) or pass "
        "rounding='stochastic'."
        if dtype in _kernel.HALF_DTYPES
        else "Keep the target in float32 (dtype=jnp.float32)."
      )
      warnings.warn(
        f"the target's {dtype} leaves (first at {where or '<root>'}) are "
        f"rounded to nearest: at momentum {m:g} (step {step}) an update adds "
        f"{1.0 - m:.3g} of the distance to the params, which is lost when "
        "below half an ulp, so the target stops following the params once "
        f"|params - target| < {stall:.3g} |target| (u / (1 - m), unit "
        f"roundoff u = {u:.3g}; tolerated: {STALL_TOLERANCE:g}). {fix}",
        PrecisionWarning,
        stacklevel=stacklevel,
      )


def _is_low_precision(dtype: np.dtype) -> bool:
  """Real floating dtypes narrower than float32: bfloat16, float16, float8s."""
  return bool(jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4)


def check_key(key: Any) -> tuple[jax.Array, Any]:
  """``(uint32 key data, impl)`` of an int seed or a PRNG key."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    key = jax.random.key(int(key))
  if isinstance(key, jax.Array) and jnp.issubdtype(
    key.dtype, jax.dtypes.prng_key
  ):
    if key.shape:
      raise ValueError(
        f"`key` must be a single PRNG key, got shape {key.shape}."
      )
    return jax.random.key_data(key), jax.random.key_impl(key)
  if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32:
    return jnp.asarray(key), None  # raw (legacy jax.random.PRNGKey) key data
  raise TypeError(
    f"`key` must be an int seed or a jax.random.key, got {key!r}."
  )


def wrap_key(key_data: jax.Array, impl: Any) -> jax.Array:
  return (
    jax.random.wrap_key_data(key_data, impl=impl)
    if impl is not None
    else jax.random.wrap_key_data(key_data)
  )


def round_seeds(
  key: jax.Array, impl: Any, step: jax.Array, n: int
) -> jax.Array:
  """n uint32 seeds, a pure function of (key, step): one per target leaf."""
  return jax.random.bits(
    jax.random.fold_in(wrap_key(key, impl), step), (n,), jnp.uint32
  )


def hash32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash with full avalanche ("lowbias32")."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def element_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of every element (mod 2**32), sharding-friendly."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(
      stride % 2**32
    )
    stride *= shape[d]
  return idx


def stochastic_round_bf16(x: jax.Array, seed: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` to bfloat16 up or down, unbiased in expectation.

  bfloat16 is the top half of a float32. Adding 16 uniform random bits to
  the low half and truncating rounds the magnitude up with probability
  ``low / 2**16``, exactly the fraction of the bfloat16 gap that ``x`` has
  crossed, so ``E[round(x)] = x`` (for either sign; values that are already
  bfloat16 are returned exactly). The noise is a counter-based hash of the
  element's position and ``seed``: a pure function of the state, identical
  on any sharding, and ~30x cheaper on CPU than ``jax.random.bits``.
  """
  x = x.astype(jnp.float32)
  noise = _noise(x.shape, seed) >> 16
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = ((bits + noise) >> 16).astype(jnp.uint16)
  out = jax.lax.bitcast_convert_type(rounded, jnp.bfloat16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), out)


def _noise(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
  """32 uniform random bits per element: hash(position ^ seed)."""
  return hash32(element_index(shape) ^ seed.astype(jnp.uint32))


def stochastic_round_f16(x: jax.Array, seed: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` to float16 up or down, unbiased in expectation.

  As for bfloat16 (:func:`stochastic_round_bf16`), by truncating the float32
  bits after adding random bits to the part that is dropped: float16 keeps
  10 of float32's 23 mantissa bits in its normal range, so 13 bits are
  dropped; in its subnormal range (``|x| < 2**-14``, a fixed gap of
  ``2**-24``) more, ``126 - e`` for the float32 exponent ``e``. The carry
  happens with probability (dropped part) / (gap), the fraction of the gap
  ``x`` has crossed, so ``E[round(x)] = x`` exactly. Below the smallest
  subnormal (``|x| < 2**-24``) the result is 0 or ``2**-24`` with probability
  ``|x| * 2**24`` (to 24 bits). NaN, and values that only round to a finite
  float16 to nearest (between the float16 maximum and the overflow
  threshold), are rounded to nearest.
  """
  x = x.astype(jnp.float32)
  noise = _noise(x.shape, seed)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  e = ((bits >> 23) & jnp.uint32(0xFF)).astype(jnp.int32)
  drop = jnp.clip(126 - e, 13, 23).astype(jnp.uint32)
  mask = (jnp.uint32(1) << drop) - jnp.uint32(1)
  kept = jax.lax.bitcast_convert_type(
    (bits + (noise & mask)) & ~mask, jnp.float32
  )
  u = (noise >> 8).astype(jnp.float32) * np.float32(2.0**-24)
  tiny = jnp.where(
    u < jnp.abs(x) * np.float32(2.0**24), np.float32(2.0**-24), np.float32(0)
  )
  out = jnp.where(e < 103, jnp.copysign(tiny, x), kept).astype(jnp.float16)
  nearest = x.astype(jnp.float16)
  return jnp.where(
    (jnp.isinf(out) & ~jnp.isinf(nearest)) | jnp.isnan(x), nearest, out
  )


def stochastic_round(x: jax.Array, dtype: Any, seed: jax.Array) -> jax.Array:
  """Stochastic rounding of float32 ``x`` to the half dtype ``dtype``."""
  if np.dtype(dtype) == np.dtype(jnp.float16):
    return stochastic_round_f16(x, seed)
  if np.dtype(dtype) == np.dtype(jnp.bfloat16):
    return stochastic_round_bf16(x, seed)
  raise ValueError(f"stochastic rounding to {dtype} is not supported.")


def rounders(
  key: jax.Array, impl: Any, step: jax.Array, n: int
) -> list[Callable[[jax.Array, Any], jax.Array]]:
  """One stochastic rounder ``(x, dtype) -> rounded`` per target leaf for the
  update at ``step``: a pure function of (key, step, leaf, element
  position)."""
  return [
    functools.partial(stochastic_round, seed=seed)
    for seed in round_seeds(key, impl, step, n)
  ]
