"""Speed and memory of the EMA update, against the memory roofline and the
alternatives, measured side by side in one run.

The update is memory-bound: per float32 parameter it reads the target, reads
the online value and writes the target (12 bytes). The *roofline* is the best
2-read-1-write pass this machine does over one flat buffer of the same size
(``numpy.add(t, o, out=t)``), measured in the same run, interleaved with every
variant, so machine noise hits all of them alike.

Variants (each one EMA step of a whole parameter tree):

* ``jepa_ema ema().jit()``       the stateful wrapper as a user calls it, state
                                 donated (in place);
* ``jepa_ema make_ema_update``   the bound three-argument update (donated);
* ``jepa_ema jit(ema_update)``   the pure update under the user's own
                                 ``jax.jit`` (traced momentum, donated);
* ``bare tree_map``              the one line users compare with:
                                 ``jit(tree_map(a + (1 - m) * (b - a)))``,
                                 donated; the ``x bare`` column divides its
                                 fastest round by each variant's;
* ``hand-mapped kernel``         jepa_ema's elementwise kernel (its guards
                                 included) mapped over the tree by hand, with
                                 a cosine schedule inside the jit: the kernel
                                 without the library around it;
* ``jepa_ema in train step``     ``ema().update`` inside a bigger jitted
                                 function (K updates in a ``fori_loop``): the
                                 in-graph cost, dispatch paid once per step;
* ``flat buffer in train step``  the same on one flat buffer of the same size;
* ``two-sided lerp, unguarded``  jepa_ema's kernel before its overflow and
                                 equal-value guards (donated): their cost;
* ``jit tree_map (no donation)``, ``eager tree_map``,
  ``optax.incremental_update (jit)``: what users write by hand;
* ``torch _foreach_lerp_`` / ``torch mul_+add_ (I-JEPA)`` when torch imports;
* ``bf16 params, f32 target``    ``ema(dtype=float32)`` with bfloat16 params
                                 (10 bytes per parameter);
* ``jit dispatch floor``         a donated jit that returns its input: what
                                 JAX pays per call for the argument buffers.

The in-step table (``--instep``, on by default) reads XLA's cost analysis
("bytes accessed") of a jitted AdamW step with and without the EMA, per
parameter, and times the steps side by side.

Peak memory: for each variant, in a fresh subprocess, what one update
allocates beyond the resident state (the two model copies and the compiled
program), as a fraction of one model copy (``VmHWM`` from /proc after a
reset via ``/proc/self/clear_refs``).

Usage::

  python benchmarks/ema_bench.py --quick     # ViT-S/16 + 1000 leaves, < 1 min
  python benchmarks/ema_bench.py             # + ViT-B/16, ViT-L/16
  python benchmarks/ema_bench.py --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

# --------------------------------------------------------------------- trees

VITS = {"vit_s16": (384, 12), "vit_b16": (768, 12), "vit_l16": (1024, 24)}


def tree_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of a ViT/16 at 224 px (timm layout), or 1000 small leaves."""
  if name == "small1000":
    return {f"leaf{i:04d}": (1024,) for i in range(1000)}
  return vit_shapes(*VITS[name])


