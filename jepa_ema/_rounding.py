"""The ``rounding="stochastic"`` option: its checks and its numerics (internal).

A bfloat16 target is blended in float32 and rounded up or down with the
probability that makes it exact in expectation (:func:`stochastic_round_bf16`).
The noise is a counter-based hash of the element position and a per-leaf seed
derived from the state's ``key`` and the step (:func:`round_seeds`), so it is
reproducible, independent of the sharding and needs no key update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "check_rounding",
  "check_key",
  "wrap_key",
  "round_seeds",
  "hash32",
  "element_index",
  "stochastic_round_bf16",
  "rounders",
]


def check_rounding(rounding: Any, dtype: Any) -> str:
  if rounding not in ("nearest", "stochastic"):
    raise ValueError(
      f"`rounding` must be 'nearest' or 'stochastic', got {rounding!r}."
    )
  if rounding == "stochastic" and dtype is not None and dtype != jnp.bfloat16:
    raise ValueError(
      f"rounding='stochastic' rounds float32 results to a bfloat16 target; "
      f"it needs dtype=jnp.bfloat16 (or dtype=None with bfloat16 params), "
      f"got dtype={dtype}."
    )
  return rounding


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
  noise = hash32(element_index(x.shape) ^ seed.astype(jnp.uint32)) >> 16
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = ((bits + noise) >> 16).astype(jnp.uint16)
  out = jax.lax.bitcast_convert_type(rounded, jnp.bfloat16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), out)


def rounders(
  key: jax.Array, impl: Any, step: jax.Array, n: int
) -> list[Callable[[jax.Array], jax.Array]]:
  """One stochastic rounder per target leaf for the update at ``step``: a
  pure function of (key, step, leaf, element position)."""
  return [
    functools.partial(stochastic_round_bf16, seed=seed)
    for seed in round_seeds(key, impl, step, n)
  ]
