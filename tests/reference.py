"""An independent float64 NumPy model of jepa_ema's documented semantics.

Written from the documentation (``docs/concepts.md``, ``docs/guarantees.md``,
``docs/howto/options.md``, ``docs/howto/policy.md``, the docstrings of
``ema``, ``track_ema``, ``get_target`` and ``EmaTransformation.momentum``)
and from the rules decided in issue 30, never from the implementation: it
imports nothing of ``jepa_ema`` but the names it builds schedules with
(:meth:`Sched.build`), and computes everything in float64 NumPy.

What it models, per documented rule:

* **Momentum.** Every schedule of the draw is evaluated from its documented
  formula in float64 (none is taken from the library): ``constant``,
  ``linear``, ``cosine``, ``warmup``, ``tf_warmup``, ``exp_warmup``,
  ``power`` (EDM2), ``halflife`` (EDM, with ramp-up), ``scale`` (the EMA
  Scaling Rule ``m(kt)^k``) and ``optax.linear_schedule``. A constant's
  per-step float32 value is known exactly (``float32(m)``); every other
  schedule's float32 value lies within :data:`SCHEDULE_ATOL` of the formula.
* **Several momenta**: one state per momentum, each on its own.
* **every=k**: the target moves on steps ``k-1, 2k-1, ...`` with the product
  of the window's momenta, each clipped to ``[0, 1]`` first (a non-finite
  one counts as 1), rounded to float32 once; the read-back momentum is 1 on
  the steps in between.
* **Policy**: ``average`` (the EMA; non-floating leaves copied), ``copy``,
  ``keep`` (the init value, bitwise), ``exclude`` (``None``), as one action,
  a prefix tree, a callable or ``policy_by_path`` rules (``re.search`` on
  ``keystr(path)``, first match wins).
* **dtype=**: the stored dtype of averaged real floating leaves; copied,
  kept and non-floating leaves keep the params' dtype.
* **skip_nonfinite** (issue 30, decision 1): checks the floating leaves that
  enter the target (averaged and copied) at update steps; a skipped update
  leaves the whole stored target bitwise (copied and integer leaves too),
  ``skipped`` += 1, drift keeps its value, ``step`` still counts.
* **drift** (decisions 2, 5): ``||target - params|| / ||params||`` over the
  averaged floating leaves after the update, ``0/0 = 0``, NaN when the
  measured params hold NaN/Inf; one ``per_module`` entry per top-level entry
  holding an averaged floating leaf, keyed by the top-level key as ``str``;
  with ``drift=N`` on target updates ``N-1, 2N-1, ...`` (counted from 0).
* **track_ema** (decision 3): the target averages the post-step params, which
  the caller gives the model as ``optax.apply_updates(params, updates)``;
  write-back (decision 6) on target updates ``N-1, 2N-1, ...`` moves the
  averaged floating leaves to ``w * post + (1 - w) * target``.
* **Read-back momentum** and ``get_target(state, online=params)``.

How the model is compared (the tolerances, derived):

* The model continues from the library's averaged floating target values
  after each checked step (:meth:`Model.resync`), so each comparison is
  **one** blend, not an accumulated bound; everything else (step, skipped,
  kept, copied and integer leaves, drift's previous value) is the model's
  own. (A half-precision target rounds at every step, so two trajectories
  rounded independently would part by an ulp and never meet again.)
* One blend ``t + (1 - m)(o - t)`` (``o + m(t - o)`` for ``m < 1/2``) in
  float32: the difference, the product and the sum each round once (relative
  ``u = 2**-24``), so ``|r - exact| <= u (|exact| + 3 min(m, 1-m) |o - t|)``;
  an error ``dm`` of the float32 momentum adds ``dm |o - t|``. A bfloat16 or
  float16 target then rounds the float32 result once more: half an ulp of
  the stored dtype (a whole ulp with ``rounding="stochastic"``: either
  neighbour). Below the stored dtype's smallest normal a result may be
  flushed to zero (XLA:CPU), which is accepted.
* ``dm``: 0 for a constant's per-step momentum (``float32(m)`` exactly);
  :data:`SCHEDULE_ATOL` = ``2**-21`` (8 float32 ulps at 1) for a formula of
  O(1) terms evaluated in float32 (at most 6 roundings of relative ``u`` and
  ``cos``/``pow``/``exp`` within 2 ulps, plus one ulp between eager and jitted
  evaluation: decision 8); a window's product adds the per-step errors (each
  factor in ``[0, 1]``) and half an ulp of float32 for its one rounding.
* Exact, compared bitwise: ``m = 1`` (the target), ``m = 0`` (the online
  value cast to the stored dtype; with stochastic rounding either neighbour,
  decision 9), ``t == o`` (stays), copied, kept, integer and bool leaves,
  excluded leaves (``None``), a skipped update (the previous target),
  ``get_target``'s stored and filled leaves, step and skipped. ``m`` counts
  as 0 or 1 when the formula gives it exactly and the library reads back the
  same float32 value.
* Drift, a ratio of float32 norms over ``n`` elements: each difference rounds
  once, the sum of ``n`` squares within ``n u``, the square root and the
  division once each: relative ``4 (n + 6) u``.
* Write-back: the float32 blend above at ``w``, then the blend rounded to the
  params' dtype, ``n - p`` rounded to it and ``p + (n - p)`` rounded to it:
  ``1.5`` ulps of the params' dtype at ``max(|n|, |p|)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import ml_dtypes
import numpy as np

U32 = 2.0**-24  # unit roundoff of float32
SCHEDULE_ATOL = 2.0**-21  # a non-constant schedule's float32 value

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
FLOATS = {F32, BF16, F16, np.dtype(np.float64)}
HALF = {BF16, F16}
# precision (mantissa bits with the implicit one) and smallest normal exponent
_FORMAT = {F32: (24, -126), BF16: (8, -126), F16: (11, -14)}


def is_float(dtype: Any) -> bool:
  return np.dtype(dtype) in FLOATS


def ulp(dtype: Any, x: Any) -> np.ndarray:
  """The spacing of ``dtype`` at magnitude ``|x|`` (float64, elementwise)."""
  p, emin = _FORMAT[np.dtype(dtype)]
  x = np.abs(np.asarray(x, np.float64))
  with np.errstate(divide="ignore", invalid="ignore"):
    e = np.floor(np.log2(np.where(x > 0, x, 1.0)))
  e = np.where(x > 0, np.maximum(e, emin), emin)
  e = np.where(np.isfinite(e), e, emin)
  return np.ldexp(1.0, (e - p + 1).astype(np.int64))


def tiny(dtype: Any) -> float:
  return math.ldexp(1.0, _FORMAT[np.dtype(dtype)][1])


def bits(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return x
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


# ---------------------------------------------------------------- schedules


def f32(x: float) -> float:
  return float(np.float32(x))


@dataclasses.dataclass(frozen=True)
class Sched:
  """A momentum spec: how to build it for the library, and its formula."""

  kind: str
  args: tuple = ()

  def build(self) -> Any:
    import optax

    import jepa_ema

    a = self.args
    if self.kind == "number":
      return a[0]
    if self.kind == "constant":
      return jepa_ema.constant_momentum(a[0])
    if self.kind == "linear":
      return jepa_ema.linear_momentum(a[0], a[1], total_steps=a[2])
    if self.kind == "cosine":
      return jepa_ema.cosine_momentum(a[0], a[1], total_steps=a[2])
    if self.kind == "warmup":
      return jepa_ema.warmup_momentum(*a)
    if self.kind == "tf_warmup":
      return jepa_ema.tf_warmup_momentum(a[0])
    if self.kind == "exp_warmup":
      return jepa_ema.exp_warmup_momentum(a[0], tau=a[1])
    if self.kind == "power":
      return jepa_ema.power_momentum(gamma=a[0])
    if self.kind == "halflife":
      return jepa_ema.halflife_momentum(a[0], rampup=a[1])
    if self.kind == "scale":
      return jepa_ema.scale_momentum(a[0].build(), a[1])
    if self.kind == "optax_linear":
      return optax.linear_schedule(a[0], a[1], a[2])
    raise ValueError(self.kind)

  def m64(self, t: float) -> float:
    """The documented formula at step ``t``, in float64."""
    a = self.args
    if self.kind in ("number", "constant"):
      return f32(a[0])  # a float32 scalar: float32(m) exactly
    if self.kind in ("linear", "cosine"):
      base, final, total = a
      if total == 0:
        return float(final)
      tc = min(max(t, 0.0), total)
      if tc == total:
        return float(final)
      if self.kind == "linear":
        return base + (final - base) * tc / total
      return final - (final - base) * (1 + math.cos(math.pi * tc / total)) / 2
    if self.kind == "warmup":
      mx, mn, inv_gamma, power, start = a
      tp = max(t - start, 0.0)
      return min(max(1 - (1 + tp / inv_gamma) ** (-power), mn), mx)
    if self.kind == "tf_warmup":
      tc = max(t, 0.0)
      return min(a[0], (1 + tc) / (10 + tc))
    if self.kind == "exp_warmup":
      tc = max(t, 0.0)
      return a[0] * (1 - math.exp(-(tc + 1) / a[1]))
    if self.kind == "power":
      tc = max(t, 0.0)
      return (1 - 1 / (tc + 1)) ** (a[0] + 1)
    if self.kind == "halflife":
      halflife, rampup = a
      tc = max(t, 0.0)
      h = halflife if rampup is None else min(halflife, rampup * (tc + 1))
      return 0.5 ** (1 / h)
    if self.kind == "scale":
      inner, kappa = a
      return inner.m64(kappa * t) ** kappa
    if self.kind == "optax_linear":
      init, end, steps = a
      frac = 1.0 - min(max(t, 0.0), steps) / steps
      return (init - end) * frac + end
    raise ValueError(self.kind)

  def atol(self) -> float:
    if self.kind in ("number", "constant"):
      return 0.0
    if self.kind == "scale":  # m(kt)**k: the inner error grows k-fold
      return (1 + self.args[1]) * max(self.args[0].atol(), SCHEDULE_ATOL)
    return SCHEDULE_ATOL


def clip_momentum(m: float) -> float:
  """A momentum's defined value: non-finite counts as 1, else clipped."""
  if not math.isfinite(m):
    return 1.0
  return min(max(m, 0.0), 1.0)