def vit_shapes(
  width: int, depth: int, mlp: int | None = None, patch: int = 16
) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of a ViT at 224 px (timm layout); ``mlp`` defaults to
  ``4 * width``."""
  mlp = 4 * width if mlp is None else mlp
  tokens = (224 // patch) ** 2 + 1
  shapes = {
    "patch_embed/kernel": (patch * patch * 3, width),
    "patch_embed/bias": (width,),
    "cls_token": (1, 1, width),
    "pos_embed": (1, tokens, width),
    "norm/scale": (width,),
    "norm/bias": (width,),
  }
  for b in range(depth):
    p = f"blocks{b:02d}/"
    shapes.update(
      {
        p + "norm1/scale": (width,),
        p + "norm1/bias": (width,),
        p + "attn/qkv/kernel": (width, 3 * width),
        p + "attn/qkv/bias": (3 * width,),
        p + "attn/proj/kernel": (width, width),
        p + "attn/proj/bias": (width,),
        p + "norm2/scale": (width,),
        p + "norm2/bias": (width,),
        p + "mlp/fc1/kernel": (width, mlp),
        p + "mlp/fc1/bias": (mlp,),
        p + "mlp/fc2/kernel": (mlp, width),
        p + "mlp/fc2/bias": (width,),
      }
    )
  return shapes


def num_params(name: str) -> int:
  return int(sum(np.prod(s) for s in tree_shapes(name).values()))


def make_numpy_tree(name: str, seed: int, dtype=np.float32) -> dict:
  rng = np.random.default_rng(seed)
  return {
    k: rng.standard_normal(s, dtype=np.float32).astype(dtype)
    for k, s in tree_shapes(name).items()
  }


# ------------------------------------------------------------------ variants

MOMENTUM = 0.996

# Buffers shared by the variants of one tree (so that a ViT-L run with every
# variant alive for interleaving fits in memory): the online tree, and the
# target read by the variants that do not write in place.
_SHARED: dict[tuple[str, str], Any] = {}


def shared(tree: str, what: str) -> Any:
  key = (tree, what)
  if key not in _SHARED:
    jax, jnp = _jax()
    if what == "np_online":
      _SHARED[key] = make_numpy_tree(tree, 1)
    elif what == "jax_online":
      _SHARED[key] = {
        k: jnp.asarray(v) for k, v in shared(tree, "np_online").items()
      }
    elif what == "jax_target":
      _SHARED[key] = jax.tree.map(jnp.asarray, make_numpy_tree(tree, 0))
    elif what == "torch_online":  # zero-copy view of the numpy online tree
      import torch

      _SHARED[key] = [
        torch.from_numpy(x) for x in shared(tree, "np_online").values()
      ]
  return _SHARED[key]


def jax_tree(tree: str, seed: int, dtype=None) -> dict:
  """A fresh JAX tree built leaf by leaf (no model-sized numpy temporary)."""
  jax, jnp = _jax()
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
    for k, s in tree_shapes(tree).items()
  }


class Variant:
  """Holds its own buffers; ``run()`` does one full update, synchronously."""

  name = ""
  bytes_per_param = 12

  def setup(self, tree: str) -> None:
    raise NotImplementedError

  def run(self) -> None:
    raise NotImplementedError

  def per_call(self) -> int:
    return 1  # updates performed by one run()


def _jax():
  import jax
  import jax.numpy as jnp

  return jax, jnp


ROOF_PREFIX = "roofline pass:"


def hand_ema(target: dict, online: dict) -> dict:
  """The EMA as users write it by hand: a tree_map of m * t + (1 - m) * o."""
  jax, _ = _jax()
  m = MOMENTUM
  return jax.tree.map(lambda a, b: m * a + (1 - m) * b, target, online)


def fresh_state(target: dict):
  """The EmaState ``ema().init`` would build (step 0, the given target),
  without init's copy, so the benchmark never holds a third model copy."""
  _, jnp = _jax()
  import jepa_ema

  return jepa_ema.EmaState(
    jnp.zeros([], jnp.int32), target, jnp.zeros([], jnp.int32)
  )


def flat_pair(tree: str) -> tuple[np.ndarray, np.ndarray]:
  """Two flat float32 buffers of the tree's size, shared by the numpy and
  torch roofline passes (torch.from_numpy is a zero-copy view)."""
  key = (tree, "flat_pair")
  if key not in _SHARED:
    n = num_params(tree)
    _SHARED[key] = tuple(
      np.random.default_rng(s).standard_normal(n, dtype=np.float32)
      for s in (0, 1)
    )
  return _SHARED[key]


class Roofline(Variant):
  """One flat buffer, t += o: 2 reads and 1 write per element."""

  name = f"{ROOF_PREFIX} numpy add(t, o, out=t)"

  def setup(self, tree):
    self.t, self.o = flat_pair(tree)

  def run(self):
    np.add(self.t, self.o, out=self.t)


