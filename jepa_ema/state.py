"""The EMA's state and its readers: :class:`EmaState`, :func:`get_target`, :func:`state_shardings`.

:func:`jepa_ema.ema` and :func:`jepa_ema.track_ema` keep an
:class:`EmaState` ``(step, target, skipped, drift, key)`` (a tuple of them for
several momenta), anywhere inside an optax state. :func:`get_target` finds it
and reads the target (with ``online=``: the teacher's complete weights, laid
out and placed like the params); :func:`state_shardings` gives its layout,
for a jitted ``init`` or a sharded checkpoint restore.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jepa_ema import _kernel, _plan
from jepa_ema import placement as _placement
from jepa_ema import policy as _policy

__all__ = ["EmaState", "get_target", "state_shardings"]

PyTree = _kernel.PyTree


class EmaState(NamedTuple):
  """State of :func:`ema` and :func:`track_ema`; a pytree that checkpoints.

  Attributes:
    step: int32 scalar, the number of updates so far (saturating). The next
      update uses momentum ``schedule(step)``.
    target: the EMA target pytree (the structure of the params; floating
      leaves in the ``dtype`` the transformation was built with).
    skipped: int32 scalar, how many updates (``every=k``: windows) dropped
      something: a non-finite momentum from the schedule under ``jit``
      (counted as 1, always), or params holding NaN/Inf (the whole update,
      only with ``skip_nonfinite=True``). 0 in a healthy run.
    drift: with ``drift=True`` (or ``drift=N``), ``{"global": x,
      "per_module": {name: x}}``: float32 scalars ``||target - params|| /
      ||params||`` after the last update that computed them (every update,
      or every N-th), over all floating leaves and per top-level entry of the
      params tree. ``None`` otherwise.
    key: with ``rounding="stochastic"``, the uint32 PRNG key data the
      rounding noise is derived from (with the step). ``None`` otherwise.
  """

  step: jax.Array
  target: PyTree
  skipped: jax.Array
  drift: Any = None
  key: Any = None


def find_states(tree: Any) -> list[tuple[str, EmaState]]:
  """The EmaStates anywhere in ``tree`` (an optax state, a tuple of them,
  one EmaState), with their key paths, in ``jax.tree`` order."""
  is_state = lambda x: isinstance(x, EmaState)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state)
  return [
    (jax.tree_util.keystr(p) or "<root>", x) for p, x in leaves if is_state(x)
  ]


def get_target(
  opt_state: Any, index: int | None = None, *, online: PyTree = None
) -> PyTree:
  """Returns the EMA target held anywhere inside a (nested) optax state.

  Works on the state of ``optax.chain``, ``optax.MultiSteps``,
  ``optax.inject_hyperparams``, ``optax.multi_transform`` ... and on an
  :class:`EmaState` itself. An EMA with several momenta
  (``ema((m1, m2))``) holds a tuple of EmaStates: ``index`` picks one.

  Args:
    opt_state: an optimizer state containing :class:`EmaState` s.
    index: which EmaState, counted in the order ``jax.tree`` flattens
      ``opt_state`` (for a several-momenta EMA: the position of the momentum).
      Required when there is more than one; negative values count from the
      end.
    online: optional; the online params. The result is then the teacher's
      weights, laid out and placed like ``online``: the leaves a ``policy``
      excluded (``None`` in the target) are taken from it, and the leaves
      stored in their own layout (``target_sharding=``) or memory
      (``memory_kind=``) are brought to the online leaf's sharding and
      memory kind, each keeping its dtype. That costs an all-gather per
      leaf sharded finer than its param (ZeRO-style) and a host-to-device
      copy per offloaded leaf, on every call (the stored state is not
      changed); leaves already laid out like their param cost nothing.
      Eagerly (``jax.device_put``) and inside ``jit``: there, on Explicit
      mesh axes, ``jax.sharding.reshard`` to the online leaf's layout (so a
      data-parallel forward pass of the teacher type-checks); on Auto axes
      XLA chooses the layout and inserts the all-gather where it is needed.

  Returns:
    The target pytree (with ``online``: a complete tree like ``online``).

  Raises:
    ValueError: if there is no :class:`EmaState` in ``opt_state``, or more
      than one and no ``index`` (the message lists their paths), or ``index``
      is out of range.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jepa_ema
    >>> tx = optax.chain(optax.adam(1e-3), jepa_ema.track_ema(0.99))
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(jepa_ema.get_target(state)["w"])
    [1. 1.]
    >>> states = jepa_ema.ema((0.99, 0.999)).init({"w": jnp.ones(2)})
    >>> print(jepa_ema.get_target(states, 1)["w"])
    [1. 1.]
  """
  found = find_states(opt_state)
  if not found:
    raise ValueError(
      f"No EmaState found in the given optimizer state (of type "
      f"{type(opt_state).__name__}). Add `jepa_ema.track_ema(...)` as the "
      "last element of your `optax.chain(...)`."
    )
  if index is None:
    if len(found) > 1:
      paths = ", ".join(p for p, _ in found)
      raise ValueError(
        f"Found {len(found)} EmaStates in the optimizer state, at {paths}; "
        "pass `index` (get_target(state, i)) to pick one."
      )
    return _filled(found[0][1].target, online)
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
    raise TypeError(f"`index` must be an int, got {index!r}.")
  if not -len(found) <= index < len(found):
    raise ValueError(
      f"`index` {index} is out of range: the state holds {len(found)} "
      f"EmaState(s), at {', '.join(p for p, _ in found)}."
    )
  return _filled(found[index][1].target, online)


def _filled(target: PyTree, online: PyTree) -> PyTree:
  """The teacher's weights: excluded leaves from ``online``, the stored ones
  laid out and placed like their ``online`` leaf."""
  if online is None:
    return target
  return _placement.like(_policy.fill(target, online), online)


def _is_concrete(x: Any) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _carried(leaf: Any, computed: Any, meshes: set) -> Any:
  """The layout an abstract target leaf carries (``jax.eval_shape`` keeps it
  on Explicit mesh axes) on its concrete mesh, else ``computed``.

  The memory kind is ``computed``'s unless the leaf carries one other than
  the device's: an abstract state does not always say.
  """
  own = getattr(leaf, "sharding", None)
  if _is_concrete(leaf):
    return own
  if not isinstance(own, jax.sharding.NamedSharding):
    return computed
  mesh = own.mesh
  if not isinstance(mesh, jax.sharding.Mesh):
    matches = [m for m in meshes if m.abstract_mesh == mesh]
    if len(matches) != 1:
      return computed
    (mesh,) = matches
  kind = own.memory_kind
  if kind in (None, "device") and computed is not None:
    kind = computed.memory_kind
  carried = jax.sharding.NamedSharding(mesh, own.spec, memory_kind=kind)
  if (
    computed is not None
    and computed.memory_kind == carried.memory_kind
    and computed.is_equivalent_to(carried, len(leaf.shape))
  ):
    return computed  # the same layout, as the params spell it
  return carried


def _sharding_of(x: Any) -> Any:
  if isinstance(x, jax.sharding.Sharding):
    return x
  return getattr(x, "sharding", None)


def state_shardings(
  params: PyTree,
  state: Any = None,
  *,
  target_sharding: _placement.TargetSharding = None,
  memory_kind: _placement.MemoryKind = None,
) -> Any:
  """The shardings of the :class:`EmaState` of ``params``.

  By default the target inherits each parameter's sharding (the update is
  elementwise, so it then needs no communication); ``step``, ``skipped`` and
  the small ``drift`` / ``key`` fields are replicated on the same mesh. Use
  it as ``out_shardings`` of a jitted ``init``, or to build the abstract
  state for a sharded checkpoint restore::

      shardings = jepa_ema.state_shardings(params)
      state = jax.jit(ema.init, out_shardings=shardings)(params)

  For an EMA built with options (``drift``, ``rounding="stochastic"``,
  several momenta, ``policy``), pass the state's structure too, e.g.
  ``state_shardings(params, jax.eval_shape(ema.init, params))``.

  It never reports a layout other than the state's, where the state says:

  * a ``state`` of concrete arrays is read as it is: every leaf's own
    sharding, memory kind included;
  * an abstract state whose target leaves carry shardings (what
    ``jax.eval_shape`` gives on **Explicit** mesh axes) gives those
    layouts, on the params' concrete mesh;
  * where the state carries no layout (``jax.eval_shape`` on **Auto** mesh
    axes drops shardings, and memory kinds on either kind of axes), it
    cannot know: the target then gets the params' shardings, changed by the
    ``target_sharding`` and ``memory_kind`` you pass, which must be those
    the EMA was built with. :meth:`EmaTransformation.state_shardings`
    (``ema(...).state_shardings(params)``) knows them: prefer it for a
    state built by :func:`ema`; pass the keywords for :func:`track_ema`'s
    state inside an optax state.

  Args:
    params: a pytree of arrays, ``jax.ShapeDtypeStruct`` s with shardings, or
      ``jax.sharding.Sharding`` s (e.g. the ``out_shardings`` of your params).
      Leaves without a sharding map to ``None`` (unspecified).
    state: optional; an EmaState, a tuple of them, or any pytree holding
      them (arrays or ``ShapeDtypeStruct`` s), whose structure is returned.
    target_sharding: the ``target_sharding=`` the EMA was built with.
    memory_kind: the ``memory_kind=`` the EMA was built with (a tuple: one
      per EmaState of ``state``, in its order).

  Returns:
    An :class:`EmaState` (or ``state``'s structure) whose leaves are
    shardings.

  Raises:
    ValueError: if ``params`` holds no sharding, ``state`` no EmaState, or
      ``target_sharding`` / ``memory_kind`` do not fit (as for :func:`ema`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jepa_ema
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    >>> params = {"w": jax.device_put(jnp.zeros(4), sh)}
    >>> shardings = jepa_ema.state_shardings(params)
    >>> shardings.target["w"] == sh, shardings.step.spec
    (True, P())
    >>> host = jepa_ema.state_shardings(params, memory_kind="pinned_host")
    >>> host.target["w"].memory_kind
    'pinned_host'
  """
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  target = jax.tree.map(_sharding_of, params, is_leaf=is_sharding)
  found = [
    s for s in jax.tree.leaves(target, is_leaf=is_sharding) if is_sharding(s)
  ]
  if not found:
    raise ValueError(
      "state_shardings: `params` has no leaf with a sharding (got leaves "
      f"of types {sorted({type(x).__name__ for x in jax.tree.leaves(params)})}"
      "); pass arrays, ShapeDtypeStructs with shardings, or shardings."
    )
  first = found[0]
  if isinstance(first, jax.sharding.NamedSharding):
    scalar: Any = jax.sharding.NamedSharding(
      first.mesh, jax.sharding.PartitionSpec()
    )
  else:
    devices = sorted(first.device_set, key=lambda d: d.id)
    scalar = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), ("_replica",)),
      jax.sharding.PartitionSpec(),
    )
  if target_sharding is not None:
    _placement.check_target_sharding(target_sharding)
    plan = _plan.make_plan(
      _plan.LeafOptions(target_sharding=target_sharding), params
    )
    leaves = plan.treedef.flatten_up_to(target)
    target = jax.tree.unflatten(
      plan.treedef,
      [
        p if lp.sharding is None else lp.sharding
        for p, lp in zip(leaves, plan.leaves)
      ],
    )
  n = 1 if state is None else max(len(find_states(state)), 1)
  kinds = _placement.check_memory_kinds(memory_kind, n, True)

  def in_memory(tree: Any, kind: str | None) -> Any:
    if kind is None:
      return tree
    return jax.tree.map(lambda s: s.with_memory_kind(kind), tree)

  if state is None:
    return EmaState(
      step=scalar, target=in_memory(target, kinds[0]), skipped=scalar
    )
  if not find_states(state):
    raise ValueError(
      f"state_shardings: `state` holds no EmaState (got "
      f"{type(state).__name__})."
    )
  is_state = lambda x: isinstance(x, EmaState)
  counter = iter(kinds)

  meshes = {
    s.mesh
    for s in found
    if isinstance(s, jax.sharding.NamedSharding)
    and isinstance(s.mesh, jax.sharding.Mesh)
  }

  def one(x: Any) -> Any:
    if not is_state(x):
      return x.sharding if _is_concrete(x) else scalar
    kind = next(counter)
    if all(_is_concrete(v) for v in jax.tree.leaves(x)):
      return jax.tree.map(lambda v: v.sharding, x)  # the state as it is
    # None where a policy excluded a leaf, as in the state's target.
    stored = jax.tree.map(
      lambda t, sh: None if t is None else sh,
      x.target,
      target,
      is_leaf=lambda v: v is None or is_sharding(v),
    )
    stored = jax.tree.map(
      lambda t, sh: _carried(t, sh, meshes),
      x.target,
      in_memory(stored, kind),
    )
    return EmaState(
      step=scalar,
      target=stored,
      skipped=scalar,
      drift=jax.tree.map(lambda _: scalar, x.drift),
      key=None if x.key is None else scalar,
    )

  return jax.tree.map(one, state, is_leaf=is_state)
