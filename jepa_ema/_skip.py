"""The ``skip_nonfinite`` option's check: are the params finite? (internal).

:func:`all_finite` reads the leaves that enter the target (the plan's
``checked`` leaves, :mod:`jepa_ema._plan`) once, as one reduction per leaf
and, on Explicit mesh axes, a single scalar all-reduce. What a skip then
holds (the momentum 1, the copied leaves, the drift) is the update's
(:mod:`jepa_ema.transform`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jepa_ema import _kernel

__all__ = ["all_finite"]

PyTree = _kernel.PyTree


def _finite(x: Any) -> jax.Array:
  """Whether every element of the floating leaf ``x`` is finite (a bool).

  ``x - x`` is 0 where ``x`` is finite and NaN where it is NaN or +-Inf (XLA
  folds it to 0 for floats only under fast math), and the sum of those is 0
  or NaN: additions propagate NaN, also when XLA adds the partial sums of a
  sharded leaf across devices. A maximum is not safe there (XLA:CPU's max
  all-reduce drops a NaN), nor is a comparison with Inf (float8_e4m3fn has
  none). XLA fuses the difference into the reduction: no temporary the size
  of the leaf, as ``all(isfinite(x))`` makes (and ``x * 0`` on CPU, whose
  zeros it materialises).
  """
  return jnp.sum(x - x) == 0


def _local_all_finite(leaves: Sequence[Any]) -> jax.Array:
  return jnp.stack([_finite(x) for x in leaves]).all()


def _explicit_mesh(leaves: Sequence[Any]) -> Any:
  """The mesh all ``leaves`` are laid out on, if its axes are all Explicit.

  None otherwise: leaves on no mesh, on several, on auto or manual axes (the
  layout is then unknown at trace time), or with unreduced / reduced axes.
  """
  meshes = set()
  for x in leaves:
    found = _kernel.mesh_and_spec(x)
    if found is None:
      return None
    mesh, spec = found
    if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
      return None
    meshes.add(mesh)
  if len(meshes) != 1:
    return None
  (mesh,) = meshes
  explicit = jax.sharding.AxisType.Explicit
  return mesh if all(t == explicit for t in mesh.axis_types) else None


def all_finite(tree: PyTree) -> jax.Array:
  """Whether every floating leaf of ``tree`` is finite (a scalar bool).

  On explicit mesh axes it costs one scalar all-reduce, however many leaves:
  each device checks its own shards of every leaf (a ``shard_map``: no data
  moves) and one ``pmin`` of the combined flag crosses devices. Otherwise
  (auto axes: the layouts are chosen after tracing) XLA partitions each
  leaf's reduction by itself: one scalar all-reduce per sharded dimension of
  the leaf, merged across leaves where the device groups and their order
  allow (3 for the five leaves of tests/scripts/sharded_ema.py on a 4 x 2
  mesh).
  """
  leaves = [
    x
    for x in jax.tree.leaves(tree)
    if _kernel.is_float_leaf(x) and jnp.size(x) > 0
  ]
  if not leaves:
    return jnp.array(True)
  mesh = _explicit_mesh(leaves)
  if mesh is None:
    return _local_all_finite(leaves)

  def check(*shards: jax.Array) -> jax.Array:
    local = _local_all_finite(shards).astype(jnp.int32)
    return jax.lax.pmin(local, mesh.axis_names) > 0

  return jax.shard_map(
    check,
    mesh=mesh,
    in_specs=tuple(jax.typeof(x).sharding.spec for x in leaves),
    out_specs=jax.sharding.PartitionSpec(),
  )(*leaves)