class RooflineXla(Variant):
  name = f"{ROOF_PREFIX} XLA t + o (donated jit)"

  def setup(self, tree):
    jax, jnp = _jax()
    n = num_params(tree)
    self.t = jnp.asarray(
      np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    )
    self.o = jnp.asarray(
      np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    )
    self.fn = jax.jit(lambda t, o: t + o, donate_argnums=0)

  def run(self):
    self.t = self.fn(self.t, self.o)
    self.t.block_until_ready()


class RooflineTorch(Variant):
  name = f"{ROOF_PREFIX} torch add_ (multi-threaded)"

  def setup(self, tree):
    import torch

    self.t, self.o = (torch.from_numpy(x) for x in flat_pair(tree))

  def run(self):
    self.t.add_(self.o)


class JepaWrapper(Variant):
  name = "jepa_ema ema().jit() (donated)"

  def setup(self, tree):
    import jepa_ema

    self.update = jepa_ema.ema(MOMENTUM).jit()
    self.online = shared(tree, "jax_online")
    self.state = fresh_state(jax_tree(tree, 0))

  def run(self):
    jax, _ = _jax()
    self.state = self.update(self.online, self.state)
    jax.block_until_ready(self.state)


class JepaBound(Variant):
  name = "jepa_ema make_ema_update (donated)"

  def setup(self, tree):
    import jepa_ema

    self.fn = jepa_ema.make_ema_update(MOMENTUM)
    self.online = shared(tree, "jax_online")
    self.target = jax_tree(tree, 0)
    self.step = 0

  def run(self):
    jax, _ = _jax()
    self.target = self.fn(self.target, self.online, self.step)
    jax.block_until_ready(self.target)


class JepaPure(Variant):
  name = "jepa_ema jit(ema_update) (donated)"

  def setup(self, tree):
    jax, jnp = _jax()
    import jepa_ema

    self.fn = jax.jit(jepa_ema.ema_update, donate_argnums=0)
    self.online = shared(tree, "jax_online")
    self.target = jax_tree(tree, 0)
    self.m = jnp.float32(MOMENTUM)

  def run(self):
    jax, _ = _jax()
    self.target = self.fn(self.target, self.online, 0, self.m)
    jax.block_until_ready(self.target)


class BareTreeMap(Variant):
  """The one line a user would otherwise write, jitted and donated."""

  name = "bare tree_map a + (1 - m)(b - a) (donated)"

  def setup(self, tree):
    jax, _ = _jax()
    m = MOMENTUM
    self.fn = jax.jit(
      lambda t, o: jax.tree.map(lambda a, b: a + (1 - m) * (b - a), t, o),
      donate_argnums=0,
    )
    self.online = shared(tree, "jax_online")
    self.target = jax_tree(tree, 0)

  def run(self):
    jax, _ = _jax()
    self.target = self.fn(self.target, self.online)
    jax.block_until_ready(self.target)


class HandKernel(Variant):
  """jepa_ema's kernel mapped by hand, cosine schedule inside the jit."""

  name = "hand-mapped kernel (donated)"

  def setup(self, tree):
    jax, jnp = _jax()
    import jepa_ema
    from jepa_ema import _kernel

    schedule = jepa_ema.cosine_momentum(MOMENTUM, 1.0, total_steps=10**6)

    def update(t, o, step):
      m = jnp.asarray(schedule(step), jnp.float32)
      a = 1 - m
      return jax.tree.map(lambda x, y: _kernel.lerp(x, y, m, a), t, o)

    self.fn = jax.jit(update, donate_argnums=0)
    self.online = shared(tree, "jax_online")
    self.target = jax_tree(tree, 0)
    self.step = jnp.int32(0)

  def run(self):
    jax, _ = _jax()
    self.target = self.fn(self.target, self.online, self.step)
    jax.block_until_ready(self.target)


K_INNER = 8


