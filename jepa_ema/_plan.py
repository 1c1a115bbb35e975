"""The per-leaf plan of an EMA (internal): every per-leaf decision, resolved once.

For each leaf of the params a :class:`LeafPlan` says what the target does
with it: its action (the policy's, with ``"average"`` kept for the floating
leaves the EMA rule blends and ``"copy"`` for every other leaf, so no
special case remains for "no policy"), its stored dtype, its own layout and
its memory per target, and what follows from the action: whether the target
stores it, whether ``skip_nonfinite`` checks it, whether the update blends
it, whether write-back and drift see it.

:func:`make_plan` composes :func:`jepa_ema.policy.resolve` (the actions) and
:func:`jepa_ema.placement.resolve` (the layouts). It runs in Python when
``init`` is called and when ``update`` is traced: under ``jit`` the plan costs
nothing per step and never causes a recompilation. ``init``, ``update``,
``state_shardings``, write-back, drift, ``skip_nonfinite`` and
:func:`jepa_ema.ema_update` read it; none of them re-derives a per-leaf
decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

from jepa_ema import _kernel
from jepa_ema import placement as _placement
from jepa_ema import policy as _policy

__all__ = [
  "PlanOptions",
  "LeafOptions",
  "LeafPlan",
  "Plan",
  "make_plan",
  "STORED",
  "CHECKED",
  "BLENDED",
  "COPIED",
  "WRITTEN_BACK",
  "MEASURED",
]

PyTree = _kernel.PyTree


class PlanOptions(Protocol):
  """The options a plan is made of (what :class:`jepa_ema._options.Options`
  and :class:`LeafOptions` hold)."""

  @property
  def policy(self) -> Any: ...

  @property
  def dtype(self) -> Any: ...

  @property
  def target_sharding(self) -> Any: ...

  @property
  def memory_kinds(self) -> tuple: ...


class LeafOptions(NamedTuple):
  """The per-leaf options alone: for :func:`jepa_ema.ema_update` (a policy)
  and :func:`jepa_ema.state_shardings` (a layout)."""

  policy: Any = None
  dtype: Any = None
  target_sharding: Any = None
  memory_kinds: tuple = (None,)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """What the target does with one leaf of the params.

  Attributes:
    action: ``"average"`` (a floating leaf, blended by the EMA rule),
      ``"copy"`` (the online value on every update: the policy's copies and
      every non-floating leaf), ``"keep"`` or ``"exclude"``.
    dtype: the dtype the target stores it in (None: excluded, or not an
      array).
    sharding: the target's own layout of it (None: its param's).
    memory_kinds: its memory in each target (None: the device's).
  """

  action: str
  dtype: Any
  sharding: Any
  memory_kinds: tuple

  @property
  def stored(self) -> bool:
    """The target holds it (``None`` in its place otherwise)."""
    return self.action != "exclude"

  @property
  def checked(self) -> bool:
    """It enters the target, so ``skip_nonfinite`` checks it."""
    return self.action in ("average", "copy")

  @property
  def blended(self) -> bool:
    """The update blends it (the lerp; a skip's momentum 1 holds it)."""
    return self.action == "average"

  @property
  def copied(self) -> bool:
    """The update takes it from online (a skip holds it with a select)."""
    return self.action == "copy"

  @property
  def written_back(self) -> bool:
    """``track_ema``'s write-back moves the param to it."""
    return self.action == "average"

  @property
  def measured(self) -> bool:
    """``drift`` measures it."""
    return self.action == "average"


Predicate = Callable[[LeafPlan], bool]

STORED: Predicate = lambda lp: lp.stored  # noqa: E731
CHECKED: Predicate = lambda lp: lp.checked  # noqa: E731
BLENDED: Predicate = lambda lp: lp.blended  # noqa: E731
COPIED: Predicate = lambda lp: lp.copied  # noqa: E731
WRITTEN_BACK: Predicate = lambda lp: lp.written_back  # noqa: E731
MEASURED: Predicate = lambda lp: lp.measured  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Plan:
  """The :class:`LeafPlan` of every leaf of the params, in
  ``jax.tree.leaves`` order, and the params' treedef.

  Trees "of the params" have the params' structure; "stored" trees are what
  the target holds (``None`` at the excluded leaves, which ``jax.tree``
  flattens to nothing), so their leaves are the stored leaves, in order.
  """

  leaves: tuple[LeafPlan, ...]
  treedef: Any
  memory_kinds: tuple  # one per target, as each leaf's

  @property
  def offloaded(self) -> bool:
    """Some target lives outside device memory."""
    return any(k is not None for k in self.memory_kinds)

  @property
  def stored_leaves(self) -> tuple[LeafPlan, ...]:
    return tuple(lp for lp in self.leaves if lp.stored)

  @property
  def actions(self) -> list[str]:
    """The action of every stored leaf (what the kernel's blend reads)."""
    return [lp.action for lp in self.stored_leaves]

  @property
  def excludes(self) -> bool:
    return any(not lp.stored for lp in self.leaves)

  def flags(self, keep: Predicate) -> list[bool]:
    """``keep`` of every stored leaf."""
    return [keep(lp) for lp in self.stored_leaves]

  def shardings(self) -> list[Any] | None:
    """The own layout of every stored leaf; None if none has one."""
    out = [lp.sharding for lp in self.stored_leaves]
    return out if any(s is not None for s in out) else None

  def select(self, tree: PyTree, keep: Predicate) -> PyTree:
    """A tree of the params with ``None`` where ``keep`` is False."""
    leaves = self.treedef.flatten_up_to(tree)
    return jax.tree.unflatten(
      self.treedef,
      [x if keep(lp) else None for x, lp in zip(leaves, self.leaves)],
    )

  def strip(self, tree: PyTree) -> PyTree:
    """What the target stores of a tree of the params (``None`` at the
    excluded leaves)."""
    return self.select(tree, STORED)

  def select_stored(self, tree: PyTree, keep: Predicate) -> PyTree:
    """A stored tree with ``None`` where ``keep`` is False."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
      treedef,
      [x if keep(lp) else None for x, lp in zip(leaves, self.stored_leaves)],
    )

  def check(self, target: PyTree, online: PyTree) -> None:
    """:func:`jepa_ema._kernel.check_trees` of a target against the stored
    view of the online params, with a hint when the policy excludes
    leaves."""
    _check(target, online, self.excludes)


def _check(target: PyTree, online: PyTree, excludes: bool) -> None:
  try:
    _kernel.check_trees(target, online)
  except ValueError as e:
    if not excludes:
      raise
    raise ValueError(
      f"{e}\n  With a policy that excludes leaves the target holds None in "
      "their place (build it with ema(..., policy=...).init(params), or "
      "jax.tree.map over the params with None for the excluded leaves)."
    ) from None


def _stored_dtype(x: Any, action: str, dtype: Any) -> Any:
  if action == "exclude" or not _kernel.is_array_like(x):
    return None
  if (
    action == "average" and dtype is not None and _kernel.is_real_float_leaf(x)
  ):
    return dtype  # dtype= applies to averaged real floating leaves only
  return _kernel.leaf_dtype(x)


def make_plan(
  options: PlanOptions, params: PyTree, target: PyTree = None
) -> Plan:
  """The plan of ``params`` under ``options``.

  The policy and ``target_sharding`` are resolved against ``params``. Which
  leaves are floating (blended) and their stored dtypes are read from
  ``target`` where it is given (a stored target: the state an update
  reads, as the dtype rule reads it), else from ``params`` with ``dtype=``
  applied (a new target).

  Raises:
    ValueError: for a policy or ``target_sharding`` that does not fit the
      params (naming the key path); with ``target``, a target whose
      structure or leaf shapes differ from the params' stored view.
    TypeError: with ``target``, leaf dtypes the target cannot keep.
  """
  actions = _policy.resolve(options.policy, params)
  flat, treedef = jax.tree.flatten(params)
  layouts = _placement.resolve(options.target_sharding, params)
  shardings = layouts if layouts is not None else (None,) * len(flat)
  kinds = tuple(options.memory_kinds)
  held = None
  if target is not None:
    online = jax.tree.unflatten(
      treedef, [None if a == "exclude" else x for x, a in zip(flat, actions)]
    )
    _check(target, online, "exclude" in actions)
    held = iter(jax.tree.leaves(target))
  leaves = []
  for x, action, sharding in zip(flat, actions, shardings):
    if action == "exclude":
      leaves.append(LeafPlan("exclude", None, None, kinds))
      continue
    # The leaf as the target holds it (a new target: the param).
    own = x if held is None else next(held)
    if action == "average" and not _kernel.is_float_leaf(own):
      action = "copy"  # the EMA rule copies what it cannot blend
    if held is None:
      dtype = _stored_dtype(x, action, options.dtype)
    else:
      dtype = _kernel.leaf_dtype(own) if _kernel.is_array_like(own) else None
    leaves.append(LeafPlan(action, dtype, sharding, kinds))
  return Plan(tuple(leaves), treedef, kinds)
