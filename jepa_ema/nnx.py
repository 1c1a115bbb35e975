"""Flax NNX face: :class:`EMA`, a drop-in superset of ``flax.nnx.EMA``.

``jepa_ema.nnx.EMA(model, momentum)`` keeps the EMA of an NNX model's
Variables as an NNX graph node, so ``nnx.jit`` carries its updates (and
donates them, in place) like those of any module. Against
``flax.nnx.EMA(model, decay)`` it adds what this library exists for:

* a **schedule** for the momentum (``momentum`` = flax's ``decay``, the weight
  on the old value), read from a stored step, so a resumed run continues
  bit-identically, and every option of :func:`jepa_ema.ema` (``dtype``,
  ``every``, ``skip_nonfinite``, ``drift``, ``rounding``, ``target_sharding``,
  ``memory_kind``);
* **defaults that work on real models**: every Variable is tracked, floating
  ones averaged and the rest (RNG keys and counts) copied, so a model with
  ``nnx.Dropout(rngs=...)`` works (``flax.nnx.EMA(model, decay)`` raises on
  the key dtype there);
* a ``policy=`` over Variable types or paths, for batch-norm statistics and
  LoRA (see :class:`EMA`).

This module imports flax; ``import jepa_ema`` does not import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

import jepa_ema
from jepa_ema import _checks
from jepa_ema.schedules import MomentumLike

__all__ = ["EMA", "NnxPolicy"]

M = TypeVar("M")

NnxPolicy = Any
"""What ``policy=`` of :class:`EMA` accepts: None (the default rule), one
action for every Variable, a mapping ``{Variable type or nnx filter:
action}``, or a callable ``(path, variable) -> action`` (None: the default
rule)."""

_PLACEMENT = ("target_sharding", "memory_kind")


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _where(path: tuple, var: Any) -> str:
  at = "/".join(str(k) for k in path) or "<root>"
  return f"for the {type(var).__name__} at '{at}'"


def _action_rule(policy: NnxPolicy) -> Callable[[tuple, Any], str]:
  """``policy`` as a function ``(path, variable) -> action``."""
  if policy is None:
    return lambda path, var: "average"
  if isinstance(policy, str):
    _checks.check_action(policy, "for every Variable")
    return lambda path, var: policy
  if isinstance(policy, Mapping):
    by_type: dict[type, str] = {}
    filters: list[tuple[Callable[..., bool], str]] = []
    for key, action in policy.items():
      _checks.check_action(action, f"for the policy key {key!r}")
      if isinstance(key, type):
        by_type[key] = action
      else:
        try:
          filters.append((nnx.filterlib.to_predicate(key), action))
        except TypeError as e:
          raise TypeError(
            f"policy key {key!r} is neither a Variable type nor an nnx "
            f"filter: {e}"
          ) from None

    def rule(path: tuple, var: Any) -> str:
      for predicate, action in filters:  # filters first, in their order
        if predicate(path, var):
          return action
      for cls in type(var).__mro__:  # then the most specific type
        if cls in by_type:
          return by_type[cls]
      return "average"

    return rule
  if callable(policy):

    def call(path: tuple, var: Any) -> str:
      action = policy(path, var)
      return "average" if action is None else action

    return call
  raise TypeError(
    "`policy` must be None, an action, a mapping {Variable type or nnx "
    "filter: action} or a callable (path, variable) -> action, got "
    f"{type(policy).__name__}."
  )


def _like(x: Any, online: Any) -> Any:
  """``x`` in the layout and memory of the concrete array ``online``
  (eagerly; traced values as :func:`jepa_ema.get_target` left them)."""
  if isinstance(x, jax.core.Tracer) or not isinstance(online, jax.Array):
    return x
  if isinstance(online, jax.core.Tracer) or x.sharding == online.sharding:
    return x
  return jax.device_put(x, online.sharding)


def _at(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


class EMA(nnx.Pytree):
  """The EMA of an NNX model's Variables: an NNX graph node.

  A drop-in superset of ``flax.nnx.EMA(model, decay, only=...)``:
  ``momentum`` is flax's ``decay`` (the weight on the old value), and also
  takes a schedule (:func:`jepa_ema.cosine_momentum`, ...) read from a stored
  step. ``update`` and ``apply_to`` work as flax's, eagerly and inside
  ``nnx.jit``; donate the EMA there (``nnx.jit(step, donate_argnums=...)``)
  and its target is updated in place.

  What is tracked: every ``nnx.Variable`` that ``only`` selects and whose
  ``policy`` action is not ``"exclude"`` (the others are not stored: no
  memory). The default rule averages the floating Variables and copies the
  others (RNG keys and counts), so a model with ``nnx.Dropout(rngs=...)``
  works. ``policy=`` decides per Variable:

  * a mapping ``{Variable type or nnx filter: action}``: nnx filters that are
    not types (``nnx.PathContains("head")``, ...) are tried first, in their
    order; then the **most specific** type in the Variable's MRO wins, so
    ``{nnx.LoRAParam: "average", nnx.Param: "exclude"}`` averages the LoRA
    factors (``LoRAParam`` subclasses ``Param``) and stores nothing of the
    frozen base; Variables no key matches get the default rule;
  * a callable ``(path, variable) -> action`` (None: the default rule);
  * one action for every Variable.

  The actions are those of :mod:`jepa_ema.policy`: ``"average"``,
  ``"copy"`` (the online value at every update), ``"keep"`` (the initial
  value), ``"exclude"``. For a DINO / BYOL teacher that recomputes its own
  batch-norm statistics, exclude them (``{nnx.BatchStat: "exclude"}``) and
  keep the teacher's statistics in a teacher module of its own:
  ``teacher = ema.apply_to(nnx.clone(model, arrays=True))``, run in train mode.

  The tracked Variables live in ``params`` (an ``nnx.State`` of Variables of
  the model's types, as in flax); the other fields of the
  :class:`~jepa_ema.EmaState` in ``step``, ``skipped``, ``drift`` and
  ``key`` (arrays, or None for an option that is off). ``nnx.state(ema)`` is therefore
  the whole EMA, for checkpoints: save it with the model's state and restore
  it with ``nnx.update(ema, restored)``.

  Args:
    model: the online model (any NNX graph node). Its Variables are copied.
    momentum: a schedule (any callable ``step -> momentum``) or a number in
      ``[0, 1]``: the weight on the old value.
    only: an nnx filter of the Variables to track (default ``...``: all).
    policy: what the EMA does per Variable (see above; default None: floating
      Variables averaged, the others copied).
    graph: as in ``flax.nnx.EMA``: graph mode (True), tree mode (False) or
      the current ``nnx.set_graph_mode`` (None).
    **options: every keyword of :func:`jepa_ema.ema` but ``policy``
      (``dtype``, ``skip_nonfinite``, ``every``, ``drift``, ``rounding``,
      ``key``, ``target_sharding``, ``memory_kind``).

  Raises:
    TypeError: for several momenta (a tuple: make one EMA each), a
      ``policy`` of another kind, and from :func:`jepa_ema.ema` for its
      options.
    ValueError: if no Variable is tracked, for an unknown action (naming the
      Variable's path and type), and from :func:`jepa_ema.ema`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jepa_ema, jepa_ema.nnx
    >>> model = nnx.Sequential(
    ...   nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
    ...   nnx.Dropout(0.5, rngs=nnx.Rngs(1)),  # RNG state: copied
    ... )
    >>> ema = jepa_ema.nnx.EMA(
    ...   model, jepa_ema.linear_momentum(0.5, 1.0, total_steps=4))
    >>> teacher = ema.apply_to(model)  # a live view, as flax's
    >>> model.layers[0].bias[...] = jnp.ones(2)
    >>> ema.update(model)
    >>> print(teacher.layers[0].bias[...], ema.momentum())
    [0.5 0.5] 0.5

    Inside ``nnx.jit``, with the EMA donated (updated in place):

    >>> @nnx.jit(donate_argnums=1)
    ... def step(model, ema):
    ...   ema.update(model)
    >>> step(model, ema)
    >>> print(teacher.layers[0].bias[...], ema.momentum())  # 1 - 0.5 * 0.625
    [0.6875 0.6875] 0.625
  """

  def __init__(
    self,
    model: Any,
    momentum: MomentumLike,
    *,
    only: Any = ...,
    policy: NnxPolicy = None,
    graph: bool | None = None,
    **options: Any,
  ) -> None:
    if isinstance(momentum, (tuple, list)):
      raise TypeError(
        "jepa_ema.nnx.EMA keeps one target; for several momenta make one "
        f"EMA per momentum (got {momentum!r})."
      )
    rule = _action_rule(policy)
    tracked = nnx.filterlib.to_predicate(only)

    def stored(path: tuple, x: Any) -> bool:
      return (
        _is_variable(x)
        and tracked(path, x)
        and _checks.check_action(rule(path, x), _where(path, x)) != "exclude"
      )

    state = nnx.state(model, stored, graph=graph)
    flat = list(nnx.to_flat_state(state))
    if not flat:
      raise ValueError(
        f"jepa_ema.nnx.EMA: no Variable of the {type(model).__name__} is "
        f"tracked (only={only!r}, policy={policy!r})."
      )
    actions = {path: rule(path, var) for path, var in flat}
    tree_policy = None
    if any(a != "average" for a in actions.values()):
      tree_policy = nnx.to_pure_dict(nnx.from_flat_state(actions))
    self._graph = graph
    self._stored = stored
    self._placed = any(options.get(k) is not None for k in _PLACEMENT)
    self._tx = jepa_ema.ema(momentum, policy=tree_policy, **options)
    first = self._tx.init(nnx.to_pure_dict(state))
    self.params = nnx.data(
      nnx.from_flat_state(
        [(path, var.replace(_at(first.target, path))) for path, var in flat]
      )
    )
    self._set_counters(first)

  def _set_counters(self, state: jepa_ema.EmaState) -> None:
    # Attributes of their own (not one EmaState): nnx.update can set them.
    self.step = nnx.data(state.step)
    self.skipped = nnx.data(state.skipped)
    self.drift = nnx.data(state.drift)
    self.key = nnx.data(state.key)

  def _online(self, model: Any) -> dict:
    return nnx.to_pure_dict(nnx.state(model, self._stored, graph=self._graph))

  @property
  def state(self) -> jepa_ema.EmaState:
    """The :class:`~jepa_ema.EmaState`: ``step``, ``target`` (a nested dict
    of the tracked Variables' values, ``nnx.to_pure_dict``'s layout),
    ``skipped``, ``drift``, ``key``."""
    return jepa_ema.EmaState(
      step=self.step,
      target=nnx.to_pure_dict(self.params),
      skipped=self.skipped,
      drift=self.drift,
      key=self.key,
    )

  def update(self, model: Any) -> None:
    """One EMA step towards ``model``'s Variables (eager or under ``nnx.jit``).

    The momentum is the schedule's at the stored step; the step then counts
    one more update. Every option of :func:`jepa_ema.ema` applies.

    Args:
      model: a model of the structure the EMA was built from.

    Raises:
      ValueError: if ``model``'s tracked Variables do not have the
        structure and shapes of the EMA's (from :func:`jepa_ema.ema`).
    """
    online = self._online(model)
    new = self._tx.update(online, self.state)
    for path, var in nnx.to_flat_state(self.params):
      value = _at(new.target, path)
      if value is _at(online, path) and not isinstance(value, jax.core.Tracer):
        value = jnp.array(value, copy=True)  # eager copy: never alias
      var.set_value(value)
    self._set_counters(new)

  def apply_to(self, model: M) -> M:
    """A model of ``model``'s structure holding the EMA's values.

    As ``flax.nnx.EMA.apply_to``: the tracked Variables are the EMA's own
    (the result is a live view: later updates show in it, also those made
    under ``nnx.jit``), the others are ``model``'s Variables themselves
    (shared: a train-mode call of the result updates them, so pass a
    teacher of its own, ``ema.apply_to(nnx.clone(model, arrays=True))``, where the
    teacher keeps its own batch statistics). Works inside ``nnx.jit``.

    With ``target_sharding=`` or ``memory_kind=`` the result holds a copy of
    the target in the layout and memory of ``model``'s Variables
    (:func:`jepa_ema.get_target` with ``online=``), taken now: call it again
    after an update.

    Args:
      model: a model of the structure the EMA was built from.

    Returns:
      A new model of ``model``'s type.
    """
    graphdef, state = nnx.split(model, graph=self._graph)
    params = self.params
    if self._placed:
      online = self._online(model)
      target = jepa_ema.get_target(self.state, online=online)
      params = nnx.from_flat_state(
        [
          (path, var.replace(_like(_at(target, path), _at(online, path))))
          for path, var in nnx.to_flat_state(self.params)
        ]
      )
    return nnx.merge(graphdef, nnx.merge_state(state, params))

  def momentum(self) -> jax.Array:
    """The momentum of the last update (a float32 scalar), for logging.

    Raises:
      ValueError: before the first update.
    """
    return self._tx.momentum(self.state)