class JepaInStep(Variant):
  name = f"jepa_ema in train step (per update, K={K_INNER})"

  def per_call(self):
    return K_INNER

  def setup(self, tree):
    jax, _ = _jax()
    import jepa_ema

    ema = jepa_ema.ema(MOMENTUM)

    def many(state, online):
      return jax.lax.fori_loop(
        0, K_INNER, lambda i, s: ema.update(online, s), state
      )

    self.fn = jax.jit(many, donate_argnums=0)
    self.online = self._online(tree)
    self.state = fresh_state(self._target(tree))

  def _online(self, tree):
    return shared(tree, "jax_online")

  def _target(self, tree):
    return jax_tree(tree, 0)

  def run(self):
    jax, _ = _jax()
    self.state = self.fn(self.state, self.online)
    jax.block_until_ready(self.state)


class FlatInStep(JepaInStep):
  name = f"flat buffer in train step (per update, K={K_INNER})"

  def _flat(self, tree, seed):
    _, jnp = _jax()
    return {
      "flat": jnp.asarray(
        np.random.default_rng(seed).standard_normal(
          num_params(tree), dtype=np.float32
        )
      )
    }

  def _online(self, tree):
    return self._flat(tree, 1)

  def _target(self, tree):
    return self._flat(tree, 0)


class JitTreeMapNoDonate(Variant):
  name = "jit tree_map (no donation)"

  def setup(self, tree):
    jax, _ = _jax()
    self.fn = jax.jit(hand_ema)
    self.online = shared(tree, "jax_online")
    self.target = shared(tree, "jax_target")  # not written: shared

  def run(self):
    jax, _ = _jax()
    new = self.fn(self.target, self.online)  # a new model-sized output
    jax.block_until_ready(new)
    del new


class JitTreeMapDonate(JitTreeMapNoDonate):
  name = "jit tree_map (donated)"

  def setup(self, tree):
    super().setup(tree)
    jax, _ = _jax()
    self.fn = jax.jit(hand_ema, donate_argnums=0)
    self.target = jax_tree(tree, 0)  # written in place: its own

  def run(self):
    jax, _ = _jax()
    self.target = self.fn(self.target, self.online)
    jax.block_until_ready(self.target)


class UnguardedLerp(JitTreeMapDonate):
  """jepa_ema's kernel before the overflow fix (the two-sided lerp without
  the overflow and equal-value selects), donated: what the guards cost."""

  name = "two-sided lerp, unguarded (donated)"

  def setup(self, tree):
    super().setup(tree)
    jax, jnp = _jax()
    from kernel_formulas import two_sided

    m = jnp.float32(MOMENTUM)
    self.fn = jax.jit(
      lambda t, o: jax.tree.map(lambda a, b: two_sided(a, b, m), t, o),
      donate_argnums=0,
    )


class EagerTreeMap(JitTreeMapNoDonate):
  name = "eager tree_map"

  def setup(self, tree):
    super().setup(tree)
    self.fn = hand_ema


class OptaxIncremental(JitTreeMapNoDonate):
  name = "optax.incremental_update (jit)"

  def setup(self, tree):
    super().setup(tree)
    jax, _ = _jax()
    import optax

    self.fn = jax.jit(
      lambda t, o: optax.incremental_update(o, t, step_size=1 - MOMENTUM)
    )


class Bf16Params(JepaWrapper):
  name = "jepa_ema bf16 params, f32 target"
  bytes_per_param = 10

  def setup(self, tree):
    _, jnp = _jax()
    import jepa_ema

    self.update = jepa_ema.ema(MOMENTUM, dtype=jnp.float32).jit()
    self.online = jax_tree(tree, 1, jnp.bfloat16)
    self.state = fresh_state(jax_tree(tree, 0))  # float32 target


class DispatchFloor(Variant):
  name = "jit dispatch floor (identity, donated)"
  bytes_per_param = 0

  def setup(self, tree):
    jax, jnp = _jax()
    self.fn = jax.jit(lambda t: jax.tree.map(lambda x: x, t), donate_argnums=0)
    self.target = jax_tree(tree, 0)

  def run(self):
    jax, _ = _jax()
    self.target = self.fn(self.target)
    jax.block_until_ready(self.target)


