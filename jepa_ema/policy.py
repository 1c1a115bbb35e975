"""Per-leaf policy: what the target does with each leaf of the params.

Real models are not plain parameter trees: batch-norm statistics, frozen or
LoRA-base weights, parts shared between the online and target networks, RNG
counters. ``policy=`` (of :func:`jepa_ema.ema`, :func:`jepa_ema.track_ema`,
:func:`jepa_ema.ema_update` and :func:`jepa_ema.make_ema_update`) says per
leaf what the target does:

* ``"average"``: the EMA rule (non-floating leaves are copied, as by
  default);
* ``"copy"``: the target takes the online value at every update (batch-norm
  statistics taken from the online network, a shared embedding);
* ``"keep"``: the target keeps the value it was initialised with;
* ``"exclude"``: the target stores nothing for the leaf (``None`` in its
  place, no memory): frozen base weights under LoRA, shared tables.
  :func:`jepa_ema.get_target` with ``online=`` fills them back in.

A policy is ``None`` (every leaf averaged: the default rule), one action for
every leaf, a pytree **prefix** of the params whose leaves are actions (as
``optax.masked`` takes a mask), or a callable ``params -> such a prefix``
(it may look at NNX ``Variable`` types, Equinox filters, key paths: see
:func:`policy_by_path`). It is resolved against the params' structure when
the state is initialised and when an update is traced, so under ``jit`` it
costs nothing per step; a callable is called with the params (tracers under
``jit``) and must depend on their structure and leaf types only.

:func:`fill` completes a stored target with the online leaves. :func:`resolve`
(one action per leaf) is the package's: the per-leaf plan
(:mod:`jepa_ema._plan`) composes it with the other per-leaf decisions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax

from jepa_ema import _checks, _kernel

# The public names (fill is documented in docs/api.md). ``resolve`` is the
# package's: importable, not part of the API.
__all__ = ["ACTIONS", "Policy", "policy_by_path", "fill"]

PyTree = Any

ACTIONS = _checks.ACTIONS
"""The per-leaf actions, in the order the docs list them."""

Policy = Union[None, str, PyTree, Callable[[PyTree], PyTree]]
"""What every ``policy=`` argument accepts."""


def _check_action(action: Any, where: str) -> str:
  return _checks.check_action(action, f"at {where}")


def policy_by_path(
  rules: Mapping[str, str] | Sequence[tuple[str, str]],
  default: str = "average",
) -> Callable[[PyTree], PyTree]:
  r"""A policy that picks each leaf's action by its key path.

  Each rule is a ``(regex, action)`` pair, matched with :func:`re.search`
  against ``jax.tree_util.keystr(path)`` (e.g. ``"['encoder']['bn']['mean']"``);
  the first match wins, and leaves no rule matches get ``default``.

  Args:
    rules: a mapping ``regex -> action`` (in its order) or a sequence of
      ``(regex, action)`` pairs.
    default: the action of every leaf no rule matches.

  Returns:
    A callable policy ``params -> tree of actions``.

  Raises:
    ValueError: for an unknown action or a regex that does not compile,
      naming it.
    TypeError: if ``rules`` is not a mapping or a sequence of pairs.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jepa_ema
    >>> params = {"base": {"w": jnp.ones(2)}, "lora": {"a": jnp.zeros(2)},
    ...           "bn": {"mean": jnp.zeros(2)}}
    >>> policy = jepa_ema.policy_by_path(
    ...   [(r"\['base'\]", "exclude"), (r"\['bn'\]", "copy")])
    >>> policy(params)
    {'base': {'w': 'exclude'}, 'bn': {'mean': 'copy'}, 'lora': {'a': 'average'}}
  """
  if isinstance(rules, Mapping):
    pairs: Iterable[Any] = list(rules.items())
  elif isinstance(rules, (list, tuple)):
    pairs = rules
  else:
    raise TypeError(
      "`rules` must be a mapping regex -> action or a sequence of "
      f"(regex, action) pairs, got {type(rules).__name__}."
    )
  compiled = []
  for i, pair in enumerate(pairs):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise TypeError(
        f"rule #{i} must be a (regex, action) pair, got {pair!r}."
      )
    pattern, action = pair
    _check_action(action, f"rule #{i} ({pattern!r})")
    try:
      compiled.append((re.compile(pattern), action))
    except (re.error, TypeError) as e:
      raise ValueError(f"rule #{i}: cannot compile {pattern!r}: {e}.") from None
  _check_action(default, "`default`")

  def policy(params: PyTree) -> PyTree:
    def pick(path: Any, _: Any) -> str:
      key = jax.tree_util.keystr(path)
      for pattern, action in compiled:
        if pattern.search(key):
          return action
      return default

    return jax.tree_util.tree_map_with_path(pick, params)

  return policy


def resolve(policy: Policy, params: PyTree) -> tuple[str, ...]:
  """One action per leaf of ``params`` (``jax.tree.leaves`` order).

  ``policy=None`` is the default rule, ``"average"`` for every leaf (the EMA
  rule: floating leaves blended, the others copied).

  Raises:
    ValueError: for an unknown action, naming its key path, or a prefix that
      does not fit the params, naming the first key path that does not.
  """
  n = len(jax.tree.leaves(params))
  if policy is None:
    return ("average",) * n
  if isinstance(policy, str):
    return (_check_action(policy, "<every leaf>"),) * n
  leaves = jax.tree.leaves(policy)
  is_tree = bool(leaves) and all(isinstance(a, str) for a in leaves)
  # A callable pytree of actions (an Equinox module spec) is a prefix.
  prefix = policy(params) if callable(policy) and not is_tree else policy
  for path, action in jax.tree_util.tree_flatten_with_path(prefix)[0]:
    _check_action(action, jax.tree_util.keystr(path) or "<root>")
  prefix_def: Any = jax.tree.structure(prefix)
  try:
    subtrees = prefix_def.flatten_up_to(params)
  except (ValueError, TypeError):
    flat = jax.tree_util.tree_flatten_with_path(prefix)[0]
    why = _kernel.prefix_mismatch(flat, params, "the policy")
    raise ValueError(
      f"the policy does not fit the params: {why}"
      f".\n  policy structure: {str(prefix_def)[:300]}"
      f"\n  params structure: {str(jax.tree.structure(params))[:300]}"
    ) from None
  actions: list[str] = []
  for action, sub in zip(jax.tree.leaves(prefix), subtrees):
    actions += [action] * len(jax.tree.leaves(sub))
  assert len(actions) == n
  return tuple(actions)


def fill(target: PyTree, online: PyTree) -> PyTree:
  """``target`` with its ``None`` places (excluded leaves) taken from
  ``online``: a complete tree for the teacher's forward pass.

  Raises:
    ValueError: if ``online`` does not have the target's structure where the
      target stores something.
  """
  try:
    return jax.tree.map(
      lambda t, o: o if t is None else t,
      target,
      online,
      is_leaf=lambda x: x is None,
    )
  except ValueError as e:
    raise ValueError(
      "`online` must be the params tree the target was built from (the "
      f"target's structure, with subtrees where it holds None): {e}"
    ) from None
