"""Target layout and placement: ``target_sharding=`` and ``memory_kind=``.

An EMA is a second copy of the model, and at scale that copy is what users
pay for. Two keywords of :func:`jepa_ema.ema` and :func:`jepa_ema.track_ema`
choose where the target lives, whatever the params' layout:

* ``target_sharding=``: a :class:`jax.sharding.Sharding`, a pytree prefix of
  the params whose leaves are shardings (``None``: that subtree keeps the
  params' layout), or a callable ``params -> such a prefix``. E.g. a target
  sharded over the data axis while the params are replicated (ZeRO-style):
  each device stores and updates 1/n of the target, and the update needs no
  communication, because each device's slice of the target lies inside the
  param it already holds. Inside the update the *online* value is resharded
  into the target's layout (``jax.sharding.reshard`` on Explicit mesh axes,
  ``jax.lax.with_sharding_constraint`` otherwise) before the elementwise
  blend, so the values are bitwise those of the same EMA without the option.
  A coarser target (sharded params, replicated target) works too, at the
  price of an all-gather of each param on every update.
* ``memory_kind=``: ``"pinned_host"`` keeps the target's leaves in host
  memory, each keeping its sharding otherwise; the blend runs on the device,
  and the transfers (host to device before it, back after) are part of the
  same compiled program (MaxText's offload pattern). ``None`` or
  ``"device"``: device memory. With several momenta, a tuple gives one
  memory kind per target.

:func:`sharded_over` is a ready ``target_sharding=`` for the ZeRO-style
layout. The helpers below the public names are the package's: they validate
the two options (:mod:`jepa_ema._options`), resolve a layout per leaf (the
plan, :mod:`jepa_ema._plan`, composes it with the policy), lay a tree out and
move it between memories (the update, :mod:`jepa_ema.transform`), and place
the teacher's weights like the params (:func:`jepa_ema.get_target`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import numpy as np

from jepa_ema import _kernel

# The public names. The helpers below them (check_memory_kinds,
# check_target_sharding, resolve, like, place, reshard, to_device, to_memory,
# tie, OFFLOAD_KINDS) are the package's: importable, not part of the API.
__all__ = ["TargetSharding", "MemoryKind", "sharded_over", "ShardedOver"]

PyTree = Any

TargetSharding = Union[
  None, jax.sharding.Sharding, PyTree, Callable[[PyTree], PyTree]
]
"""What ``target_sharding=`` accepts."""

MemoryKind = Union[None, str, Sequence[Union[str, None]]]
"""What ``memory_kind=`` accepts."""

OFFLOAD_KINDS = {"pinned_host": jax.memory.Space.Host}
"""The memory kinds a target can be offloaded to, and the memory space a
transfer inside ``jit`` names. ``"unpinned_host"`` (which XLA:CPU and GPU
list) is not one: in JAX 0.10.2 the type of an array carries no such space,
so a transfer to it inside ``jit`` is dropped (the result lands in device
memory) and a donated ``unpinned_host`` buffer aborts the process."""


def _is_sharding(x: Any) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def _available_kinds() -> list[str]:
  device = jax.local_devices()[0]
  return sorted({m.kind for m in device.addressable_memories()})


def check_memory_kinds(memory_kind: Any, n: int, several: bool) -> tuple:
  """``memory_kind=`` validated: one entry per target (``None``: device).

  Raises:
    ValueError: for a memory kind the local devices do not have (naming it
      and listing theirs), one a target cannot live in under ``jit``
      (``"unpinned_host"``), or a tuple whose length is not the number of
      momenta.
    TypeError: for anything but None, a string or a tuple of them.
  """
  if memory_kind is None:
    return (None,) * n
  if isinstance(memory_kind, (tuple, list)):
    if not several or len(memory_kind) != n:
      what = f"{n} momenta" if several else "one momentum"
      raise ValueError(
        f"`memory_kind` is a sequence of {len(memory_kind)} memory kinds, "
        f"but the EMA has {what}: give one string for every target, or "
        "with several momenta a tuple with one per momentum."
      )
    kinds = tuple(memory_kind)
  else:
    kinds = (memory_kind,) * n
  out: list[str | None] = []
  for kind in kinds:
    if kind is not None and not isinstance(kind, str):
      raise TypeError(
        f"`memory_kind` must be None, a memory kind such as 'pinned_host', "
        f"or a tuple of them, got {kind!r}."
      )
    if kind is None or kind == "device":
      out.append(None)
      continue
    available = _available_kinds()
    if kind not in available:
      raise ValueError(
        f"`memory_kind` {kind!r} is not a memory of this device "
        f"({jax.local_devices()[0].device_kind}); it has "
        f"{', '.join(repr(k) for k in available)}."
      )
    if kind not in OFFLOAD_KINDS:
      raise ValueError(
        f"`memory_kind` {kind!r} cannot hold a target: inside jit, JAX "
        "0.10.2 can place an array in 'device' or 'pinned_host' memory only "
        "(a transfer to it would be dropped); use 'pinned_host'."
      )
    out.append(kind)
  return tuple(out)


def check_target_sharding(spec: Any) -> None:
  """What can be checked of ``target_sharding=`` without the params."""
  if spec is None or callable(spec) and not _is_sharding(spec):
    return
  for path, leaf in _flatten(spec):
    _check_one(leaf, jax.tree_util.keystr(path) or "<root>")


def _flatten(spec: Any) -> list[tuple[Any, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(
    spec, is_leaf=lambda x: x is None or _is_sharding(x)
  )
  return leaves


def _check_one(leaf: Any, where: str) -> None:
  if leaf is None:
    return
  if not _is_sharding(leaf):
    raise TypeError(
      f"`target_sharding` must hold jax.sharding.Sharding s (or None: the "
      f"params' own layout), got {type(leaf).__name__} {leaf!r} at {where}."
    )
  kind = leaf.memory_kind
  if kind is not None and kind != "device":
    raise ValueError(
      f"`target_sharding` at {where} has memory kind {kind!r}; give the "
      f"layout only, and the memory as memory_kind={kind!r}."
    )


def _device_ids(sharding: Any) -> list[int]:
  return sorted(d.id for d in sharding.device_set)


def resolve(spec: TargetSharding, params: PyTree) -> tuple | None:
  """One sharding (or None: the params' layout) per leaf of ``params``.

  ``None`` for ``target_sharding=None``. Every sharding is checked against
  its leaf: it must divide the leaf's shape, and lie on the devices of a
  concrete param.

  Args:
    spec: what ``target_sharding=`` was given.
    params: the params (arrays, tracers or ``ShapeDtypeStruct`` s).

  Returns:
    A tuple with one sharding (or None) per leaf of ``params``, in leaf
    order; None for ``spec=None``.

  Raises:
    ValueError: naming the key path from the params' root, for a prefix
      that does not fit the params, a sharding that does not divide a leaf
      (or has more dimensions), or one on other devices than the param.
    TypeError: for a leaf of the prefix that is not a Sharding.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"enc": {"w": jnp.ones((4, 2))}, "head": jnp.ones(3)}
    >>> by_data = NamedSharding(mesh, P("data"))
    >>> out = resolve({"enc": by_data, "head": None}, params)
    >>> [s if s is None else s.spec for s in out]
    [P('data',), None]
    >>> two_dims = NamedSharding(mesh, P("data", None))
    >>> resolve({"enc": None, "head": two_dims}, params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... at ['head']: its spec has 2 entries, the param has shape (3,).
  """
  if spec is None:
    return None
  prefix = spec(params) if callable(spec) and not _is_sharding(spec) else spec
  check_target_sharding(prefix)
  is_leaf = lambda x: x is None or _is_sharding(x)
  prefix_def: Any = jax.tree.structure(prefix, is_leaf=is_leaf)
  try:
    subtrees = prefix_def.flatten_up_to(params)
  except (ValueError, TypeError):
    why = _kernel.prefix_mismatch(_flatten(prefix), params, "it")
    raise ValueError(
      f"`target_sharding` does not fit the params: {why}"
      f".\n  target_sharding structure: {str(prefix_def)[:300]}"
      f"\n  params structure: {str(jax.tree.structure(params))[:300]}"
    ) from None
  out: list[Any] = []
  for (at, sharding), sub in zip(_flatten(prefix), subtrees):
    for path, x in jax.tree_util.tree_flatten_with_path(sub)[0]:
      if sharding is not None:
        # The key path from the params' root: the prefix's, then the leaf's.
        _check_fits(sharding, x, tuple(at) + tuple(path))
      out.append(sharding)
  return tuple(out)


def _check_fits(sharding: Any, x: Any, path: Any) -> None:
  where = jax.tree_util.keystr(path) or "the params (a single leaf)"
  if _is_sharding(x):  # state_shardings of shardings: no shape to check
    if set(x.device_set) != set(sharding.device_set):
      raise ValueError(
        f"`target_sharding` at {where} lies on devices "
        f"{_device_ids(sharding)}, the param on devices {_device_ids(x)}; "
        "the target must live on the params' devices."
      )
    return
  shape = np.shape(x)
  spec = getattr(sharding, "spec", None)
  if spec is not None and len(spec) > len(shape):
    raise ValueError(
      f"`target_sharding` {sharding} does not fit the param at {where}: its "
      f"spec has {len(spec)} entries, the param has shape {shape}."
    )
  try:
    sharding.shard_shape(shape)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
      f"`target_sharding` {sharding} does not divide the param at {where} "
      f"(shape {shape}): {e}"
    ) from None
  own: Any = getattr(x, "sharding", None)
  if isinstance(x, jax.core.Tracer) or not _is_sharding(own):
    return
  if set(own.device_set) != set(sharding.device_set):
    raise ValueError(
      f"`target_sharding` at {where} lies on devices {_device_ids(sharding)}"
      f", the param on devices {_device_ids(own)}; the target must live on "
      "the params' devices."
    )


def _explicit(sharding: Any) -> bool:
  mesh = getattr(sharding, "mesh", None)
  types = getattr(mesh, "axis_types", ())
  return bool(types) and all(t == jax.sharding.AxisType.Explicit for t in types)


def _lay_out(x: Any, sharding: Any) -> Any:
  """``x`` in ``sharding``'s layout (its memory unchanged)."""
  if not isinstance(x, jax.Array):
    return x
  if not isinstance(x, jax.core.Tracer):
    return jax.device_put(x, sharding.with_memory_kind(x.sharding.memory_kind))
  if _explicit(sharding):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _map(tree: PyTree, leaves: Sequence[Any], fn: Callable[..., Any]) -> PyTree:
  flat, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [fn(x, s) for x, s in zip(flat, leaves)])


