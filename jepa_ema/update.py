"""The EMA update of a parameter pytree: ``target <- m * target + (1 - m) * online``.

This module is the kernel: it knows pytrees, dtypes and checks, and nothing of
optax state. :func:`ema_update` is a pure function that works eagerly and
inside any ``jax.jit``; :func:`make_ema_update` binds a schedule once and
returns the jit-compiled, buffer-donating three-argument update a training
loop calls.

Numerics, for every floating-point leaf (``a = 1 - m``)::

    m == 1    ->  target                      (bitwise: the old buffer values)
    m == 0    ->  online.astype(target.dtype)
    a <= 1/2  ->  (t + a * (o - t)).astype(target.dtype)
    a >  1/2  ->  (o + m * (t - o)).astype(target.dtype)

computed in float32, or in the target's dtype if that is wider (so a bfloat16
target is blended in float32 and rounded once). This two-sided lerp is exact where target and
online agree (a converged target does not drift by rounding) and, since the
rounded step of weight <= 1/2 cannot overshoot, every output lies between
target and online, which plain ``m * t + (1 - m) * o`` does not guarantee in
floating point. The selects on the scalar momentum are free: XLA fuses them
into the one memory-bound pass (12 bytes per float32 parameter), and the
result runs as fast as the plain formula.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import schedules as _schedules

__all__ = ["ema_update", "make_ema_update", "EmaUpdateFn",
           "ShardingMismatchWarning"]


class ShardingMismatchWarning(UserWarning):
  """Target and online leaves are laid out differently across devices.

  The EMA is elementwise, so with equal shardings it needs no communication;
  with different ones XLA silently inserts an all-to-all / all-gather per
  leaf on every step. Fix: create the target from the params (``ema().init``
  keeps each leaf's sharding; see ``jepa_ema.state_shardings``).
  """

PyTree = Any
EmaUpdateFn = Callable[[PyTree, PyTree, jax.typing.ArrayLike], PyTree]
"""``(target, online, step) -> new_target``, as returned by :func:`make_ema_update`."""

_MAX_REPR = 400


def _short(x: Any) -> str:
  s = str(x)
  return s if len(s) <= _MAX_REPR else s[:_MAX_REPR] + " ...]"


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, float, int, complex)
                    ) and not isinstance(x, bool)


def _is_float_leaf(x: Any) -> bool:
  """Floating (real or complex-free) array-like leaves are blended."""
  if not _is_array_like(x):
    return False
  dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
  return jnp.issubdtype(dtype, jnp.floating)


def _check_trees(target: PyTree, online: PyTree) -> None:
  """Raises ValueError naming the first key path where the trees differ."""
  t_def = jax.tree.structure(target)
  o_def = jax.tree.structure(online)
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
        where = (f" They first differ at leaf #{i}: target has {t_at}, "
                 f"online has {o_at}.")
        break
    raise ValueError(
        "`target` and `online` must have the same tree structure." + where +
        f"\n  target structure: {_short(t_def)}"
        f"\n  online structure: {_short(o_def)}")
  for (path, t), (_, o) in zip(t_leaves, o_leaves):
    if _is_array_like(t) and _is_array_like(o):
      if np.shape(t) != np.shape(o):
        raise ValueError(
            f"`target` and `online` leaf shapes differ at "
            f"{jax.tree_util.keystr(path) or '<root>'}: target has shape "
            f"{np.shape(t)}, online has shape {np.shape(o)}.")


def _explicit_spec(x: Any) -> tuple | None:
  """The normalised PartitionSpec of ``x`` if its mesh axes are Explicit."""
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(sharding, "mesh", None)
  spec = getattr(sharding, "spec", None)
  if mesh is None or spec is None or getattr(mesh, "empty", True):
    return None
  if not any(t == jax.sharding.AxisType.Explicit
             for t in getattr(mesh, "axis_types", ())):
    return None
  entries = list(spec) + [None] * (np.ndim(x) - len(spec))
  return tuple(entries)


def _check_shardings(target: PyTree, online: PyTree) -> None:
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
    t_spec, o_spec = _explicit_spec(t), _explicit_spec(o)
    if t_spec is not None and o_spec is not None:
      if t_spec != o_spec:
        raise ValueError(
            f"target and online are sharded differently at {where}: target "
            f"P{t_spec}, online P{o_spec} (explicit mesh axes). Build the "
            "target with ema().init(params), or reshard one side with "
            "jax.sharding.reshard; the EMA update is elementwise and must "
            "not move data between devices.")
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
          ShardingMismatchWarning, stacklevel=3)
      return


def _resolve_momentum(momentum: Any, step: jax.typing.ArrayLike) -> jax.Array:
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
        f"{what} must be a scalar, got shape {jnp.shape(m)}: {_short(m)}.")
  if not jnp.issubdtype(jnp.result_type(m), jnp.floating) and not (
      jnp.issubdtype(jnp.result_type(m), jnp.integer)):
    raise TypeError(f"{what} must be a real scalar, got dtype "
                    f"{jnp.result_type(m)}.")
  if not isinstance(m, jax.core.Tracer):
    v = float(m)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
      raise ValueError(
          f"{what} {v!r} at step {_short(step)}; a momentum must lie in "
          "[0, 1] (it is the weight on the old target).")
  return jnp.asarray(m).astype(jnp.float32)


def _blend(t: Any, o: Any, m: jax.Array, seed: jax.Array | None = None
           ) -> Any:
  """EMA of one leaf: float leaves blended in the target's dtype.

  With a ``seed`` (a uint32 scalar), a bfloat16 result is rounded
  stochastically (:func:`_stochastic_round_bf16`) instead of to nearest.
  """
  if not _is_float_leaf(t):
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
  if seed is not None and out_dtype == jnp.bfloat16:
    return _stochastic_round_bf16(mixed, seed)
  return mixed.astype(out_dtype)


def _hash32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash with full avalanche ("lowbias32")."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def _element_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of every element (mod 2**32), sharding-friendly."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(
        stride % 2**32)
    stride *= shape[d]
  return idx


def _stochastic_round_bf16(x: jax.Array, seed: jax.Array) -> jax.Array:
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
  noise = _hash32(_element_index(x.shape) ^ seed.astype(jnp.uint32)) >> 16
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = ((bits + noise) >> 16).astype(jnp.uint16)
  out = jax.lax.bitcast_convert_type(rounded, jnp.bfloat16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), out)


def _module_name(path: tuple) -> str:
  """The name of the top-level entry of a key path ("" at the root)."""
  if not path:
    return ""
  k = path[0]
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return jax.tree_util.keystr((k,))


def _drift_modules(tree: PyTree) -> list[str]:
  """The per-module names :func:`_relative_distance` reports for ``tree``."""
  names = {_module_name(path): None for path, x in
           jax.tree_util.tree_flatten_with_path(tree)[0] if _is_float_leaf(x)}
  return [] if "" in names else list(names)


def _relative_distance(target: PyTree, online: PyTree) -> dict[str, Any]:
  """``||target - online|| / ||online||`` over all floating leaves and per
  top-level entry of the tree, in float32: ``{"global": x, "per_module":
  {name: x}}``. 0/0 counts as 0 and x/0 (x > 0) as inf.
  """
  t_leaves, _ = jax.tree_util.tree_flatten_with_path(target)
  o_leaves = jax.tree.leaves(online)
  sums: dict[str, list[jax.Array]] = {}
  for (path, t), o in zip(t_leaves, o_leaves):
    if not _is_float_leaf(t):
      continue
    t32 = jnp.asarray(t).astype(jnp.float32)
    o32 = jnp.asarray(o).astype(jnp.float32)
    d, n = jnp.sum(jnp.square(t32 - o32)), jnp.sum(jnp.square(o32))
    acc = sums.setdefault(_module_name(path), [jnp.float32(0), jnp.float32(0)])
    acc[0], acc[1] = acc[0] + d, acc[1] + n

  def ratio(d: jax.Array, n: jax.Array) -> jax.Array:
    safe = jnp.sqrt(d / jnp.where(n > 0, n, 1.0))
    return jnp.where(n > 0, safe, jnp.where(d > 0, jnp.inf, 0.0)).astype(
        jnp.float32)

  total_d = sum((d for d, _ in sums.values()), jnp.float32(0))
  total_n = sum((n for _, n in sums.values()), jnp.float32(0))
  return {"global": ratio(total_d, total_n),
          "per_module": {name: ratio(*sums[name])
                         for name in _drift_modules(target)}}


def _blend_tree(target: PyTree, online: PyTree, m: jax.Array,
                seeds: list[jax.Array] | None = None) -> PyTree:
  """:func:`_blend` over checked trees; ``seeds``: one per target leaf."""
  leaves, treedef = jax.tree.flatten(target)
  seeds = seeds if seeds is not None else [None] * len(leaves)
  return jax.tree.unflatten(treedef, [
      _blend(t, o, m, s) for t, o, s in
      zip(leaves, treedef.flatten_up_to(online), seeds)])


def ema_update(target: PyTree, online: PyTree, step: jax.typing.ArrayLike,
               momentum: _schedules.MomentumLike | jax.typing.ArrayLike
               ) -> PyTree:
  """One EMA step of a parameter pytree: ``m * target + (1 - m) * online``.

  ``m = momentum(step)`` for a schedule, or ``momentum`` itself for a number
  (a traced scalar computed in the caller's ``jit`` is accepted too).
  Momentum is the weight on the old target: ``optax.incremental_update``'s
  ``step_size`` is ``1 - m``; ``flax.nnx.EMA``'s ``decay`` and BYOL's ``tau``
  are ``m``.

  * Floating leaves are blended in float32 (or the target's dtype if wider)
    and the result keeps the **target's** dtype (a float32 target of bfloat16
    params stays float32). ``m == 1`` leaves the target bitwise unchanged and
    ``m == 0`` returns the online values cast to the target's dtype. Every
    output lies between the target and online values (also in floating point).
  * Every other leaf (integer counters, bools, PRNG keys, non-array objects)
    is taken from ``online``.
  * Leaves keep their sharding and the update is elementwise, so it needs no
    communication between devices. Changing ``step`` never recompiles.

  Args:
    target: the target (teacher / EMA) parameter pytree.
    online: the online (student / context encoder) pytree; same structure and
      leaf shapes as ``target``.
    step: the training step ``t`` the schedule is evaluated at; an int or a
      traced integer scalar.
    momentum: a schedule (any callable ``step -> momentum``, optax schedules
      included) or a number in ``[0, 1]``.

  Returns:
    The new target, with the structure and leaf dtypes of ``target``.

  Raises:
    ValueError: if the tree structures or leaf shapes differ (the message names
      the first offending key path and both sides), or if a concrete momentum
      lies outside ``[0, 1]``.
    TypeError: if ``momentum`` is neither a schedule nor a real number.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> import jepa_ema
    >>> target = {"w": jnp.zeros(2), "count": jnp.array(3)}
    >>> online = {"w": jnp.ones(2), "count": jnp.array(4)}
    >>> new = jepa_ema.ema_update(target, online, step=0, momentum=0.9)
    >>> print(np.asarray(new["w"]).round(4), new["count"])
    [0.1 0.1] 4

    A schedule is evaluated at ``step``:

    >>> schedule = jepa_ema.linear_momentum(0.5, 1.0, total_steps=10)
    >>> print(np.asarray(jepa_ema.ema_update(target, online, 5, schedule)["w"]).round(4))
    [0.25 0.25]
  """
  m = _resolve_momentum(momentum, step)
  _check_trees(target, online)
  _check_shardings(target, online)
  return _blend_tree(target, online, m)


def make_ema_update(momentum: _schedules.MomentumLike, *,
                    donate: bool = True) -> EmaUpdateFn:
  """Binds a schedule once; returns the jitted ``(target, online, step)`` update.

  This is the function a hand-written training loop calls::

      ema_update_fn = jepa_ema.make_ema_update(jepa_ema.cosine_momentum(
          0.996, 1.0, total_steps=num_steps))
      target = ema_update_fn(target, online, step)

  With ``donate=True`` (the default) the old target's buffers are donated to
  the computation, so the new target is written in place and no second copy
  of the target is ever allocated. **The old target must not be used after
  the call** (its arrays are deleted); always rebind the result as above.
  Called inside the user's own ``jax.jit`` the function simply inlines (the
  outer jit decides donation). ``step`` is a traced argument: changing it
  never recompiles. On its first call, and on the call after any new
  compilation, it checks that target and online leaves share their shardings
  and emits a :class:`ShardingMismatchWarning` naming the first leaf
  otherwise (not on every call: the check costs about 1.5 us per leaf).

  Args:
    momentum: a schedule or a number in ``[0, 1]``; validated now.
    donate: donate the target's buffers (update in place).

  Returns:
    A jit-compiled ``ema_update_fn(target, online, step) -> new_target``.

  Raises:
    ValueError: if a number ``momentum`` is outside ``[0, 1]``.
    TypeError: if ``momentum`` is neither a schedule nor a number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jepa_ema
    >>> ema_update_fn = jepa_ema.make_ema_update(0.75)
    >>> target = {"w": jnp.zeros(3)}
    >>> for step in range(2):
    ...   target = ema_update_fn(target, {"w": jnp.ones(3)}, step)
    >>> print(target["w"].round(4))  # 1 - 0.75**2
    [0.4375 0.4375 0.4375]
  """
  schedule = _schedules.as_schedule(momentum)
  jitted = jax.jit(functools.partial(_bound_update, schedule),
                   donate_argnums=(0,) if donate else ())
  check_next = [True]
  # jax.jit's compilation-cache size (private API; without it, only the first
  # call is checked).
  cache_size = getattr(jitted, "_cache_size", lambda: 0)

  @functools.wraps(jitted)
  def ema_update_fn(target: PyTree, online: PyTree,
                    step: jax.typing.ArrayLike) -> PyTree:
    # Layouts only change together with a compilation, so the (~1.5 us per
    # leaf) sharding check runs on the first call and on the call after each
    # new compilation, never per step.
    if check_next[0]:
      _check_shardings(target, online)
    before = cache_size()
    out = jitted(target, online, step)
    check_next[0] = cache_size() != before
    return out

  ema_update_fn._cache_size = cache_size  # pylint: disable=protected-access
  ema_update_fn.lower = jitted.lower
  return ema_update_fn


def _bound_update(schedule: _schedules.Schedule, target: PyTree,
                  online: PyTree, step: jax.typing.ArrayLike) -> PyTree:
  return ema_update(target, online, step, schedule)
