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
  "is_real_float_leaf",
  "leaf_dtype",
  "check_trees",
  "prefix_mismatch",
  "mesh_and_spec",
  "explicit_spec",
  "check_shardings",
  "fit_step",
  "resolve_momentum",
  "sanitize_momentum",
  "HALF_DTYPES",
  "Rounder",
  "lerp",
  "blend_leaf",
  "copy_leaf",
  "as_held",
  "blend_tree",
  "hold_unblended",
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


def leaf_dtype(x: Any) -> np.dtype:
  """The dtype JAX gives the array-like leaf ``x`` (canonical: float64 is
  float32 unless x64 is enabled; a Python float is float32)."""
  if hasattr(x, "dtype"):
    if jnp.issubdtype(x.dtype, jax.dtypes.extended):  # PRNG keys
      return x.dtype
    return jax.dtypes.canonicalize_dtype(x.dtype)
  return jnp.result_type(x)


def is_float_leaf(x: Any) -> bool:
  """The leaves that are blended: real and complex floating array-likes.

  The lerp is as valid for complex numbers as for real ones (it acts on the
  real and imaginary parts alike). Every other leaf (integers, bools, PRNG
  keys, non-array objects) is taken from ``online``.
  """
  if not is_array_like(x):
    return False
  return jnp.issubdtype(leaf_dtype(x), jnp.inexact)


def is_real_float_leaf(x: Any) -> bool:
  """Real floating array-likes: the leaves a storage ``dtype`` applies to
  (a real dtype would drop a complex leaf's imaginary part)."""
  return is_float_leaf(x) and jnp.issubdtype(leaf_dtype(x), jnp.floating)


def _check_dtypes(path: Any, t: Any, o: Any) -> None:
  """The dtype rule: the result keeps the target's dtype, never silently.

  A blended target leaf needs a numeric online leaf it can be cast to without
  losing a part: real floating or integer for a real target, also complex for
  a complex target. A target leaf that is not blended (integer, bool, PRNG
  key) is replaced by the online leaf, which must then have the same dtype.
  """
  if not is_array_like(t):
    return  # a non-array object: taken from online as it is
  where = jax.tree_util.keystr(path) or "<root>"
  o_dtype = leaf_dtype(o) if is_array_like(o) else None
  t_dtype = leaf_dtype(t)
  got = f"dtype {o_dtype}" if o_dtype is not None else type(o).__name__
  if is_float_leaf(t):
    ok = o_dtype is not None and (
      jnp.issubdtype(o_dtype, jnp.floating)
      or jnp.issubdtype(o_dtype, jnp.integer)
      or (
        jnp.issubdtype(o_dtype, jnp.complexfloating)
        and jnp.issubdtype(t_dtype, jnp.complexfloating)
      )
    )
    if not ok:
      raise TypeError(
        f"cannot blend the online leaf at {where} into the target: the "
        f"target has dtype {t_dtype}, online has {got}. A floating target "
        "leaf takes real floating or integer online values (complex ones too "
        "if the target is complex); they are cast to the target's dtype."
      )
    return
  if o_dtype != t_dtype:
    raise TypeError(
      f"the leaf at {where} is not floating (target dtype {t_dtype}), so "
      f"the new target takes the online leaf, but online has {got}: "
      "the result would change the target's dtype. Give both the same dtype "
      "(e.g. build the target from the params with ema().init)."
    )


def prefix_mismatch(
  flat_prefix: Sequence[tuple[Any, Any]], params: PyTree, holder: str
) -> str:
  """Why a prefix tree does not fit ``params``: names its first key path that
  is not one of the params' (``flat_prefix`` as ``tree_flatten_with_path``
  gives it; ``holder`` names the tree in the message, e.g. "the policy")."""
  param_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, leaf in flat_prefix:
    n = len(path)
    if not any(tuple(q[:n]) == tuple(path) for q in param_paths):
      return (
        f"{holder} has {leaf!r} at {jax.tree_util.keystr(path) or '<root>'}"
        ", which is not a key path of the params"
      )
  return "its structure is not a prefix of the params' structure"


def check_trees(target: PyTree, online: PyTree) -> None:
  """Raises naming the first key path where the trees differ.

  ValueError for a different structure or leaf shape; TypeError for leaf
  dtypes the result could not keep (see :func:`_check_dtypes`).
  """
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
    _check_dtypes(path, t, o)


def mesh_and_spec(x: Any) -> tuple[Any, Any] | None:
  """The mesh and PartitionSpec in ``x``'s type (its sharding as ``jit``
  traces it), or None where there is none (no mesh, an empty one, or a JAX
  without ``jax.typeof``)."""
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(sharding, "mesh", None)
  spec = getattr(sharding, "spec", None)
  if mesh is None or spec is None or getattr(mesh, "empty", True):
    return None
  return mesh, spec


def explicit_spec(x: Any) -> tuple | None:
  """The normalised PartitionSpec of ``x`` if its mesh axes are Explicit."""
  found = mesh_and_spec(x)
  if found is None:
    return None
  mesh, spec = found
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


_INT32 = np.iinfo(np.int32)


