"""The ``drift`` option: ``||target - params|| / ||params||`` (internal).

The norms (global and per top-level entry of the params tree, in float32)
and when they are recomputed (every update, or updates ``N-1, 2N-1, ...``
under a ``lax.cond``). The option's check is in :mod:`jepa_ema._options`;
which leaves it measures, in the plan (:mod:`jepa_ema._plan`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jepa_ema import _kernel

__all__ = [
  "module_name",
  "drift_modules",
  "relative_distance",
  "zero_drift",
  "next_drift",
  "held",
]

PyTree = _kernel.PyTree


def module_name(path: tuple) -> str:
  """The name of the top-level entry of a key path ("" at the root)."""
  if not path:
    return ""
  k = path[0]
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return jax.tree_util.keystr((k,))


def drift_modules(tree: PyTree) -> list[str]:
  """The per-module names :func:`relative_distance` reports for ``tree``."""
  names = {
    module_name(path): None
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if _kernel.is_float_leaf(x)
  }
  return [] if "" in names else list(names)


def relative_distance(target: PyTree, online: PyTree) -> dict[str, Any]:
  """``||target - online|| / ||online||`` over all floating leaves and per
  top-level entry of the tree, in float32: ``{"global": x, "per_module":
  {name: x}}``. 0/0 counts as 0 and x/0 (x > 0) as inf; a NaN in either
  tree, or an Inf in the params, gives NaN (never a 0 that reads as
  "close").
  """
  t_leaves, _ = jax.tree_util.tree_flatten_with_path(target)
  o_leaves = jax.tree.leaves(online)
  sums: dict[str, list[jax.Array]] = {}
  for (path, t), o in zip(t_leaves, o_leaves):
    if not _kernel.is_float_leaf(t):
      continue
    d, n = _sum_sq(jnp.asarray(t), jnp.asarray(o)), _sum_sq(jnp.asarray(o))
    acc = sums.setdefault(module_name(path), [jnp.float32(0), jnp.float32(0)])
    acc[0], acc[1] = acc[0] + d, acc[1] + n

  def ratio(d: jax.Array, n: jax.Array) -> jax.Array:
    safe = jnp.sqrt(d / jnp.where(n > 0, n, 1.0))
    value = jnp.where(n > 0, safe, jnp.where(d > 0, jnp.inf, 0.0))
    # NaN in either tree reads as NaN (Inf in the params gives inf/inf).
    bad = jnp.isnan(d) | jnp.isnan(n)
    return jnp.where(bad, jnp.nan, value).astype(jnp.float32)

  total_d = sum((d for d, _ in sums.values()), jnp.float32(0))
  total_n = sum((n for _, n in sums.values()), jnp.float32(0))
  return {
    "global": ratio(total_d, total_n),
    "per_module": {name: ratio(*sums[name]) for name in drift_modules(target)},
  }


def _sum_sq(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
  """``sum(|x - y|**2)`` (``sum(|x|**2)`` without ``y``) in float32; complex
  leaves count both parts."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    z = x.astype(jnp.complex64) - (0 if y is None else y.astype(jnp.complex64))
    return jnp.sum(jnp.square(z.real) + jnp.square(z.imag))
  z = x.astype(jnp.float32) - (0 if y is None else y.astype(jnp.float32))
  return jnp.sum(jnp.square(z))


def zero_drift(params: PyTree) -> dict[str, Any]:
  """The drift of a target equal to the params (no pass over the params)."""
  zero = lambda: jnp.zeros([], jnp.float32)
  return {
    "global": zero(),
    "per_module": {name: zero() for name in drift_modules(params)},
  }


def next_drift(
  last: Any,
  target: PyTree,
  params: PyTree,
  step: jax.Array,
  every: int,
  interval: int,
) -> Any:
  """The drift after an update: recomputed on updates ``interval - 1``,
  ``2 * interval - 1``, ... (counted from 0), ``last`` on the others."""
  if interval == 0:
    return last
  if interval == 1:
    return relative_distance(target, params)
  due = (step // every) % interval == interval - 1
  if not isinstance(due, jax.core.Tracer):  # eager: a Python branch
    return relative_distance(target, params) if bool(due) else last
  return jax.lax.cond(
    due, lambda: relative_distance(target, params), lambda: last
  )


def held(lost: jax.Array | bool, last: Any, new: Any) -> Any:
  """``last`` if the update was skipped (``lost``), else ``new``: a skipped
  update leaves the drift as it was, like the target (None: off)."""
  if last is None:
    return new
  if not isinstance(lost, jax.core.Tracer):
    return last if bool(lost) else new
  return jax.tree.map(lambda a, b: jnp.where(lost, a, b), last, new)
