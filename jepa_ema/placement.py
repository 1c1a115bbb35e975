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

The helpers below the public type aliases are the package's:
:mod:`jepa_ema.transform` calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import numpy as np

from jepa_ema import _kernel

__all__ = [
  "TargetSharding",
  "MemoryKind",
  "OFFLOAD_KINDS",
  "check_memory_kinds",
  "check_target_sharding",
  "resolve",
  "stored",
  "place",
  "reshard",
  "to_device",
  "to_memory",
  "tie",
]

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


def stored(
  shardings: Sequence[Any] | None, actions: Sequence[str] | None
) -> list[Any] | None:
  """The shardings of the stored leaves (a policy's excluded ones dropped)."""
  if shardings is None:
    return None
  if actions is None:
    return list(shardings)
  return [s for s, a in zip(shardings, actions) if a != "exclude"]


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