def fit_step(step: Any) -> Any:
  """``step`` as a jitted function can take it: a Python or NumPy integer
  beyond the int32 range becomes a float32 (jit would raise OverflowError
  for a Python int and wrap a NumPy int64 around); everything else as is.
  """
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
    if not _INT32.min <= step <= _INT32.max:
      return np.float32(step)
  return step


def resolve_momentum(
  momentum: Any, step: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """Evaluates ``momentum`` at ``step``: ``(m, finite)``, float32 and bool.

  A concrete momentum must be a finite number in ``[0, 1]`` (``ValueError``
  otherwise). A traced one (computed under ``jit``) cannot raise, so it gets
  a defined value instead, :func:`sanitize_momentum`'s.
  """
  step = fit_step(step)
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
    return jnp.asarray(m).astype(jnp.float32), jnp.array(True)
  return sanitize_momentum(jnp.asarray(m).astype(jnp.float32), step)


def sanitize_momentum(
  m: jax.Array, step: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """The defined value of a traced momentum: ``(m', finite)``.

  NaN and +-Inf become 1 (the target is left unchanged: nothing is lost) and
  ``finite`` is False; finite values outside ``[0, 1]`` are clipped to it (no
  extrapolation beyond the target or the online values). Nothing is reported
  here: a report is an effect in the program, and a program with an effect
  leaves JAX's fast dispatch path (about 17 us more per argument of every
  call, model-sized at 150 leaves); ask for one with
  :func:`jepa_ema.checked_momentum`. ``step`` is unused (kept for the
  callers' symmetry). Works elementwise (for the momenta of an ``every=k``
  window too).
  """
  del step
  finite = jnp.isfinite(m)
  clipped = jnp.clip(m, 0.0, 1.0).astype(jnp.float32)
  return jnp.where(finite, clipped, jnp.float32(1.0)), finite


HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
"""The target dtypes a stochastic rounder applies to."""

Rounder = Callable[[jax.Array, Any], jax.Array]
"""``(float32 values, half dtype) -> values in that dtype``."""


def lerp(t: jax.Array, o: jax.Array, m: jax.Array, a: jax.Array) -> jax.Array:
  """``m * t + a * o`` for real arrays of one dtype, ``a = 1 - m`` given.

  A two-sided lerp: it steps from the nearer end point by the smaller weight,
  ``t + a (o - t)`` if ``a <= 1/2``, else ``o + m (t - o)``. With a weight
  <= 1/2 the rounded step cannot overshoot the far end point, so every output
  lies between ``t`` and ``o``, and ``t == o`` stays exactly ``t`` (no drift).
  ``a == 0`` returns ``t`` bitwise, ``a == 1`` returns ``o``, and equal
  values return ``t`` bitwise (``-0.0`` and subnormals included).

  Where ``o - t`` overflows (finite values of opposite signs beyond half the
  dtype's range) the difference is taken of the halves, which is exact at
  such magnitudes, and the weight doubled (still <= 1): the same rounded
  result as in an unbounded exponent range, so finite inputs give a finite
  output between them. Elsewhere that select leaves every bit as it was.
  The selects on the scalar predicates are free, and the extra elementwise
  work hides under the memory traffic (``benchmarks/kernel_formulas.py``).

  Examples:
    >>> import jax.numpy as jnp
    >>> m = jnp.float32(0.5)
    >>> float(lerp(jnp.float32(3e38), jnp.float32(-3e38), m, 1 - m))
    0.0
    >>> float(lerp(jnp.float32(2.0), jnp.float32(2.0), jnp.float32(0.3),
    ...            jnp.float32(0.7)))
    2.0
  """
  near = a <= 0.5
  base = jnp.where(near, t, o)
  far = jnp.where(near, o, t)
  w = jnp.where(near, a, m).astype(t.dtype)
  d = far - base
  big = jnp.isinf(d)  # finite inputs only overflow here, never below
  d = jnp.where(big, far * 0.5 - base * 0.5, d)
  mixed = base + jnp.where(big, w + w, w) * d
  # d == 0: equal values (or subnormals a flushing platform reads as 0) keep
  # the nearer end point's bits, -0.0 and subnormals included.
  mixed = jnp.where(d == 0, base, mixed)
  return jnp.where(a == 0, t, jnp.where(a == 1, o, mixed))


def as_held(o: Any, dtype: Any) -> jax.Array:
  """The online leaf ``o`` cast to ``dtype``, exactly as ``o``'s dtype holds
  it, also under ``jit``.

  A half-precision leaf computed in the same program (``params + updates``
  in a train step) is rounded to its dtype, but XLA (with its default
  ``xla_allow_excess_precision``) may fuse that rounding away when the value
  is read back wider: the EMA would average the unrounded sum, not the
  params the step holds. A bfloat16 leaf is rounded again to bfloat16's
  precision after the cast (``reduce_precision``: the same rounding, which
  no pass removes, and a no-op on values bfloat16 holds); a float16 leaf
  passes an optimization barrier (``reduce_precision`` would flush float16
  subnormals). No data moves: the new params are the step's output anyway.
  """
  o = jnp.asarray(o)
  if o.dtype == jnp.float16 and isinstance(o, jax.core.Tracer):
    o = jax.lax.optimization_barrier(o)
  wide = o.astype(dtype)
  if o.dtype == jnp.bfloat16 and wide.dtype != o.dtype:
    if jnp.issubdtype(wide.dtype, jnp.floating):
      wide = jax.lax.reduce_precision(wide, exponent_bits=8, mantissa_bits=7)
  return wide


def blend_leaf(
  t: Any,
  o: Any,
  m: jax.Array,
  rounder: Rounder | None = None,
) -> Any:
  """EMA of one leaf: floating leaves blended in the target's dtype.

  Real and complex leaves alike (a complex lerp is the real lerp of both
  parts). With a ``rounder`` (e.g. the stochastic rounding of
  :mod:`jepa_ema._rounding`), a bfloat16 or float16 result is rounded by it
  instead of to nearest. Other leaves are taken from ``o`` (the dtype rule
  is enforced by :func:`check_trees`).
  """
  if not is_float_leaf(t):
    if isinstance(o, (np.ndarray, np.generic)):
      return jnp.asarray(o)  # the canonical dtype, which the target has
    return o
  t = jnp.asarray(t)
  out_dtype = t.dtype
  # At least float32 (explicit: jnp.promote_types obeys strict promotion).
  compute = out_dtype if out_dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
  real = np.empty(0, compute).real.dtype  # float32 for complex64
  tc = t.astype(compute)
  oc = as_held(o, compute)
  m = m.astype(real)
  a = (1.0 - m).astype(real)
  if jnp.issubdtype(compute, jnp.complexfloating):  # each part alike
    mixed = jax.lax.complex(
      lerp(tc.real, oc.real, m, a), lerp(tc.imag, oc.imag, m, a)
    )
  else:
    mixed = lerp(tc, oc, m, a)
  if rounder is not None and out_dtype in HALF_DTYPES:
    return rounder(mixed, out_dtype)
  return mixed.astype(out_dtype)


def copy_leaf(o: Any, dtype: Any = None, *, fresh: bool = False) -> Any:
  """The leaf ``o`` as a target takes it: the ``"copy"`` action, and every
  leaf of a new target.

  ``dtype``: the target leaf's dtype (None: ``o``'s own). A floating one
  gets the value exactly as ``o``'s dtype holds it (:func:`as_held`), cast;
  other leaves are taken as they are (NumPy ones as JAX arrays), non-array
  objects too. ``fresh``: a new buffer (a new target must not alias the
  params it is built from), cast to ``dtype`` where that differs.
  """
  if not is_array_like(o):
    return o
  if fresh:
    if dtype is None or leaf_dtype(o) == dtype:
      return jnp.array(o, copy=True)
    return jnp.array(o, dtype=dtype, copy=True)
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    return jnp.asarray(o) if isinstance(o, (np.ndarray, np.generic)) else o
  return as_held(o, dtype)


def blend_tree(
  target: PyTree,
  online: PyTree,
  m: jax.Array,
  rounders: Sequence[Rounder | None] | None,
  actions: Sequence[str],
) -> PyTree:
  """:func:`blend_leaf` over checked trees; ``rounders``: one per target leaf.

  ``actions``: one per target leaf, the plan's (:mod:`jepa_ema._plan`):
  ``"average"`` blends, ``"copy"`` takes the online value in the target
  leaf's dtype (:func:`copy_leaf`), ``"keep"`` returns the target leaf as it
  is.
  """
  leaves, treedef_ = jax.tree.flatten(target)
  treedef: Any = treedef_
  rounders = rounders if rounders is not None else [None] * len(leaves)
  out = []
  for t, o, r, a in zip(
    leaves, treedef.flatten_up_to(online), rounders, actions
  ):
    if a == "keep":
      out.append(t)
    elif a == "copy":
      out.append(
        copy_leaf(o, jnp.asarray(t).dtype if is_float_leaf(t) else None)
      )
    else:
      out.append(blend_leaf(t, o, m, r))
  return jax.tree.unflatten(treedef, out)


def hold_unblended(
  new: PyTree,
  old: PyTree,
  lost: jax.Array | bool,
  copied: Sequence[bool],
) -> PyTree:
  """``old`` at the ``copied`` leaves (one flag per target leaf), if ``lost``.

  A skipped update (non-finite params under ``skip_nonfinite``, or a
  non-finite traced momentum) has momentum 1, which leaves the blended
  leaves bitwise; the copied leaves (the ``"copy"`` action and the
  non-floating ones, taken from online) are held here, so the whole target
  is left bitwise. One scalar select per such leaf; the blended and kept
  leaves are untouched. Non-array leaves (Python objects, taken from online
  as they are) cannot be selected and are left to the caller's static
  structure.
  """
  leaves, treedef_ = jax.tree.flatten(new)
  treedef: Any = treedef_
  olds = treedef.flatten_up_to(old)
  out = []
  for n, o, held in zip(leaves, olds, copied):
    if held and is_array_like(n):
      out.append(jnp.where(lost, o, n))
    else:
      out.append(n)
  return jax.tree.unflatten(treedef, out)