def reshard(tree: PyTree, shardings: Sequence[Any] | None) -> PyTree:
  """``tree`` (one leaf per sharding) laid out in those shardings; leaves
  with ``None`` as they are. Where each device's slice of the new layout is
  inside its piece of the old one, this is a local slice: no collective."""
  if shardings is None:
    return tree
  return _map(tree, shardings, lambda x, s: x if s is None else _lay_out(x, s))


def _space(x: Any, space: Any) -> Any:
  if not isinstance(x, jax.Array):
    return x
  if getattr(jax.typeof(x), "memory_space", None) == space:
    return x  # already there: no transfer, not even an annotation
  return jax.device_put(x, space)


def to_device(tree: PyTree) -> PyTree:
  """``tree``'s arrays moved to device memory (each keeps its layout)."""
  return jax.tree.map(lambda x: _space(x, jax.memory.Space.Device), tree)


def to_memory(tree: PyTree, kind: str | None) -> PyTree:
  """``tree``'s arrays moved to memory ``kind`` (None: left as they are).

  A no-op (no instruction) for arrays already there."""
  if kind is None:
    return tree
  return jax.tree.map(lambda x: _space(x, OFFLOAD_KINDS[kind]), tree)


def place(
  tree: PyTree, shardings: Sequence[Any] | None, kind: str | None
) -> PyTree:
  """A new target laid out in ``shardings`` and put in memory ``kind``."""
  return to_memory(reshard(tree, shardings), kind)


