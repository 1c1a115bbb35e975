"""The elementwise pytree kernel and its checks (internal).

What :mod:`jepa_ema.update` (the public update) and :mod:`jepa_ema.transform`
(the stateful wrapper) share: which leaves are blended, the structure /
shape / sharding checks with their error messages, the evaluation of a
momentum at a step, and the blend itself (the two-sided lerp, see
:mod:`jepa_ema.update`). Names here are public to the package, not to users;
``jepa_ema/__init__.py`` decides what users see.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import schedules as _schedules

__all__ = [
  "ShardingMismatchWarning",
  "PyTree",
  "short",
  "is_array_like",
  "is_float_leaf",
  "check_trees",
  "explicit_spec",
  "check_shardings",
  "resolve_momentum",
  "blend_leaf",
  "blend_tree",
]


class ShardingMismatchWarning(UserWarning):
  """Target and online leaves are laid out differently across devices.

  The EMA is elementwise, so with equal shardings it needs no communication;
  with different ones XLA silently inserts an all-to-all / all-gather per
  leaf on every step. Fix: create the target from the params (``ema().init``
  keeps each leaf's sharding; see ``jepa_ema.state_shardings``).
  """


PyTree = Any


MAX_REPR = 400
"""Longest repr put in an error message."""


def short(x: Any) -> str:
  s = str(x)
  return s if len(s) <= MAX_REPR else s[:MAX_REPR] + " ...]"


def is_array_like(x: Any) -> bool:
  return isinstance(
    x, (jax.Array, np.ndarray, np.generic, float, int, complex)
  ) and not isinstance(x, bool)


def is_float_leaf(x: Any) -> bool:
  """Floating (real or complex-free) array-like leaves are blended."""
  if not is_array_like(x):
    return False
  dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
  return jnp.issubdtype(dtype, jnp.floating)


def check_trees(target: PyTree, online: PyTree) -> None:
  """Raises ValueError naming the first key path where the trees differ."""
  t_def: Any = jax.tree.structure(target)
  o_def: Any = jax.tree.structure(online)
  t_leaves, _ = jax.tree_util.tree_flatten_with_path(target)
  o_leaves, _ = jax.tree_util.tree_flatten_with_path(online)
  if t_def != o_def:
    t_paths = [p for p, _ in t_leaves]
    o_paths = [p for p, _ in o_leaves]
    where = ""
    for i in range(max(len(t_paths), len(o_paths))):
      tp = t_paths[i] if i < len(t_paths) else None
      op = o_paths[i] if i < len(o_paths) else None
      if tp != op:
        t_at = jax.tree_util.keystr(tp) if tp is not None else "no more leaves"
        o_at = jax.tree_util.keystr(op) if op is not None else "no more leaves"
        where = (
          f" They first differ at leaf #{i}: target has {t_at}, "
          f"online has {o_at}."
        )
        break
    raise ValueError(
      "`target` and `online` must have the same tree structure."
      + where
      + f"\n  target structure: {short(t_def)}"
      f"\n  online structure: {short(o_def)}"
    )
  for (path, t), (_, o) in zip(t_leaves, o_leaves):
    if is_array_like(t) and is_array_like(o):
      if np.shape(t) != np.shape(o):
        raise ValueError(
          f"`target` and `online` leaf shapes differ at "
          f"{jax.tree_util.keystr(path) or '<root>'}: target has shape "
          f"{np.shape(t)}, online has shape {np.shape(o)}."
        )


def explicit_spec(x: Any) -> tuple | None:
  """The normalised PartitionSpec of ``x`` if its mesh axes are Explicit."""
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(sharding, "mesh", None)
  spec = getattr(sharding, "spec", None)
  if mesh is None or spec is None or getattr(mesh, "empty", True):
    return None
  if not any(
    t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())
  ):
    return None
  entries = list(spec) + [None] * (np.ndim(x) - len(spec))
  return tuple(entries)


def check_shardings(target: PyTree, online: PyTree) -> None:
  """Reports the first leaf whose target and online shardings differ.

  Explicit-axis meshes (``jax.make_mesh``'s default in recent JAX) carry the
  layout in the type, also under ``jit``: a mismatch is a ``ValueError`` (JAX
  would refuse the elementwise op anyway, with a less helpful message). With
  concrete arrays on auto-sharded meshes it is a
  :class:`ShardingMismatchWarning` (XLA would silently add communication).
  """
  t_leaves, _ = jax.tree_util.tree_flatten_with_path(target)
  o_leaves = jax.tree.leaves(online)
  for (path, t), o in zip(t_leaves, o_leaves):
    if not (isinstance(t, jax.Array) and isinstance(o, jax.Array)):
      continue
    where = jax.tree_util.keystr(path) or "<root>"
    t_spec, o_spec = explicit_spec(t), explicit_spec(o)
    if t_spec is not None and o_spec is not None:
      if t_spec != o_spec:
        raise ValueError(
          f"target and online are sharded differently at {where}: target "
          f"P{t_spec}, online P{o_spec} (explicit mesh axes). Build the "
          "target with ema().init(params), or reshard one side with "
          "jax.sharding.reshard; the EMA update is elementwise and must "
          "not move data between devices."
        )
      continue
    if isinstance(t, jax.core.Tracer) or isinstance(o, jax.core.Tracer):
      continue  # auto sharding under jit: the compiler picks the layouts
    ts, os_ = t.sharding, o.sharding
    if ts != os_ and not ts.is_equivalent_to(os_, t.ndim):
      warnings.warn(
        f"target and online are sharded differently at {where}: target "
        f"{ts}, online {os_}. The EMA update then needs cross-device "
        "communication on every step; build the target with "
        "ema().init(params) or jax.device_put it with "
        "jepa_ema.state_shardings(params).",
        ShardingMismatchWarning,
        stacklevel=3,
      )
      return


def resolve_momentum(momentum: Any, step: jax.typing.ArrayLike) -> jax.Array:
  """Evaluates ``momentum`` at ``step``; checks it whenever it is concrete."""
  if callable(momentum):
    m = momentum(step)
    what = f"the schedule {momentum!r} returned"
  elif isinstance(momentum, (jax.Array, np.ndarray, np.generic)):
    m = momentum
    what = "momentum"
  else:
    m = _schedules.as_schedule(momentum)(step)  # validates numbers and types
    what = "momentum"
  if isinstance(m, bool) or jnp.ndim(m) != 0:
    raise ValueError(
      f"{what} must be a scalar, got shape {jnp.shape(m)}: {short(m)}."
    )
  if not jnp.issubdtype(jnp.result_type(m), jnp.floating) and not (
    jnp.issubdtype(jnp.result_type(m), jnp.integer)
  ):
    raise TypeError(
      f"{what} must be a real scalar, got dtype {jnp.result_type(m)}."
    )
  if not isinstance(m, jax.core.Tracer):
    v = float(m)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
      raise ValueError(
        f"{what} {v!r} at step {short(step)}; a momentum must lie in "
        "[0, 1] (it is the weight on the old target)."
      )
  return jnp.asarray(m).astype(jnp.float32)


def blend_leaf(
  t: Any,
  o: Any,
  m: jax.Array,
  rounder: Callable[[jax.Array], jax.Array] | None = None,
) -> Any:
  """EMA of one leaf: float leaves blended in the target's dtype.

  With a ``rounder`` (float32 -> bfloat16, e.g. the stochastic rounding of
  :mod:`jepa_ema._rounding`), a bfloat16 result is rounded by it instead of
  to nearest.
  """
  if not is_float_leaf(t):
    return o
  t = jnp.asarray(t)
  out_dtype = t.dtype
  # At least float32 (explicit: jnp.promote_types obeys strict promotion).
  compute = out_dtype if out_dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
  tc = t.astype(compute)
  oc = jnp.asarray(o).astype(compute)
  m = m.astype(compute)
  a = (1.0 - m).astype(compute)
  # Two-sided lerp: step from the nearer end point by the smaller weight,
  # t + a (o - t) if a <= 1/2, else o + m (t - o). With a weight <= 1/2 the
  # rounded step cannot overshoot the far end point, so every output lies
  # between t and o, and t == o stays exactly t (no drift). The selects on
  # the scalar predicate are free; a clip would cost ~30% on a 2-core CPU.
  near = a <= 0.5
  base = jnp.where(near, tc, oc)
  far = jnp.where(near, oc, tc)
  mixed = base + jnp.where(near, a, m) * (far - base)
  mixed = jnp.where(a == 0, tc, jnp.where(a == 1, oc, mixed))
  if rounder is not None and out_dtype == jnp.bfloat16:
    return rounder(mixed)
  return mixed.astype(out_dtype)


def blend_tree(
  target: PyTree,
  online: PyTree,
  m: jax.Array,
  rounders: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
) -> PyTree:
  """:func:`blend_leaf` over checked trees; ``rounders``: one per target leaf."""
  leaves, treedef_ = jax.tree.flatten(target)
  treedef: Any = treedef_
  rounders = rounders if rounders is not None else [None] * len(leaves)
  return jax.tree.unflatten(
    treedef,
    [
      blend_leaf(t, o, m, r)
      for t, o, r in zip(leaves, treedef.flatten_up_to(online), rounders)
    ],
  )