class TorchLerp(Variant):
  name = "torch _foreach_lerp_"

  def setup(self, tree):
    import torch

    self.torch = torch
    rng = np.random.default_rng(0)
    self.t = [
      torch.from_numpy(rng.standard_normal(s, dtype=np.float32))
      for s in tree_shapes(tree).values()
    ]
    self.o = shared(tree, "torch_online")

  def run(self):
    with self.torch.no_grad():
      self.torch._foreach_lerp_(self.t, self.o, 1 - MOMENTUM)


class TorchMulAdd(TorchLerp):
  name = "torch mul_+add_ (I-JEPA)"

  def run(self):
    with self.torch.no_grad():
      self.torch._foreach_mul_(self.t, MOMENTUM)
      self.torch._foreach_add_(self.t, self.o, alpha=1 - MOMENTUM)


def torch_available() -> bool:
  try:
    import torch  # noqa: F401

    return True
  except ImportError:
    return False


# Only informative for many small leaves (and a memory burden for ViT-L).
SMALL_TREE_ONLY = ("FlatInStep", "DispatchFloor", "RooflineXla", "EagerTreeMap")


def variants_for(tree: str) -> list[type[Variant]]:
  if num_params(tree) > 100e6:
    return [c for c in all_variants() if c.__name__ not in SMALL_TREE_ONLY]
  return all_variants()


def all_variants() -> list[type[Variant]]:
  out = [
    Roofline,
    RooflineXla,
    BareTreeMap,
    HandKernel,
    JepaWrapper,
    JepaBound,
    JepaPure,
    JepaInStep,
    FlatInStep,
    JitTreeMapDonate,
    UnguardedLerp,
    JitTreeMapNoDonate,
    OptaxIncremental,
    EagerTreeMap,
    Bf16Params,
    DispatchFloor,
  ]
  if torch_available():
    out += [RooflineTorch, TorchLerp, TorchMulAdd]
  return out


# ------------------------------------------------------------------- timing


def time_interleaved(
  tree: str, variants: list[Variant], repeats: int, budget_s: float
) -> dict[str, list[float]]:
  """Round-robin: each round times one call of every variant."""
  for v in variants:
    v.setup(tree)
    v.run()  # compile / warm up
    v.run()
  times: dict[str, list[float]] = {v.name: [] for v in variants}
  t_end = time.perf_counter() + budget_s
  for r in range(repeats):
    for v in variants:
      t0 = time.perf_counter()
      v.run()
      times[v.name].append((time.perf_counter() - t0) / v.per_call())
    if r >= 2 and time.perf_counter() > t_end:
      break
  return times


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return -1


def memory_child(tree: str, variant_name: str) -> None:
  """In a fresh process, two numbers beyond the two model copies:

  * ``held``: what the process holds after the first call beyond the RSS
    right after the buffers were built (the compiled program and compiler
    heap, plus any model-sized buffer the variant keeps, such as the cached
    output of a jit without donation);
  * ``peak``: what one more update allocates on top of that (the kernel's
    peak-RSS counter is reset through ``/proc/self/clear_refs``, then three
    updates run).
  """
  cls = {c.name: c for c in all_variants()}[variant_name]
  v = cls()
  v.setup(tree)
  gc.collect()
  after_setup = _status("VmRSS")
  v.run()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak) to the current RSS
  base = _status("VmRSS")
  for _ in range(3):
    v.run()
  peak = _status("VmHWM")
  print(
    json.dumps(
      {
        "held_bytes": base - after_setup,
        "peak_bytes": peak - base,
        "copy_bytes": num_params(tree) * 4,
      }
    )
  )