def _tie_leaf(new: Any, old: Any) -> Any:
  if not (isinstance(new, jax.Array) and isinstance(old, jax.Array)):
    return new
  if new.shape != old.shape or new.dtype != old.dtype:
    return new
  return jax.lax.select(jax.numpy.full(new.shape, True), new, old)


def tie(new: PyTree, old: PyTree) -> PyTree:
  """``new``, reading ``old`` (a select on a constant ``True``).

  An offloaded target leaf the update does not read (a non-floating leaf or
  a ``"copy"`` one, both replaced by the online value) would be an unused
  donated input: ``jax.jit`` drops it, and its pairing of donated inputs
  with outputs by shape and dtype alone (JAX 0.10.2) can then alias a
  device buffer to a ``pinned_host`` output, which aborts the process. The
  select keeps the input alive until XLA folds it away (no instruction
  remains), after the aliases are set.
  """
  return jax.tree.map(_tie_leaf, new, old)


# ------------------------------------------------------------ sharded_over


def _axis_names(axis: Any) -> tuple[str, ...]:
  names = (axis,) if isinstance(axis, str) else axis
  if (
    not isinstance(names, tuple)
    or not names
    or not all(isinstance(a, str) for a in names)
  ):
    raise TypeError(
      f"`axis` must be a mesh axis name or a non-empty tuple of them, got "
      f"{axis!r}."
    )
  if len(set(names)) != len(names):
    raise ValueError(f"`axis` names an axis twice: {axis!r}.")
  return names


