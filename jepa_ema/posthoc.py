"""Post-hoc EMA: choose the averaging profile after training (EDM2).

During training, :func:`jepa_ema.ema` tracks two (or more) power-function EMAs
(:func:`jepa_ema.power_momentum`) and :class:`PostHocSnapshots` saves their
targets every ``S`` steps. After training, :func:`posthoc_reconstruct` returns
the EMA of any other width ``sigma_rel`` (at any saved step) as a weighted sum
of the snapshots, with the weights of :func:`posthoc_coefficients`, the least
squares fit of EDM2's Algorithm 3.

For a JEPA, the *training* target must stay a true EMA (it feeds the loss; a
power EMA at step 0 is a copy of the online encoder). Post-hoc EMA is for the
encoder you evaluate or ship: the context encoder's, or the target's, average.

The weights are host-side float64 NumPy; the weighted sum is elementwise JAX
(it keeps every leaf's sharding) and streams: one snapshot is loaded at a
time. Disk cost: ``number of snapshots x model size`` (in the storage dtype).

References:
  Karras et al., *Analyzing and Improving the Training Dynamics of Diffusion
  Models* (EDM2), arXiv:2312.02696, appendix C.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jepa_ema import _checks, _kernel
from jepa_ema import schedules as _schedules
from jepa_ema import transform as _transform
from jepa_ema.state import EmaState

__all__ = [
  "posthoc_coefficients",
  "posthoc_reconstruct",
  "PostHocSnapshots",
  "SnapshotError",
]

PyTree = Any
Snapshot = tuple[int, float, Union[PyTree, Callable[[], PyTree]]]
"""``(step, sigma_rel, target)``; ``target`` may be a zero-argument loader."""


class SnapshotError(ValueError):
  """A snapshot directory that is damaged, incomplete or mixed up."""


# ------------------------------------------------------------------ weights


def _p_dot_p(
  t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray
) -> np.ndarray:
  """Inner products of power-function profiles (EDM2, appendix C.3):
  ``int_0^inf p_a(tau) p_b(tau) dtau`` with ``p(tau) = (g+1) tau^g / t^(g+1)``
  on ``[0, t]``."""
  ratio = t_a / t_b
  exponent = np.where(t_a < t_b, g_b, -g_a)
  num = (g_a + 1.0) * (g_b + 1.0) * ratio**exponent
  return num / ((g_a + g_b + 1.0) * np.maximum(t_a, t_b))


def _as_vector(name: str, values: Any) -> np.ndarray:
  try:
    v = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(
      f"`{name}` must be a sequence of numbers, got {values!r}."
    ) from None
  if v.ndim != 1:
    raise ValueError(f"`{name}` must be one-dimensional, got shape {v.shape}.")
  if not np.all(np.isfinite(v)):
    raise ValueError(f"`{name}` must be finite, got {values!r}.")
  return v


def posthoc_coefficients(
  steps: Sequence[int],
  sigma_rels: Sequence[float],
  *,
  sigma_rel: float,
  step: int | None = None,
) -> np.ndarray:
  r"""Weights that turn snapshots into the EMA of another profile (EDM2 Alg. 3).

  Snapshot ``i`` is a power-function EMA of width ``sigma_rels[i]`` saved
  when ``EmaState.step == steps[i]`` (it had seen ``steps[i]`` updates). The
  wanted EMA, of width ``sigma_rel`` at ``step``, is approximated by
  ``sum_i x[i] * snapshot_i`` with the ``x`` that minimises the L2 distance
  between the averaging profiles: ``A x = b`` with
  ``A[i, j] = <p_i, p_j>`` and ``b[i] = <p_i, p_wanted>``, then normalised to
  ``sum(x) = 1``.

  **Near-singular systems.** ``A`` is solved by least squares with NumPy's
  default cut-off of small singular values (``np.linalg.lstsq``), i.e. the
  minimum-norm solution: two identical snapshots (the same step and width)
  make ``A`` singular, and share the weight equally instead of getting
  huge weights of opposite signs.

  Args:
    steps: ``(n,)`` the step of each snapshot, each ``>= 1``.
    sigma_rels: ``(n,)`` the width of each snapshot's profile, each in
      ``(0, sqrt(1/12))``.
    sigma_rel: the wanted width, in ``(0, sqrt(1/12))``.
    step: the wanted step, in ``[1, max(steps)]``; default ``max(steps)``.

  Returns:
    float64 array of shape ``(n,)``, summing to 1.

  Raises:
    ValueError: for lengths that differ, an empty list, a step below 1 or
      beyond the last snapshot, or a width out of range (naming it).
    TypeError: for inputs that are not numbers.

  Examples:
    A profile that was saved is reconstructed as that snapshot:

    >>> import jepa_ema
    >>> x = jepa_ema.posthoc_coefficients(
    ...     [500, 1000, 500, 1000], [0.05, 0.05, 0.10, 0.10], sigma_rel=0.10)
    >>> print(" ".join(f"{v:.3f}" for v in x))
    0.000 -0.000 0.000 1.000
    >>> x = jepa_ema.posthoc_coefficients(
    ...     [500, 1000, 500, 1000], [0.05, 0.05, 0.10, 0.10], sigma_rel=0.07)
    >>> print(f"{x.sum():.6f}")
    1.000000

  References:
    Karras et al., EDM2, arXiv:2312.02696, appendix C.3 and Algorithm 3.
  """
  t = _as_vector("steps", steps)
  s = _as_vector("sigma_rels", sigma_rels)
  if t.size == 0:
    raise ValueError("`steps` is empty: give at least one snapshot.")
  if t.shape != s.shape:
    raise ValueError(
      f"`steps` and `sigma_rels` must have the same length, got "
      f"{t.size} and {s.size}."
    )
  if np.any(t < 1):
    raise ValueError(
      f"every snapshot step must be >= 1 (a snapshot at step 0 "
      f"is the initialisation, with no profile), got {steps!r}."
    )
  gammas = np.array([_schedules.sigma_rel_to_gamma(float(v)) for v in s])
  gamma = _schedules.sigma_rel_to_gamma(sigma_rel)
  last = float(t.max())
  if not (
    isinstance(step, (int, np.integer, float)) or step is None
  ) or isinstance(step, bool):
    raise TypeError(f"`step` must be an int, got {step!r}.")
  out_t = last if step is None else float(step)
  if not 1 <= out_t <= last:
    raise ValueError(
      f"`step` must be in [1, {last:g}] (the saved steps; a "
      f"profile beyond the last snapshot cannot be "
      f"reconstructed), got {step!r}."
    )
  a = _p_dot_p(t[:, None], gammas[:, None], t[None, :], gammas[None, :])
  b = _p_dot_p(t, gammas, np.float64(out_t), np.float64(gamma))
  x = np.linalg.lstsq(a, b, rcond=None)[0]
  return x / np.sum(x)


# ------------------------------------------------------------ reconstruction


def _is_float(x: Any) -> bool:
  """Averaged leaves: the EMA's floating (real or complex) array leaves.

  Unlike the EMA's rule, Python scalars are not averaged (they are static
  parts of a snapshot's tree).
  """
  return hasattr(x, "dtype") and _kernel.is_float_leaf(x)


def _is_real_float(x: Any) -> bool:
  """Leaves a storage ``dtype`` applies to (complex ones keep theirs)."""
  return hasattr(x, "dtype") and _kernel.is_real_float_leaf(x)


def _acc_dtype(dtype: Any) -> Any:
  """At least float32 (complex leaves: their own dtype)."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