def window_momentum(sched: Sched, step: int, every: int) -> tuple[float, float]:
  """``(m, tolerance)`` the update at ``step`` applies (``every=k``: the
  product over the window ending at ``step``, each factor clipped first)."""
  if every == 1:
    return clip_momentum(sched.m64(step)), sched.atol()
  m, tol = 1.0, 0.0
  for j in range(step - every + 1, step + 1):
    m *= clip_momentum(sched.m64(j))
    tol += sched.atol()
  return m, tol + 0.5 * float(ulp(F32, m)) + 1e-15


# -------------------------------------------------------------------- trees


def flatten(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
  """``(path, leaf)`` pairs in jax's order (dict keys sorted); ``None`` is a
  leaf here."""
  if isinstance(tree, dict):
    out = []
    for k in sorted(tree):
      out += flatten(tree[k], path + (k,))
    return out
  if isinstance(tree, (list, tuple)):
    out = []
    for i, x in enumerate(tree):
      out += flatten(x, path + (i,))
    return out
  return [(path, tree)]


def unflatten_like(tree: Any, values: dict, path: tuple = ()) -> Any:
  if isinstance(tree, dict):
    return {k: unflatten_like(tree[k], values, path + (k,)) for k in tree}
  if isinstance(tree, (list, tuple)):
    return type(tree)(
      unflatten_like(x, values, path + (i,)) for i, x in enumerate(tree)
    )
  return values[path]


def keystr(path: tuple) -> str:
  """``jax.tree_util.keystr`` of a dict-key / sequence-index path."""
  return "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for k in path)


ACTIONS = ("average", "copy", "keep", "exclude")


def resolve_policy(spec: Any, params: Any) -> dict:
  """``{path: action}`` for every leaf of ``params``.

  ``spec``: ``None``; an action; ``("prefix", tree)`` or ``("callable",
  tree)`` (a prefix of the params whose leaves are actions); or
  ``("by_path", rules, default)`` (first ``re.search`` match wins)."""
  paths = [p for p, _ in flatten(params)]
  if spec is None:
    return dict.fromkeys(paths, "average")
  if isinstance(spec, str):
    return dict.fromkeys(paths, spec)
  kind = spec[0]
  if kind in ("prefix", "callable"):
    out = {}

    def walk(pol: Any, sub: Any, path: tuple) -> None:
      if isinstance(pol, str):
        for p, _ in flatten(sub, path):
          out[p] = pol
      elif isinstance(pol, dict):
        assert set(pol) == set(sub), (pol, sub)
        for k in pol:
          walk(pol[k], sub[k], path + (k,))
      else:
        assert len(pol) == len(sub)
        for i, x in enumerate(pol):
          walk(x, sub[i], path + (i,))

    walk(spec[1], params, ())
    return out
  if kind == "by_path":
    _, rules, default = spec
    out = {}
    for p in paths:
      out[p] = default
      for regex, action in rules:
        if re.search(regex, keystr(p)):
          out[p] = action
          break
    return out
  raise ValueError(spec)


# ------------------------------------------------------------- expectations


@dataclasses.dataclass
class Leaf:
  """What a library leaf must be: its dtype and shape; where ``exact``, the
  bits of ``value``; elsewhere within ``tol`` of ``value64``. ``None``: the
  leaf must be ``None`` (excluded)."""

  dtype: Any
  value: np.ndarray | None  # in ``dtype``: the bitwise expectation
  exact: np.ndarray | None = None  # bool mask; None = all exact
  value64: np.ndarray | None = None
  tol: np.ndarray | None = None
  flush_ok: bool = False  # a result below the smallest normal may be 0


def exact_leaf(x: np.ndarray | None) -> Leaf:
  if x is None:
    return Leaf(None, None)
  x = np.asarray(x)
  return Leaf(x.dtype, x)


def check_leaf(lib: Any, exp: Leaf, where: str) -> None:
  if exp.value is None and exp.value64 is None:
    assert lib is None, f"{where}: expected None (excluded), got {lib!r}"
    return
  assert lib is not None, f"{where}: got None"
  lib = np.asarray(lib)
  assert lib.dtype == exp.dtype, f"{where}: dtype {lib.dtype} != {exp.dtype}"
  ref = exp.value if exp.value is not None else exp.value64
  assert lib.shape == np.shape(ref), f"{where}: shape {lib.shape}"
  exact = (
    np.ones(lib.shape, bool) if exp.exact is None else np.asarray(exp.exact)
  )
  if exact.any():
    same = bits(lib) == bits(np.asarray(exp.value, exp.dtype))
    bad = exact & ~same
    assert not bad.any(), (
      f"{where}: not bitwise where exact: got {lib[bad]}, "
      f"expected {np.asarray(exp.value, exp.dtype)[bad]}"
    )
  if (~exact).any():
    got = lib.astype(np.float64)
    want = np.asarray(exp.value64, np.float64)
    err = np.abs(got - want)
    ok = (err <= exp.tol) | (np.isnan(got) & np.isnan(want)) | (got == want)
    if exp.flush_ok:
      ok |= (got == 0) & (np.abs(want) <= tiny(exp.dtype) + exp.tol)
    bad = ~exact & ~ok
    assert not bad.any(), (
      f"{where}: got {got[bad]}, expected {want[bad]} within "
      f"{np.broadcast_to(exp.tol, got.shape)[bad]} (err {err[bad]})"
    )


def cast(x: np.ndarray, dtype: Any) -> np.ndarray:
  """Round to nearest (even) into ``dtype``."""
  return np.asarray(x).astype(dtype)


def blend(
  t: np.ndarray,
  o: np.ndarray,
  m: float,
  dm: float,
  m_lib: float | None,
  stochastic: bool,
) -> Leaf:
  """The expectation of one blend of the stored ``t`` towards the online
  ``o`` at momentum ``m`` (float64, within ``dm``); ``m_lib``: the float32
  momentum the library reports (for the exact ends)."""
  dtype = t.dtype
  t64, o64 = t.astype(np.float64), o.astype(np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    v = m * t64 + (1 - m) * o64
    diff = np.abs(o64 - t64)
    tol = dm * diff + U32 * (np.abs(v) + 3 * min(m, 1 - m) * diff)
  half = dtype in HALF and dtype != np.dtype(np.float32)
  if half:
    tol = tol + (1.0 if stochastic else 0.5) * ulp(dtype, np.abs(v) + tol)
  exact = np.zeros(t.shape, bool)
  value = np.zeros(t.shape, dtype)
  if m == 1.0 and m_lib == 1.0:
    exact[...] = True
    value[...] = t
  elif m == 0.0 and m_lib == 0.0:
    o_cast = cast(o, dtype)
    if stochastic and half:  # either neighbour (decision 9): exact where
      # the online value is representable
      rep = o_cast.astype(np.float64) == o64
      exact |= rep
      value = np.where(rep, o_cast, value).astype(dtype)
      v = np.where(rep, v, o64)
      tol = np.where(rep, tol, ulp(dtype, np.abs(o64)))
    else:
      exact[...] = True
      value[...] = o_cast
  same = (t64 == o64) & ~exact
  exact |= same
  value = np.where(same, t, value).astype(dtype)
  return Leaf(dtype, value, exact, v, tol, flush_ok=True)


# -------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Options:
  momenta: tuple  # of Sched
  several: bool = False  # a tuple of momenta (the state a tuple)
  dtype: Any = None
  skip_nonfinite: bool = False
  every: int = 1
  drift: bool | int = False
  rounding: str = "nearest"
  policy: Any = None  # see resolve_policy
  api: str = "ema"  # or "track_ema"
  write_back_every: int | None = None
  write_back_momentum: float = 0.0

  def library_policy(self) -> Any:
    import jepa_ema

    p = self.policy
    if p is None or isinstance(p, str):
      return p
    if p[0] == "prefix":
      return p[1]
    if p[0] == "callable":
      tree = p[1]
      return lambda params: tree
    if p[0] == "by_path":
      return jepa_ema.policy_by_path(list(p[1]), default=p[2])
    raise ValueError(p)

  def library_kwargs(self) -> dict:
    kw: dict = {}
    if self.dtype is not None:
      kw["dtype"] = self.dtype
    if self.skip_nonfinite:
      kw["skip_nonfinite"] = True
    if self.every != 1:
      kw["every"] = self.every
    if self.drift is not False:
      kw["drift"] = self.drift
    if self.rounding != "nearest":
      kw["rounding"] = self.rounding
    if self.policy is not None:
      kw["policy"] = self.library_policy()
    if self.api == "track_ema" and self.write_back_every is not None:
      kw["write_back_every"] = self.write_back_every
      kw["write_back_momentum"] = self.write_back_momentum
    return kw

  def library_momentum(self) -> Any:
    built = tuple(s.build() for s in self.momenta)
    return built if self.several else built[0]


@dataclasses.dataclass
class State:
  step: int
  skipped: int
  target: dict  # path -> np.ndarray | None
  drift: dict | None  # {"global": float, "per_module": {name: float}}
  drift_changed: bool = False  # recomputed by the last call
  drift_rtol: dict = dataclasses.field(default_factory=dict)
  pending: dict = dataclasses.field(default_factory=dict)
  pending_params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Expected:
  """One state's expectation after a call (its drift: the model's State
  after :meth:`Model.resync`)."""

  step: int
  skipped: int
  target: dict  # path -> Leaf
  momentum: float | None  # the read-back momentum (None before any update)
  momentum_tol: float


class Model:
  """The documented EMA of ``ema(...)`` / ``track_ema(...)``, in float64."""

  def __init__(self, opts: Options, params: Any):
    self.opts = opts
    self.structure = params
    self.actions = resolve_policy(opts.policy, params)
    flat = dict(flatten(params))
    self.param_dtypes = {p: np.asarray(x).dtype for p, x in flat.items()}
    self.stochastic = opts.rounding == "stochastic"
    self.states = [
      State(0, 0, self._init_target(flat), self._init_drift(params))
      for _ in opts.momenta
    ]
    self.last_momenta: list = [None] * len(opts.momenta)

  # -- rules --
  def averaged_float(self, path: tuple) -> bool:
    return self.actions[path] == "average" and is_float(self.param_dtypes[path])

  def stored_dtype(self, path: tuple) -> Any:
    if self.averaged_float(path) and self.opts.dtype is not None:
      return np.dtype(self.opts.dtype)
    return self.param_dtypes[path]

  def _init_target(self, flat: dict) -> dict:
    out = {}
    for p, x in flat.items():
      if self.actions[p] == "exclude":
        out[p] = None
      else:
        out[p] = cast(np.asarray(x), self.stored_dtype(p))
    return out

  def modules(self) -> dict:
    """Top-level key (as str) -> its averaged floating leaf paths; only the
    entries holding at least one (decision 5)."""
    out: dict = {}
    if not isinstance(self.structure, (dict, list, tuple)):
      return out
    for p in self.actions:
      if self.averaged_float(p):
        out.setdefault(str(p[0]), []).append(p)
    return out

  def _init_drift(self, params: Any) -> dict | None:
    if self.opts.drift is False:
      return None
    return {"global": 0.0, "per_module": dict.fromkeys(self.modules(), 0.0)}

  def init_expected(self) -> list[Expected]:
    out = []
    for s in self.states:
      target = {}
      for p, x in s.target.items():
        if x is None:
          target[p] = exact_leaf(None)
        elif (
          self.stochastic and self.averaged_float(p) and x.dtype in HALF
        ):  # init may round either way: within an ulp of the param
          v64 = np.asarray(dict(flatten(self.structure))[p], np.float64)
          target[p] = Leaf(
            x.dtype,
            x,
            v64 == x.astype(np.float64),
            v64,
            ulp(x.dtype, np.abs(v64)),
          )
        else:
          target[p] = exact_leaf(x)
      out.append(Expected(0, 0, target, None, 0.0))
    return out

  def is_update(self, step: int) -> bool:
    return step % self.opts.every == self.opts.every - 1

  def momentum_at(self, i: int, step: int) -> tuple[float, float]:
    """The read-back momentum of update ``step`` and its tolerance."""
    if not self.is_update(step):
      return 1.0, 0.0
    return window_momentum(self.opts.momenta[i], step, self.opts.every)

  def _nonfinite(self, flat: dict) -> bool:
    for p, x in flat.items():
      if self.actions[p] in ("average", "copy") and is_float(x.dtype):
        if not np.isfinite(x.astype(np.float64)).all():
          return True
    return False

  def drift_due(self, step: int) -> bool:
    if self.opts.drift is False or not self.is_update(step):
      return False
    if self.opts.drift is True:
      return True
    u = step // self.opts.every
    return u % self.opts.drift == self.opts.drift - 1

  def write_back_due(self, step: int) -> bool:
    n = self.opts.write_back_every
    if n is None or not self.is_update(step):
      return False
    return (step // self.opts.every) % n == n - 1

  def _drift_values(self, target: dict, flat: dict) -> tuple[dict, dict]:
    def ratio(paths: list) -> tuple[float, float]:
      num = den = 0.0
      n = 0
      bad = False
      for p in paths:
        x = flat[p].astype(np.float64)
        bad |= not np.isfinite(x).all()
        t = target[p].astype(np.float64)
        num += float(np.sum((t - x) ** 2))
        den += float(np.sum(x**2))
        n += x.size
      if bad:
        return math.nan, 0.0
      if den == 0.0:
        return (0.0 if num == 0.0 else math.inf), 0.0
      return math.sqrt(num) / math.sqrt(den), 4 * (n + 6) * U32

    mods = self.modules()
    g, gt = ratio([p for p in self.actions if self.averaged_float(p)])
    values = {"global": g, "per_module": {}}
    rtol = {"global": gt}
    for name, ps in mods.items():
      values["per_module"][name], rtol[name] = ratio(ps)
    return values, rtol

  def update(
    self, params: Any, momenta_lib: list | None = None
  ) -> list[Expected]:
    """One call of ``update`` with the (post-step) ``params``.

    ``momenta_lib``: the float32 momenta the library reads back for this
    call (for the exact ends), one per state."""
    flat = {p: np.asarray(x) for p, x in flatten(params)}
    out = []
    step = self.states[0].step
    due = self.is_update(step)
    skip = due and self.opts.skip_nonfinite and self._nonfinite(flat)
    for i, s in enumerate(self.states):
      m, dm = self.momentum_at(i, step)
      # a non-finite (traced) momentum counts as 1 and as a skipped update
      # (decision 1; every=1 only: inside a window it is not modelled)
      raw = self.opts.momenta[i].m64(step)
      skip_i = skip or (due and self.opts.every == 1 and not math.isfinite(raw))
      m_lib = None if momenta_lib is None else momenta_lib[i]
      target: dict = {}
      new: dict = {}
      for p, old in s.target.items():
        a = self.actions[p]
        if old is None:
          target[p], new[p] = exact_leaf(None), None
        elif not due or skip_i or a == "keep":
          target[p], new[p] = exact_leaf(old), old
        elif a == "copy" or not is_float(old.dtype):
          val = np.asarray(flat[p]).copy()
          target[p], new[p] = exact_leaf(val), val
        else:  # averaged floating
          leaf = blend(old, flat[p], m, dm, m_lib, self.stochastic)
          target[p], new[p] = leaf, leaf
      s.drift_changed = not skip_i and self.drift_due(step)
      s.pending, s.pending_params = new, flat
      s.step = min(step + 1, 2**31 - 1)
      s.skipped += int(skip_i)
      out.append(Expected(s.step, s.skipped, target, m, dm + 1e-15))
    return out

  def resync(self, lib_targets: list[dict]) -> None:
    """After a checked call: take the library's averaged floating values
    (one blend each, within tolerance) as the model's."""
    for s, lib in zip(self.states, lib_targets):
      for p, v in s.pending.items():
        if isinstance(v, Leaf):
          s.target[p] = np.asarray(lib[p])
        else:
          s.target[p] = v
      if s.drift_changed:  # from the checked target: float32 norms only
        s.drift, s.drift_rtol = self._drift_values(s.target, s.pending_params)

  def write_back(self, step: int, post: Any, pre: Any) -> dict | None:
    """The params after a ``track_ema`` call at ``step`` (its write-back):
    ``{path: Leaf}``, or None when none is due (the params are ``post``)."""
    if not self.write_back_due(step):
      return None
    w = float(self.opts.write_back_momentum)
    target = self.states[0].target
    flat_post = dict(flatten(post))
    flat_pre = dict(flatten(pre))
    out = {}
    for p, x in flat_post.items():
      x = np.asarray(x)
      if not self.averaged_float(p):
        out[p] = exact_leaf(x)
        continue
      x64 = x.astype(np.float64)
      t64 = target[p].astype(np.float64)
      v = w * x64 + (1 - w) * t64
      diff = np.abs(x64 - t64)
      tol = U32 * (np.abs(v) + 3 * min(w, 1 - w) * diff) + 1.5 * ulp(
        x.dtype,
        np.maximum(np.abs(v), np.abs(np.asarray(flat_pre[p], np.float64)))
        + diff,
      )
      out[p] = Leaf(x.dtype, None, np.zeros(x.shape, bool), v, tol)
    return out

  def get_target(self, i: int, online: Any) -> dict:
    """``get_target(state, i, online=online)``: stored leaves bitwise, the
    excluded ones filled from ``online``."""
    flat = dict(flatten(online))
    return {
      p: exact_leaf(np.asarray(flat[p]) if x is None else x)
      for p, x in self.states[i].target.items()
    }