def memory_of(tree: str, variant_name: str) -> dict[str, float] | None:
  proc = subprocess.run(
    [sys.executable, __file__, "--memory-child", tree, variant_name],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  if proc.returncode != 0:
    print(
      f"  (memory run failed for {variant_name}: "
      f"{proc.stderr.strip().splitlines()[-1:]})",
      file=sys.stderr,
    )
    return None
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  return {
    "held": res["held_bytes"] / res["copy_bytes"],
    "peak": res["peak_bytes"] / res["copy_bytes"],
  }


# ------------------------------------------------------------------ in step


def instep(tree: str, repeats: int) -> dict[str, Any]:
  """What the EMA adds to a jitted AdamW step: XLA's "bytes accessed" per
  parameter (cost analysis of the compiled step) and the fastest of
  ``repeats`` interleaved rounds, for the step alone, with ``track_ema``
  last in the chain, and with ``ema().update`` after ``apply_updates``."""
  jax, jnp = _jax()
  import optax

  import jepa_ema

  n = num_params(tree)
  adamw = optax.adamw(1e-3)
  chained = optax.chain(optax.adamw(1e-3), jepa_ema.track_ema(MOMENTUM))
  ema = jepa_ema.ema(MOMENTUM)

  def plain(p, s, g):
    u, s = adamw.update(g, s, p)
    return optax.apply_updates(p, u), s

  def tracked(p, s, g):
    u, s = chained.update(g, s, p)
    return optax.apply_updates(p, u), s

  def separate(p, s, g):
    (opt, es) = s
    u, opt = adamw.update(g, opt, p)
    p = optax.apply_updates(p, u)
    return p, (opt, ema.update(p, es))

  grads = jax.tree.map(lambda x: x * 1e-3, shared(tree, "jax_online"))
  cases = {
    "AdamW step alone": (plain, adamw.init),
    "+ track_ema (last in the chain)": (tracked, chained.init),
    "+ ema().update after apply_updates": (
      separate,
      lambda p: (adamw.init(p), ema.init(p)),
    ),
  }
  fns, states, out = {}, {}, {}
  for name, (f, init) in cases.items():
    params = jax_tree(tree, 0)
    state = init(params)
    fns[name] = jax.jit(f, donate_argnums=(0, 1))
    compiled = fns[name].lower(params, state, grads).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[name] = {"bytes_per_param": cost["bytes accessed"] / n}
    states[name] = fns[name](params, state, grads)
    jax.block_until_ready(states[name])
  times: dict[str, list[float]] = {k: [] for k in cases}
  for _ in range(repeats):
    for name in cases:
      t0 = time.perf_counter()
      states[name] = fns[name](*states[name], grads)
      jax.block_until_ready(states[name])
      times[name].append(time.perf_counter() - t0)
  base = min(times["AdamW step alone"])
  for name in cases:
    out[name]["ms_min"] = min(times[name]) * 1e3
    out[name]["vs_alone"] = min(times[name]) / base
  return out


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--quick",
    action="store_true",
    help="ViT-S/16 and 1000 leaves only, few repeats (< 1 min)",
  )
  p.add_argument(
    "--trees",
    default=None,
    help="comma-separated subset of vit_s16,vit_b16,vit_l16,small1000",
  )
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--no-memory", action="store_true")
  p.add_argument(
    "--no-instep",
    action="store_true",
    help="skip the AdamW-step table (bytes per parameter and time)",
  )
  p.add_argument(
    "--json",
    default=None,
    help="write the results here (make bench: benchmarks/results.json)",
  )
  p.add_argument("--markdown", default=None)
  p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.memory_child:
    memory_child(*args.memory_child)
    return {}

  from tqdm.auto import tqdm

  trees = (
    args.trees.split(",")
    if args.trees
    else (
      ["vit_s16", "small1000"]
      if args.quick
      else ["vit_s16", "vit_b16", "vit_l16", "small1000"]
    )
  )
  for t in trees:
    if t not in VITS and t != "small1000":
      p.error(f"unknown tree {t!r}")
  repeats = args.repeats or (5 if args.quick else 25)
  jax, _ = _jax()
  meta = {
    "machine": platform.machine(),
    "cpus": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.devices()[0].platform,
    "torch": torch_available() and __import__("torch").__version__,
  }
  print(f"# EMA update benchmark ({meta})\n")
  results: dict[str, Any] = {"meta": meta, "trees": {}}
  lines = []
  for tree in trees:
    n = num_params(tree)
    variants = [c() for c in variants_for(tree)]
    budget = 6 if args.quick else 90
    times = time_interleaved(tree, variants, repeats, budget)
    del variants  # free the buffers before the memory subprocesses
    _SHARED.clear()
    gc.collect()
    variants = [c() for c in variants_for(tree)]
    med = {k: statistics.median(v) for k, v in times.items()}
    # The roofline: the best flat 2-read-1-write pass measured in this run.
    roof = min(t for k, t in med.items() if k.startswith(ROOF_PREFIX))
    torch_ref = med.get(TorchLerp.name)
    bare_min = (
      min(times[BareTreeMap.name]) if BareTreeMap.name in times else None
    )
    rows = {}
    mem_variants = [
      v
      for v in variants
      if not args.no_memory and not isinstance(v, DispatchFloor)
    ]
    if args.quick:  # a fresh process per variant costs ~8 s: the key one
      mem_variants = (
        []
        if tree == "small1000"
        else [v for v in mem_variants if type(v) is JepaWrapper]
      )
    mem_iter = tqdm(
      mem_variants, desc=f"memory {tree}", leave=False, disable=args.quick
    )
    mem = {v.name: memory_of(tree, v.name) for v in mem_iter}
    for v in variants:
      t = med[v.name]
      bytes_moved = v.bytes_per_param * n
      rows[v.name] = {
        "ms_median": t * 1e3,
        "ms_min": min(times[v.name]) * 1e3,
        "gb_s": bytes_moved / t / 1e9 if bytes_moved else None,
        "vs_roofline": (
          roof / t * v.bytes_per_param / 12 if v.bytes_per_param else None
        ),
        "vs_torch_lerp": torch_ref / t if torch_ref else None,
        # Fastest round against fastest round: the least noisy same-run ratio.
        "vs_bare_min": (
          bare_min / min(times[v.name])
          if bare_min and v.bytes_per_param == 12
          else None
        ),
        "extra_mem": mem.get(v.name),
        "samples": len(times[v.name]),
      }
    results["trees"][tree] = {
      "params": n,
      "leaves": len(tree_shapes(tree)),
      "rows": rows,
    }
    head = (
      f"\n## {tree}: {n / 1e6:.1f} M float32 params, "
      f"{len(tree_shapes(tree))} leaves, {12 * n / 1e9:.2f} GB moved "
      f"per update (roofline measured in this run: {12 * n / roof / 1e9:.1f} "
      "GB/s)\n\n| variant | ms (median) | ms (fastest) | GB/s | x roofline | "
      "x bare tree_map (fastest) | x torch lerp | held after 1st call | "
      "peak per update |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines.append(head)
    print(head)
    for name, r in rows.items():
      fmt = lambda x, f: "-" if x is None else format(x, f)
      mem = r["extra_mem"]
      mem_s = (
        "- | -"
        if mem is None
        else f"{100 * mem['held']:.1f}% | {100 * mem['peak']:.1f}%"
      )
      line = (
        f"| {name} | {r['ms_median']:.2f} | {r['ms_min']:.2f} | "
        f"{fmt(r['gb_s'], '.1f')} | {fmt(r['vs_roofline'], '.2f')} | "
        f"{fmt(r['vs_bare_min'], '.3f')} | "
        f"{fmt(r['vs_torch_lerp'], '.2f')} | {mem_s} |"
      )
      lines.append(line)
      print(line, flush=True)
  if not args.no_instep:
    tree = "vit_s16" if args.quick else "vit_b16"
    res = instep(tree, repeats)
    results["instep"] = {"tree": tree, "rows": res}
    base = res["AdamW step alone"]["bytes_per_param"]
    head = (
      f"\n## In a jitted AdamW step ({tree}, fastest of {repeats} rounds)\n\n"
      "| step | bytes accessed per param (XLA) | marginal | ms (fastest) "
      "| x the step alone |\n|---|---|---|---|---|"
    )
    lines.append(head)
    print(head)
    for name, r in res.items():
      line = (
        f"| {name} | {r['bytes_per_param']:.1f} | "
        f"{r['bytes_per_param'] - base:+.1f} | {r['ms_min']:.1f} | "
        f"{r['vs_alone']:.3f} |"
      )
      lines.append(line)
      print(line, flush=True)
  if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write("\n".join(lines) + "\n")
  return results


if __name__ == "__main__":
  main()