@jax.jit
def _scaled(tree: PyTree, w: jax.Array) -> PyTree:
  return jax.tree.map(
    lambda x: x.astype(_acc_dtype(x.dtype)) * w.astype(_acc_dtype(x.dtype)),
    tree,
  )


@functools.partial(jax.jit, donate_argnums=0)  # the accumulator, in place
def _axpy(acc: PyTree, tree: PyTree, w: jax.Array) -> PyTree:
  return jax.tree.map(
    lambda a, x: a + x.astype(a.dtype) * w.astype(a.dtype), acc, tree
  )


def posthoc_reconstruct(
  snapshots: Iterable[Snapshot] | str | os.PathLike,
  *,
  sigma_rel: float,
  step: int | None = None,
) -> PyTree:
  """The EMA of width ``sigma_rel`` at ``step``, rebuilt from snapshots.

  Returns ``sum_i x_i * target_i`` with ``x = posthoc_coefficients(...)``.

  It streams: the metadata of every snapshot is read first, then each target
  is loaded once, added to the accumulator and released, so at most one
  snapshot and the accumulator are held at a time. For that, give targets as
  zero-argument loaders (a :class:`PostHocSnapshots` or its directory does);
  targets given as trees are used as they are.

  Floating leaves are accumulated in float32 (or the snapshot's dtype if
  wider) and returned in the snapshots' dtype; other leaves come from the
  last snapshot. The sum is elementwise, so each leaf keeps its sharding.

  Args:
    snapshots: an iterable of ``(step, sigma_rel, target)`` (``target`` a
      pytree or a loader returning one), a :class:`PostHocSnapshots`, or the
      path of a snapshot directory.
    sigma_rel: the wanted width, in ``(0, sqrt(1/12))``.
    step: the wanted step (default: the last snapshot's).

  Returns:
    The reconstructed target pytree.

  Raises:
    ValueError: for bad widths or steps (see :func:`posthoc_coefficients`),
      targets whose structures differ, or malformed entries.
    SnapshotError: for a damaged snapshot directory.

  Examples:
    >>> import jax.numpy as jnp, jepa_ema
    >>> snaps = [(100, 0.05, {"w": jnp.ones(3)}),
    ...          (100, 0.10, {"w": jnp.zeros(3)})]
    >>> out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.05)
    >>> print(out["w"])
    [1. 1. 1.]
  """
  if isinstance(snapshots, (str, os.PathLike)):
    snapshots = PostHocSnapshots(snapshots)
  items = list(snapshots)
  for i, item in enumerate(items):
    if not (isinstance(item, tuple) and len(item) == 3):
      raise ValueError(
        f"snapshot #{i} must be a (step, sigma_rel, target) "
        f"tuple, got {type(item).__name__}."
      )
  x = posthoc_coefficients(
    [it[0] for it in items],
    [it[1] for it in items],
    sigma_rel=sigma_rel,
    step=step,
  )
  acc = None
  structure = None
  out_dtypes: list[Any] = []
  others: list[Any] = []  # the last snapshot's non-floating leaves
  for i, ((s, r, target), w) in enumerate(zip(items, x)):
    tree = target() if callable(target) else target
    if structure is None:
      structure = jax.tree.structure(tree)
      out_dtypes = [
        getattr(leaf, "dtype", None) for leaf in jax.tree.leaves(tree)
      ]
    elif jax.tree.structure(tree) != structure:
      raise ValueError(
        f"snapshot #{i} (step {s}, sigma_rel {r}) has a different tree "
        f"structure from snapshot #0:\n  {jax.tree.structure(tree)}\n  vs "
        f"{structure}"
      )
    leaves = jax.tree.leaves(tree)
    del tree
    others = [None if _is_float(v) else v for v in leaves]
    floats = [v if _is_float(v) else None for v in leaves]
    del leaves
    wj = jnp.float32(w)
    acc = _scaled(floats, wj) if acc is None else _axpy(acc, floats, wj)
    del floats
    # Finish before loading the next one: async dispatch would otherwise
    # keep this snapshot's buffers alive while the next one loads.
    acc = jax.block_until_ready(acc)
  assert structure is not None
  acc_leaves = iter(jax.tree.leaves(acc))
  out = [
    next(acc_leaves).astype(dt) if other is None else other
    for other, dt in zip(others, out_dtypes)
  ]
  return jax.tree.unflatten(structure, out)