def _check_axes_in(names: tuple[str, ...], mesh: Any, where: str) -> None:
  missing = [a for a in names if a not in mesh.axis_names]
  if missing:
    raise ValueError(
      f"sharded_over: the mesh {where}has no axis {missing[0]!r}; its axes "
      f"are {tuple(mesh.axis_names)}."
    )


def _own_layout(x: Any) -> tuple[Any, tuple | None, bool]:
  """``(mesh, spec, known)`` of a param leaf: its mesh (None: none), its
  PartitionSpec padded to its rank, and whether that spec is known (a
  traced leaf on Auto mesh axes carries no layout)."""
  ndim = len(np.shape(x))
  if isinstance(x, jax.core.Tracer):
    found = _kernel.mesh_and_spec(x)
    if found is None:
      return None, None, False
    mesh, spec = found
    known = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    return mesh, tuple(spec) + (None,) * (ndim - len(spec)), known
  own = getattr(x, "sharding", None)
  if isinstance(own, jax.sharding.NamedSharding):
    spec = tuple(own.spec)
    return own.mesh, spec + (None,) * (ndim - len(spec)), True
  return None, (None,) * ndim, own is not None or not hasattr(x, "shape")


def _uses(entry: Any, names: tuple[str, ...]) -> bool:
  if entry is None:
    return False
  used = entry if isinstance(entry, tuple) else (entry,)
  return any(a in used for a in names)


@dataclasses.dataclass(frozen=True)
class ShardedOver:
  """A ZeRO-style ``target_sharding=``. Built by :func:`sharded_over`."""

  axis: str | tuple[str, ...]
  mesh: Any = None
  # The specs computed from concrete params, per (key path, shape, dtype):
  # on Auto mesh axes a traced param carries no layout, and the target must
  # keep the one it was created in.
  _seen: dict = dataclasses.field(
    default_factory=dict, compare=False, hash=False, repr=False
  )

  def __post_init__(self) -> None:
    names = _axis_names(self.axis)
    if self.mesh is not None:
      if not isinstance(self.mesh, jax.sharding.Mesh):
        raise TypeError(
          f"`mesh` must be a jax.sharding.Mesh or None, got {self.mesh!r}."
        )
      _check_axes_in(names, self.mesh, "given ")

  def __call__(self, params: PyTree) -> PyTree:
    names = _axis_names(self.axis)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(
      treedef, [self._one(path, x, names) for path, x in flat]
    )

  def _one(self, path: Any, x: Any, names: tuple[str, ...]) -> Any:
    where = jax.tree_util.keystr(path) or "<root>"
    if _is_sharding(x):
      raise TypeError(
        f"sharded_over needs the params' shapes; got a Sharding at {where}: "
        "pass arrays or jax.ShapeDtypeStruct s."
      )
    if not hasattr(x, "shape"):
      return None  # a Python scalar or None: nothing to lay out
    shape = tuple(np.shape(x))
    own_mesh, spec, known = _own_layout(x)
    key = (where, shape, str(getattr(x, "dtype", "")))
    mesh = self.mesh if self.mesh is not None else own_mesh
    if mesh is None:
      return None  # on no mesh (one device): the param's own layout
    if own_mesh is not None and self.mesh is not None:
      own_names = tuple(own_mesh.axis_names)
      if own_names != tuple(self.mesh.axis_names):
        spec = (None,) * len(shape)  # another mesh: its layout does not carry
    _check_axes_in(names, mesh, f"of the param at {where} ")
    if not known:
      spec = self._seen.get(key, (None,) * len(shape))
    size = int(
      np.prod([dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in names])
    )
    assert spec is not None
    if any(_uses(e, names) for e in spec):
      new = spec  # already over the axis: the param's layout
    else:
      new = spec
      for i, (n, e) in enumerate(zip(shape, spec)):
        if e is None and n % size == 0 and n > 0:
          new = (
            spec[:i] + (names[0] if len(names) == 1 else names,) + spec[i + 1 :]
          )
          break
    if known:
      self._seen[key] = new
    if new == spec and known and own_mesh is mesh:
      return None  # unchanged: the param's own layout
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*new))


