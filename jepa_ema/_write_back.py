"""``track_ema``'s write-back (internal): ``write_back_every=``, ``write_back_momentum=``.

On the target's updates ``N-1, 2N-1, ...`` (:func:`due`) the updates
``track_ema`` returns also move the params to ``w * params + (1 - w) *
target`` on the leaves the plan writes back (the averaged floating ones,
:mod:`jepa_ema._plan`): ema-pytorch's ``update_model_with_ema_every``, and
Switch EMA with ``w = 0``. The options are checked in
:mod:`jepa_ema._options`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jepa_ema import _every, _kernel, _plan

__all__ = ["due", "write_back_updates"]

PyTree = _kernel.PyTree


def due(before: Any, after: Any, every: int, interval: int) -> Any:
  """Whether the call that took the first EmaState from ``before`` to
  ``after`` writes back: counted in target updates, as ``drift=N`` is
  (never on an idle call of ``every=k``: the target would be stale), and
  not on an update counted in ``skipped`` (the params were refused)."""
  return (
    _every.is_update_step(before.step, every)
    & ((before.step // every) % interval == interval - 1)
    & (after.skipped == before.skipped)
  )


def write_back_updates(
  plan: _plan.Plan,
  params: PyTree,
  post: PyTree,
  target: PyTree,
  updates: PyTree,
  w: float,
) -> PyTree:
  """Updates that move ``params`` to ``w * post + (1 - w) * target`` on the
  leaves ``plan`` (the plan of ``post``) writes back; the others keep
  ``updates``."""
  held = iter(jax.tree.leaves(target))
  new = []
  for p, lp in zip(plan.treedef.flatten_up_to(post), plan.leaves):
    t = next(held) if lp.stored else None
    if lp.written_back:
      new.append(_kernel.blend_leaf(p, t, jnp.float32(w)))
    else:
      new.append(None)  # not written back: the step's own update
  new_tree = jax.tree.unflatten(plan.treedef, new)
  return jax.tree.map(
    lambda n, p, u: u if n is None else (n - p).astype(jnp.asarray(u).dtype),
    new_tree,
    params,
    updates,
    is_leaf=lambda x: x is None,
  )