# ------------------------------------------------------------------- on disk

_CONFIG = "posthoc.json"
_META = "meta.json"
_NAME = re.compile(r"^(\d{10})-(\d{2})$")


class PostHocSnapshots:
  """Snapshots of several power-function EMAs on disk (orbax), for post hoc.

  Write side: build the matching EMA with :meth:`ema` (one
  :func:`~jepa_ema.power_momentum` per ``sigma_rel``, in order: the widths
  are stated once) and call :meth:`maybe_save` with its state after every
  update; every ``every`` steps it saves each target (cast to ``dtype``,
  e.g. ``jnp.float16`` as EDM2 does) with its step and width. An EMA built
  by hand is passed as ``maybe_save(state, ema)``: its momenta are checked
  against the widths before anything is saved, so the states of another
  EMA (a constant momentum, other widths, another order) are an error, never
  snapshots labelled with the wrong width.
  Read side: iterate for ``(step, sigma_rel, loader)``, or pass the object
  (or its directory) to :func:`posthoc_reconstruct`.

  A snapshot becomes visible only once complete (its metadata is written
  last, atomically); a snapshot left incomplete by a killed writer, a file
  that does not belong, or a directory written with other widths raises
  :class:`SnapshotError` naming the path: nothing is dropped silently.
  Needs ``orbax-checkpoint`` (an optional extra).

  Args:
    directory: where the snapshots live (created if missing).
    sigma_rels: the widths of the tracked EMAs, in the order of the state
      tuple; may be omitted to open an existing directory.
    every: save when ``state.step`` is a positive multiple of ``every``;
      may be omitted to open an existing directory.
    dtype: storage dtype of floating leaves (default: as tracked).

  Examples:
    >>> import tempfile, jax.numpy as jnp, jepa_ema
    >>> snaps = jepa_ema.PostHocSnapshots(tempfile.mkdtemp(), (0.05, 0.10), every=5)
    >>> ema = snaps.ema()  # power_momentum(sigma_rel=0.05), (sigma_rel=0.10)
    >>> params, state = {"w": jnp.zeros(2)}, ema.init({"w": jnp.zeros(2)})
    >>> for step in range(10):
    ...   params = {"w": params["w"] + 1.0}
    ...   state = ema.update(params, state)
    ...   _ = snaps.maybe_save(state)
    >>> print(len(snaps), [s for s, _, _ in snaps])
    4 [5, 5, 10, 10]
    >>> out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.10)
    >>> print(out["w"].round(2), state[1].target["w"].round(2))  # as tracked
    [9.32 9.32] [9.32 9.32]
    >>> other = jepa_ema.ema((0.99, 0.999))  # not the snapshots' widths
    >>> snaps.maybe_save(other.init(params), other)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the EMA's momentum 0 is not that of power_momentum(sigma_rel=0.05)...
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    sigma_rels: Sequence[float] | None = None,
    *,
    every: int | None = None,
    dtype: Any = None,
  ) -> None:
    self.directory = pathlib.Path(directory)
    config_path = self.directory / _CONFIG
    if config_path.exists():  # open: the arguments must agree with the disk
      self.sigma_rels, self.every, self.dtype = _read_config(config_path)
      given = {
        "sigma_rels": None
        if sigma_rels is None
        else tuple(float(v) for v in sigma_rels),
        "every": every,
        "dtype": None if dtype is None else jnp.dtype(dtype),
      }
      for name, now in given.items():
        before = getattr(self, name)
        if now is not None and now != before:
          raise SnapshotError(
            f"{self.directory} holds snapshots written with {name}="
            f"{_config_value(before)!r}, not {_config_value(now)!r}; use "
            "another directory."
          )
      return
    if sigma_rels is None or every is None:
      raise SnapshotError(
        f"{self.directory} holds no snapshots ({_CONFIG} is missing); "
        "give `sigma_rels` and `every` to start writing there."
      )
    self._init_config(sigma_rels, every, dtype)

  def _init_config(self, sigma_rels: Any, every: Any, dtype: Any) -> None:
    self.sigma_rels, self.every, self.dtype = _check_config(
      sigma_rels, every, dtype
    )
    self.directory.mkdir(parents=True, exist_ok=True)
    _write_json(
      self.directory / _CONFIG,
      {
        "sigma_rels": list(self.sigma_rels),
        "every": self.every,
        "dtype": _config_value(self.dtype),
      },
    )

  # -- write side

  def ema(self, **options: Any) -> _transform.EmaTransformation:
    """The EMA whose states these snapshots hold: one power-function EMA per
    ``sigma_rel``, in order, with any other option of :func:`jepa_ema.ema`
    (``every``, ``dtype``, ``memory_kind``, ``policy``, ...).

    :meth:`maybe_save` then needs no ``ema`` argument: it checks the states
    of this one.

    Args:
      **options: keywords of :func:`jepa_ema.ema` (not ``momentum``).

    Returns:
      ``jepa_ema.ema(tuple(power_momentum(sigma_rel=s) for s in
      sigma_rels), **options)``.
    """
    if "momentum" in options:
      raise TypeError(
        "PostHocSnapshots.ema() builds the momenta from its sigma_rels; "
        "give the other options of jepa_ema.ema only."
      )
    built = _transform.ema(
      tuple(_schedules.power_momentum(sigma_rel=s) for s in self.sigma_rels),
      **options,
    )
    self._ema = built
    return built

  def _states(self, state: Any) -> tuple[EmaState, ...]:
    states = (state,) if isinstance(state, EmaState) else tuple(state)
    if len(states) != len(self.sigma_rels) or not all(
      isinstance(s, EmaState) for s in states
    ):
      raise ValueError(
        f"expected a tuple of {len(self.sigma_rels)} EmaState (one per "
        f"sigma_rel {self.sigma_rels}), got {type(state).__name__} of "
        f"{len(states)}."
      )
    return states

  def maybe_save(
    self, state: EmaState | Sequence[EmaState], ema: Any = None
  ) -> bool:
    """Saves every target if ``state.step`` is a positive multiple of ``every``.

    At the first call with an EMA it checks that EMA's momenta against the
    widths: for its first ``len(sigma_rels)`` momenta, update ``t`` must
    apply ``power_momentum(sigma_rel=s)``'s momentum (with ``every=k``: the
    window's product on update steps, 1 in between), for every update
    before the first save (up to 4096 of them) to float32 rounding. The
    first update of a power EMA copies (momentum 0) and the next ones tell
    widths apart: a constant momentum, other widths or another order fail.

    Args:
      state: the EMA's state: one EmaState per ``sigma_rel``, in order.
      ema: the EMA (``jepa_ema.ema(...)`` or ``jepa_ema.track_ema(...)``:
        anything with ``momentum(step)``) that produced ``state``; default:
        the one built by :meth:`ema`. It may hold more momenta after the
        snapshots' ones (e.g. ground-truth widths): ``state`` is then the
        first ``len(sigma_rels)`` states.

    Returns:
      Whether snapshots were written (False if not due or already saved).

    Raises:
      TypeError: without ``ema`` when :meth:`ema` built none.
      ValueError: if the EMA's momenta are not those of the widths, or
        ``state`` does not hold one EmaState per width.
    """
    ema = ema if ema is not None else getattr(self, "_ema", None)
    if ema is None:
      raise TypeError(
        "maybe_save needs the EMA that produced the states, to check its "
        "momenta against the widths: build it with snaps.ema(...) (the "
        "widths stated once), or pass it: maybe_save(state, ema)."
      )
    checked = self.__dict__.setdefault("_checked", [])
    if not any(e is ema for e in checked):
      self._check_momenta(ema)
      checked.append(ema)
    states = self._states(state)
    step = int(states[0].step)
    if step < 1 or step % self.every:
      return False
    import orbax.checkpoint as ocp

    wrote = False
    for i, s in enumerate(states):
      path = self.directory / f"{step:010d}-{i:02d}"
      if (path / _META).exists():
        continue
      if path.exists():  # a previous writer died here: redo it
        shutil.rmtree(path)
      target = s.target
      if self.dtype is not None:
        target = jax.tree.map(
          lambda x: x.astype(self.dtype) if _is_real_float(x) else x, target
        )
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((path / "target").resolve(), target)
        ckptr.wait_until_finished()
      _write_json(
        path / _META,
        {"step": step, "sigma_rel": self.sigma_rels[i], "index": i},
      )
      wrote = True
    return wrote

  def _check_momenta(self, ema: Any) -> None:
    """Raises unless ``ema``'s first momenta are the widths' power EMAs."""
    if not callable(getattr(ema, "momentum", None)):
      raise TypeError(
        f"`ema` must be the EMA that produced the states (built by "
        f"jepa_ema.ema or jepa_ema.track_ema), got {type(ema).__name__}."
      )
    n = min(self.every, 4096)  # the updates before the first save
    steps = jnp.arange(n, dtype=jnp.int32)
    got = jax.jit(jax.vmap(ema.momentum))(steps)
    got = [got] if not isinstance(got, (tuple, list)) else list(got)
    if len(got) < len(self.sigma_rels):
      raise ValueError(
        f"the EMA has {len(got)} momenta, the snapshots "
        f"{len(self.sigma_rels)} widths {self.sigma_rels}; build it with "
        "snaps.ema(...)."
      )
    for i, sigma in enumerate(self.sigma_rels):
      m = np.asarray(got[i], np.float64)
      moves = np.flatnonzero(m != 1.0)
      k = int(moves[0]) + 1 if moves.size else n + 1  # every=k: k-1 moves
      want = _power_window_momenta(_schedules.sigma_rel_to_gamma(sigma), k, n)
      bad = np.abs(m - want) > 1e-6 + 1e-4 * (1.0 - want)
      if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise ValueError(
          f"the EMA's momentum {i} is not that of power_momentum(sigma_rel="
          f"{sigma}) (every={k}): update {t} applies {m[t]:.6g}, the width "
          f"{sigma} {want[t]:.6g}. Snapshots saved with it would be labelled "
          "with the wrong width; build the EMA with snaps.ema(...)."
        )

  # -- read side

  def _entries(self) -> list[tuple[int, float, pathlib.Path]]:
    if not self.directory.is_dir():
      raise SnapshotError(f"{self.directory} does not exist.")
    entries = []
    for path in sorted(self.directory.iterdir()):
      if path.name == _CONFIG:
        continue
      match = _NAME.match(path.name)
      if match is None or not path.is_dir():
        raise SnapshotError(
          f"{path} does not belong in a snapshot directory (expected "
          f"folders named STEP-INDEX and {_CONFIG}); move it away."
        )
      meta_path = path / _META
      if not meta_path.exists():
        raise SnapshotError(
          f"{path} is an incomplete snapshot (no {_META}: its writer was "
          "probably killed while saving). Remove it to use the others; the "
          "next maybe_save at that step rewrites it."
        )
      try:
        meta = json.loads(meta_path.read_text())
        step, sigma, index = (
          int(meta["step"]),
          float(meta["sigma_rel"]),
          int(meta["index"]),
        )
      except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{meta_path} is damaged ({e}).") from e
      if (
        (step, index) != (int(match[1]), int(match[2]))
        or not (0 <= index < len(self.sigma_rels))
        or not math.isclose(sigma, self.sigma_rels[index], rel_tol=0, abs_tol=0)
      ):
        raise SnapshotError(
          f"{meta_path} says step {step}, sigma_rel {sigma}, index {index}, "
          f"which does not match its folder name or the directory's "
          f"sigma_rels {self.sigma_rels}; the directory is mixed up."
        )
      entries.append((step, sigma, path / "target"))
    return entries

  def __len__(self) -> int:
    return len(self._entries())

  def __iter__(self) -> Iterator[tuple[int, float, Callable[[], PyTree]]]:
    """Yields ``(step, sigma_rel, loader)`` in step order; ``loader()``
    restores that target (raising :class:`SnapshotError` if it is damaged)."""
    for step, sigma, path in self._entries():
      yield step, sigma, _Loader(path)


def _power_window_momenta(gamma: float, k: int, n: int) -> np.ndarray:
  """The momenta of updates ``0 .. n-1`` of a power EMA with ``every=k``:
  ``((u + 1 - k) / (u + 1)) ** (gamma + 1)`` on updates ``k-1, 2k-1, ...``
  (the window's product telescopes), 1 in between."""
  u = np.arange(n, dtype=np.float64)
  acts = (u + 1) % k == 0
  ratio = np.maximum(u + 1 - k, 0.0) / (u + 1)
  return np.where(acts, ratio ** (gamma + 1.0), 1.0)


def _config_value(x: Any) -> Any:
  """A config entry as it is stored (a dtype by its name)."""
  return x.name if isinstance(x, np.dtype) else x


def _check_config(
  sigma_rels: Sequence[float], every: Any, dtype: Any
) -> tuple[tuple[float, ...], int, Any]:
  """Validates the arguments that start a new snapshot directory."""
  sigmas = tuple(float(v) for v in sigma_rels)
  if not sigmas:
    raise ValueError("`sigma_rels` is empty.")
  for s in sigmas:
    _schedules.sigma_rel_to_gamma(s)  # validates the range
  every = _checks.check_int("every", every, 1)
  return sigmas, every, _checks.check_dtype(dtype)


def _read_config(path: pathlib.Path) -> tuple[tuple[float, ...], int, Any]:
  """``(sigma_rels, every, dtype)`` of an existing snapshot directory."""
  try:
    saved = json.loads(path.read_text())
    sigmas = tuple(float(v) for v in saved["sigma_rels"])
    every = int(saved["every"])
    dtype = None if saved["dtype"] is None else jnp.dtype(saved["dtype"])
  except (ValueError, KeyError, TypeError) as e:
    raise SnapshotError(f"{path} is damaged ({e}).") from e
  return sigmas, every, dtype


def _write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically (a reader sees all or nothing)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj))
  os.replace(tmp, path)


class _Loader:
  """Restores one snapshot's target from its orbax folder."""

  def __init__(self, path: pathlib.Path) -> None:
    self.path = path

  def __call__(self) -> PyTree:
    import orbax.checkpoint as ocp

    try:
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(self.path.resolve())
    except Exception as e:  # orbax raises many types for damaged files
      raise SnapshotError(
        f"cannot restore the snapshot in {self.path}: {type(e).__name__}: {e}"
      ) from e