def sharded_over(
  axis: str | tuple[str, ...], *, mesh: Any = None
) -> ShardedOver:
  """A ready ``target_sharding=`` for a ZeRO-style target: sharded over ``axis``.

  For each param leaf, a ``NamedSharding`` on ``mesh`` (default: the mesh of
  the params' own shardings) that adds ``axis`` to the first dimension that
  is not yet partitioned and whose size the axis size divides, keeping the
  param's other partitioned dimensions. A leaf already partitioned over
  ``axis``, or with no such dimension (a bias of size 10 on 8 devices, a
  scalar), keeps its param's layout. With replicated params on 8
  data-parallel devices, every leaf with a dimension divisible by 8 then
  costs 1/8 of its memory per device, and the update still moves no data
  (each device's slice of the target lies inside the param it holds).

  A leaf whose params are on no mesh (one device, no ``mesh=``) keeps its
  layout. Inside ``jit`` on **Auto** mesh axes a param carries no layout in
  its type: the callable then uses the layout it computed for the same leaf
  (key path, shape, dtype) from concrete params, at an eager ``init`` or in
  ``ema.state_shardings(params)``, and treats a leaf it has not seen as
  unpartitioned (right for replicated params). On Explicit axes the layout
  is in the types, under ``jit`` too.

  Args:
    axis: a mesh axis name (e.g. ``"data"``), or a tuple of them (the
      dimension is then split over their product).
    mesh: the ``jax.sharding.Mesh`` to lay the target out on; default: each
      param's own mesh.

  Returns:
    A frozen, hashable callable ``params -> prefix of shardings`` for
    ``target_sharding=`` of :func:`jepa_ema.ema` / :func:`jepa_ema.track_ema`.

  Raises:
    TypeError: for an ``axis`` that is not a name or a tuple of names, or a
      ``mesh`` that is not a Mesh; when called, for params given as
      shardings (it needs their shapes).
    ValueError: for an axis the mesh does not have (naming the leaf when the
      mesh is the param's).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jepa_ema
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P())),
    ...           "b": jax.device_put(jnp.ones(()), NamedSharding(mesh, P()))}
    >>> layout = jepa_ema.sharded_over("data")(params)
    >>> layout["w"].spec, layout["b"]
    (P('data', None), None)
    >>> ema = jepa_ema.ema(0.99, target_sharding=jepa_ema.sharded_over("data"))
    >>> ema.init(params).target["w"].sharding.spec
    P('data', None)
  """
  return ShardedOver(axis if isinstance(axis, str) else tuple(axis), mesh)


# --------------------------------------------------------------- like


def _like_leaf(t: Any, o: Any) -> Any:
  if t is o or not isinstance(t, jax.Array) or not isinstance(o, jax.Array):
    return t
  traced = isinstance(t, jax.core.Tracer) or isinstance(o, jax.core.Tracer)
  if not traced:
    own, want = t.sharding, o.sharding
    if own.memory_kind == want.memory_kind and own.is_equivalent_to(
      want, t.ndim
    ):
      return t
    return jax.device_put(t, want)
  space = getattr(jax.typeof(o), "memory_space", None)
  if space is not None:
    t = _space(t, space)  # offloaded leaves to the online leaf's memory
  spec = _kernel.explicit_spec(o)
  if spec is not None and _kernel.explicit_spec(t) != spec:
    mesh = jax.typeof(o).sharding.mesh
    t = jax.sharding.reshard(
      t, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    )
  return t


def like(tree: PyTree, reference: PyTree) -> PyTree:
  """``tree``'s arrays laid out and placed like ``reference``'s, leaf by leaf.

  Eagerly each leaf takes its reference leaf's sharding and memory kind
  (``jax.device_put``: an all-gather for a sharded leaf with a replicated
  reference, a host-to-device copy for an offloaded one); under ``jit`` it
  takes the reference's memory space and, on Explicit mesh axes, its layout
  (``jax.sharding.reshard``); on Auto axes XLA chooses the layout. Dtypes
  are kept. ``tree`` must have ``reference``'s structure.
  """
  return jax.tree.map(_like_leaf, tree, reference)
