"""One prepared check of jepa_ema on whatever device JAX finds (GPU, TPU, CPU).

Made for a short loan of an accelerator: one command, no input, progress with
timestamps, a time budget (``--budget-s``) that shrinks repetitions and skips
what no longer fits (most important first), and JSON + markdown in ``--out``.

What it measures (median ms per EMA step; bytes per parameter: 12 for float32
params and target, 10 for bfloat16 params with a float32 target):

* **roofline**: one flat donated ``t + o`` over a buffer of the model's size
  (2 reads + 1 write) and a device-to-device copy (1 read + 1 write), GB/s;
* **ViT-B/16, ViT-L/16, ViT-g/14 (~1B params)**, float32 and bfloat16 params
  with a float32 target: ``make_ema_update``, ``ema().jit()``, ``ema().update``
  inside a jitted train-step stand-in (8 updates per call), ``optax
  .incremental_update`` and a jitted ``tree_map`` (both without donation),
  and torch ``_foreach_lerp_`` on the same device when torch sees a GPU; GB/s
  and the ratios to the roofline and to torch;
* **the targets XLA:CPU cannot reach** (ViT-B/16, float32): ``drift=True`` and
  ``drift=10`` over the plain update (goal < 1.10x); three momenta in one
  ``ema`` over three EMAs (ideal 28/36 = 0.78x); 1000 x 1024 leaves inside a
  step over one flat buffer of the same size; ``every=4`` per step over the
  plain update; bfloat16 stochastic rounding over round-to-nearest;
* **the target's placement** (ViT-L/16, float32): ``ema().jit()`` with the
  target in ``memory_kind="pinned_host"``, updated every step and with
  ``every=10`` (per step), against the target in device memory; and the
  compiled update's per-device memory (``memory_analysis``: arguments,
  outputs, temporaries, host arguments) for each. One device, so of the
  scale layouts of ``scale_bench.py`` only the memory-kind part applies: a
  target sharded over a one-device mesh is the target on that device;
* **structure on the device**: one trace per configuration over many steps,
  the donated target written in place (the same buffer pointers), and the
  compiled update's scratch memory (XLA's ``memory_analysis``) as a share of
  one model copy (goal < 5 %).

Usage::

  python benchmarks/device_check.py --out results/ [--budget-s 300]
  python benchmarks/device_check.py --tiny --out /tmp/dc   # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ema_bench  # noqa: E402  (the ViT tree shapes)

# (width, depth, mlp width, patch) of the ViTs at 224 px (timm layout).
TREES = {
  "vit_b16": (768, 12, 3072, 16),
  "vit_l16": (1024, 24, 4096, 16),
  "vit_g14": (1408, 40, 6144, 14),
}
TINY = {"tiny_a": (64, 2, 256, 16), "tiny_b": (96, 2, 384, 16)}
MOMENTUM = 0.996
IN_STEP = 8  # EMA updates per call of the train-step stand-in

T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def shapes(spec: tuple[int, int, int, int]) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of the ViT ``(width, depth, mlp width, patch)``."""
  return ema_bench.vit_shapes(*spec)


def n_params(sh: dict[str, tuple[int, ...]]) -> int:
  return int(sum(math.prod(s) for s in sh.values()))


class Budget:
  """Shares the time left among the measurements still to come."""

  def __init__(self, total_s: float, planned: int):
    self.end = time.perf_counter() + total_s
    self.left = planned

  def slot(self) -> float:
    s = max(self.end - time.perf_counter(), 0.0) / max(self.left, 1)
    self.left = max(self.left - 1, 0)
    return s

  def over(self) -> bool:
    return time.perf_counter() > self.end


def timeit(
  run: Callable[[], Any], slot_s: float, min_reps: int = 3, max_reps: int = 30
) -> float:
  """Median seconds of ``run()`` (synchronous) after one warm-up call."""
  run()
  times: list[float] = []
  stop = time.perf_counter() + slot_s
  while len(times) < max_reps and (
    len(times) < min_reps or time.perf_counter() < stop
  ):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# --------------------------------------------------------------- the check


class Check:
  def __init__(
    self,
    trees: dict[str, tuple[int, int, int, int]],
    budget: Budget,
    tiny: bool,
  ):
    import jax
    import jax.numpy as jnp

    self.jax, self.jnp = jax, jnp
    import jepa_ema

    self.je = jepa_ema
    self.trees, self.budget, self.tiny = trees, budget, tiny
    self.res: dict[str, Any] = {
      "roofline": {},
      "trees": {},
      "blocked": {},
      "structure": {},
      "placement": {},
      "skipped": [],
    }
    # ViT-L for the placement cases (the last tree of a tiny run).
    self.placement_tree = "vit_l16" if "vit_l16" in trees else list(trees)[-1]
    self.torch = self._torch()

  def _torch(self) -> Any:
    try:
      import torch

      return torch if torch.cuda.is_available() else None
    except Exception:  # pylint: disable=broad-except
      return None

  def make(self, sh: dict, dtype: Any, seed: int) -> dict:
    jax, jnp = self.jax, self.jnp
    key = jax.random.key(seed)
    out = {}
    for i, (k, s) in enumerate(sh.items()):
      out[k] = jax.random.normal(
        jax.random.fold_in(key, i), s, jnp.float32
      ).astype(dtype)
    return jax.block_until_ready(out)

  # -- roofline

  def roofline(self, n: int) -> dict[str, float]:
    jax, jnp = self.jax, self.jnp
    # Constants, not jax.random: generating 1e9 normals at once materialises
    # several model-sized temporaries (it ran a 24 GB host out of memory).
    t = jnp.full((n,), 1.0, jnp.float32)
    o = jnp.full((n,), 0.5, jnp.float32)
    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    copy = jax.jit(lambda a: a * jnp.float32(1.0))
    box = [t]

    def run_add():
      box[0] = add(box[0], o)
      box[0].block_until_ready()

    def run_copy():
      copy(o).block_until_ready()

    add_s = timeit(run_add, self.budget.slot())
    copy_s = timeit(run_copy, self.budget.slot())
    return {
      "add_GBps": 12 * n / add_s / 1e9,
      "copy_GBps": 8 * n / copy_s / 1e9,
      "add_ms": add_s * 1e3,
      "copy_ms": copy_s * 1e3,
    }

  # -- one tree, one dtype mode

  def variants(self, sh: dict, mode: str) -> dict[str, float]:
    jax, jnp, je = self.jax, self.jnp, self.je
    import optax

    pdtype = jnp.float32 if mode == "f32" else jnp.bfloat16
    online = self.make(sh, pdtype, 1)
    out: dict[str, float] = {}

    def measure(
      name: str, setup: Callable[[], Callable[[], None]], per_call: int = 1
    ) -> None:
      if self.budget.over():
        self.res["skipped"].append(f"{mode} {name}")
        self.budget.slot()
        return
      run = setup()
      out[name] = timeit(run, self.budget.slot()) / per_call * 1e3
      del run

    def bound():
      f = je.make_ema_update(MOMENTUM)
      box = [self.make(sh, jnp.float32, 0), 0]

      def run():
        box[0] = f(box[0], online, box[1])
        box[1] += 1
        jax.block_until_ready(box[0])

      return run

    def wrapper():
      ema = je.ema(MOMENTUM, dtype=jnp.float32)
      upd = ema.jit()
      box = [ema.init(self.make(sh, jnp.float32, 0))]

      def run():
        box[0] = upd(online, box[0])
        jax.block_until_ready(box[0])

      return run

    def in_step():
      ema = je.ema(MOMENTUM, dtype=jnp.float32)

      def body(state, params):
        return jax.lax.fori_loop(
          0, IN_STEP, lambda _, s: ema.update(params, s), state
        )

      step = jax.jit(body, donate_argnums=0)
      box = [ema.init(self.make(sh, jnp.float32, 0))]

      def run():
        box[0] = step(box[0], online)
        jax.block_until_ready(box[0])

      return run

    def incremental():
      f = jax.jit(
        lambda t, o: optax.incremental_update(
          jax.tree.map(lambda x: x.astype(jnp.float32), o), t, 1 - MOMENTUM
        )
      )
      target = self.make(sh, jnp.float32, 0)

      def run():
        jax.block_until_ready(f(target, online))

      return run

    def tree_map():
      f = jax.jit(
        lambda t, o: jax.tree.map(
          lambda a, b: MOMENTUM * a + (1 - MOMENTUM) * b.astype(a.dtype), t, o
        )
      )
      target = self.make(sh, jnp.float32, 0)

      def run():
        jax.block_until_ready(f(target, online))

      return run

    measure("make_ema_update", bound)
    measure("ema().jit()", wrapper)
    measure("ema().update in a jitted step", in_step, IN_STEP)
    measure("optax.incremental_update (jit, no donation)", incremental)
    measure("jit tree_map (no donation)", tree_map)
    if self.torch is not None:
      measure("torch _foreach_lerp_", lambda: self._torch_run(online, mode))
    return out

  def _torch_run(self, online: dict, mode: str) -> Callable[[], None]:
    torch = self.torch
    dev = torch.device("cuda")
    tdtype = torch.float32 if mode == "f32" else torch.bfloat16
    onl = [
      torch.randn(x.shape, device=dev, dtype=tdtype) for x in online.values()
    ]
    tgt = [
      torch.randn(x.shape, device=dev, dtype=torch.float32)
      for x in online.values()
    ]

    def run():
      with torch.no_grad():
        src = onl if mode == "f32" else [o.float() for o in onl]
        torch._foreach_lerp_(tgt, src, 1 - MOMENTUM)
      torch.cuda.synchronize()

    return run

  # -- the targets XLA:CPU cannot reach

  def blocked(self, sh: dict) -> dict[str, Any]:
    jax, jnp, je = self.jax, self.jnp, self.je
    online = self.make(sh, jnp.float32, 1)
    n = n_params(sh)

    def stateful(
      ema: Any, params: Any, calls: int = 1, tgt_dtype: Any = jnp.float32
    ) -> float:
      if self.budget.over():
        self.budget.slot()
        return float("nan")
      upd = ema.jit()
      with warnings.catch_warnings():  # bf16 nearest is measured on purpose
        warnings.simplefilter("ignore", je.PrecisionWarning)
        box = [
          ema.init(
            jax.tree.map(
              lambda x: x.astype(tgt_dtype), self.make(sh, jnp.float32, 0)
            )
          )
        ]

      def run():
        for _ in range(calls):
          box[0] = upd(params, box[0])
        jax.block_until_ready(box[0])

      return timeit(run, self.budget.slot()) / calls * 1e3

    plain = stateful(je.ema(MOMENTUM), online)
    out: dict[str, Any] = {"plain update ms": plain}
    out["drift=True / plain"] = (
      stateful(je.ema(MOMENTUM, drift=True), online) / plain
    )
    out["drift=10 / plain"] = (
      stateful(je.ema(MOMENTUM, drift=10), online, calls=10) / plain
    )
    three = stateful(je.ema((0.99, 0.996, 0.999)), online)
    out["3 momenta in one ema / 3 EMAs (ideal 0.78)"] = three / (3 * plain)
    out["every=4 per step / plain"] = (
      stateful(je.ema(MOMENTUM, every=4), online, calls=4) / plain
    )
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), online)
    near = stateful(je.ema(0.999), bf16, tgt_dtype=jnp.bfloat16)
    sto = stateful(
      je.ema(0.999, rounding="stochastic"), bf16, tgt_dtype=jnp.bfloat16
    )
    out["bf16 stochastic / nearest"] = sto / near
    # Many small leaves inside a step against one flat buffer.
    leaves = 64 if self.tiny else 1000
    many = {f"l{i:04d}": (1024,) for i in range(leaves)}
    flat = {"flat": (leaves * 1024,)}

    def in_step(sh2: dict) -> float:
      if self.budget.over():
        self.budget.slot()
        return float("nan")
      ema = je.ema(MOMENTUM)
      params = self.make(sh2, jnp.float32, 1)
      step = jax.jit(
        lambda s, p: jax.lax.fori_loop(
          0, IN_STEP, lambda _, st: ema.update(p, st), s
        ),
        donate_argnums=0,
      )
      box = [ema.init(self.make(sh2, jnp.float32, 0))]

      def run():
        box[0] = step(box[0], params)
        jax.block_until_ready(box[0])

      return timeit(run, self.budget.slot()) / IN_STEP * 1e3

    m_ms, f_ms = in_step(many), in_step(flat)
    out[f"{leaves} x 1024 leaves / one flat buffer, in a step"] = m_ms / f_ms
    out["bytes/param"] = 12
    out["plain GBps"] = 12 * n / plain * 1e3 / 1e9
    return out

  # -- structure

  def structure(self, sh: dict) -> dict[str, Any]:
    jax, jnp, je = self.jax, self.jnp, self.je
    online = self.make(sh, jnp.float32, 1)
    out: dict[str, Any] = {}
    for name, ema in (
      ("plain", je.ema(MOMENTUM)),
      ("drift=10, every=2", je.ema(MOMENTUM, drift=10, every=2)),
    ):
      traces = []

      def step(params, state, ema=ema, traces=traces):
        traces.append(1)
        return ema.update(params, state)

      upd = jax.jit(step, donate_argnums=1)
      state = ema.init(self.make(sh, jnp.float32, 0))
      try:
        before = [
          x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.target)
        ]
      except Exception:  # pylint: disable=broad-except
        before = None
      for _ in range(5):
        state = upd(online, state)
      jax.block_until_ready(state)
      in_place = None
      if before is not None:
        after = [
          x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.target)
        ]
        in_place = before == after
      scratch = None
      try:
        compiled = (
          jax.jit(ema.update, donate_argnums=1).lower(online, state).compile()
        )
        analysis = compiled.memory_analysis()
        scratch = float(analysis.temp_size_in_bytes) / (4 * n_params(sh))
      except Exception:  # pylint: disable=broad-except
        pass
      out[name] = {
        "traces over 5 steps": len(traces),
        "donated target in place": in_place,
        "scratch / model copy": scratch,
      }
    return out

  # -- the target's placement

  def placement(self, sh: dict) -> dict[str, Any]:
    """Offloaded target (``pinned_host``) against the target on the device,
    every step and every 10th; memory per device from XLA."""
    jax, jnp, je = self.jax, self.jnp, self.je
    kinds = {str(m.kind) for m in jax.devices()[0].addressable_memories()}
    out: dict[str, Any] = {"memory kinds of the device": sorted(kinds)}
    if "pinned_host" not in kinds:
      self.res["skipped"].append("placement (no pinned_host memory)")
      return out
    online = self.make(sh, jnp.float32, 1)
    n = n_params(sh)
    cases = {
      "device, every=1": (je.ema(MOMENTUM), 1),
      "pinned_host, every=1": (je.ema(MOMENTUM, memory_kind="pinned_host"), 1),
      "pinned_host, every=10": (
        je.ema(MOMENTUM, memory_kind="pinned_host", every=10),
        10,
      ),
      "device, every=10": (je.ema(MOMENTUM, every=10), 10),
    }
    ms: dict[str, float] = {}
    mem: dict[str, Any] = {}
    for name, (ema, calls) in cases.items():
      if self.budget.over():
        self.res["skipped"].append(f"placement {name}")
        self.budget.slot()
        continue
      upd = ema.jit()
      box = [ema.init(self.make(sh, jnp.float32, 0))]
      try:
        analysis = upd.lower(online, box[0]).compile().memory_analysis()
        mem[name] = {
          k: int(getattr(analysis, k))
          for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "host_argument_size_in_bytes",
            "host_temp_size_in_bytes",
          )
          if hasattr(analysis, k)
        }
      except Exception:  # pylint: disable=broad-except
        mem[name] = None

      def run(upd=upd, box=box, calls=calls):
        for _ in range(calls):
          box[0] = upd(online, box[0])
        jax.block_until_ready(box[0])

      ms[name] = timeit(run, self.budget.slot()) / calls * 1e3
      out[f"{name} target kind"] = str(
        jax.tree.leaves(box[0].target)[0].sharding.memory_kind
      )
      del box, run
    out["ms per step"] = ms
    out["memory per device"] = mem
    out["model copy bytes"] = 4 * n
    dev = ms.get("device, every=1")
    if dev:
      for name in ("pinned_host, every=1", "pinned_host, every=10"):
        if name in ms:
          out[f"{name} / device, every=1"] = ms[name] / dev
    if "pinned_host, every=1" in ms:
      # host <-> device traffic of one offloaded update: the target both ways
      out["pinned_host, every=1 GBps (8 bytes/param moved)"] = (
        8 * n / (ms["pinned_host, every=1"] / 1e3) / 1e9
      )
    return out

  # -- all

  def run(self) -> dict[str, Any]:
    jax = self.jax
    first = next(iter(self.trees))
    log(
      f"jax {jax.__version__}, backend {jax.default_backend()}, devices "
      f"{jax.devices()}; torch on GPU: {self.torch is not None}"
    )
    for name, spec in self.trees.items():
      sh = shapes(spec)
      n = n_params(sh)
      if self.budget.over():
        self.res["skipped"].append(name)
        continue
      log(f"{name}: {n / 1e6:.1f} M params: roofline")
      roof = self.roofline(n)
      self.res["roofline"][name] = roof
      log(
        f"{name}: add {roof['add_GBps']:.1f} GB/s, copy "
        f"{roof['copy_GBps']:.1f} GB/s"
      )
      if name == first:
        log(f"{name}: the blocked targets")
        self.res["blocked"] = self.blocked(sh)
        log(f"{name}: structure")
        self.res["structure"] = self.structure(sh)
      if name == self.placement_tree:
        log(f"{name}: the target's placement (pinned_host vs device)")
        self.res["placement"] = {"tree": name, **self.placement(sh)}
      self.res["trees"][name] = {"params": n}
      for mode in ("f32", "bf16 params, f32 target"):
        log(f"{name}: {mode}")
        ms = self.variants(sh, "f32" if mode == "f32" else "bf16")
        bpp = 12 if mode == "f32" else 10
        rows = {}
        for k, v in ms.items():
          gbps = bpp * n / (v / 1e3) / 1e9
          rows[k] = {
            "ms": v,
            "GBps": gbps,
            "vs roofline": gbps / roof["add_GBps"],
          }
        torch_ms = ms.get("torch _foreach_lerp_")
        for row in rows.values():
          row["vs torch"] = (torch_ms / row["ms"]) if torch_ms else None
        self.res["trees"][name][mode] = rows
        for k, row in rows.items():
          log(
            f"  {k}: {row['ms']:.3f} ms, {row['GBps']:.1f} GB/s, "
            f"{row['vs roofline']:.2f}x roofline"
          )
    return self.res


def markdown(res: dict[str, Any]) -> str:
  m = res["meta"]
  lines = [
    f"# device_check: {m['backend']} ({m['device']}), jax {m['jax']}",
    "",
    f"{m['seconds']:.0f} s, budget {m['budget_s']:.0f} s"
    + (f"; skipped for the budget: {res['skipped']}" if res["skipped"] else ""),
    "",
    "## Roofline (GB/s)",
    "",
    "| tree size | t + o (donated) | copy |",
    "|---|---|---|",
  ]
  for k, r in res["roofline"].items():
    lines.append(f"| {k} | {r['add_GBps']:.1f} | {r['copy_GBps']:.1f} |")
  for tree, modes in res["trees"].items():
    for mode, rows in modes.items():
      if mode == "params":
        continue
      lines += [
        "",
        f"## {tree} ({modes['params'] / 1e6:.0f} M params), {mode}",
        "",
        "| variant | ms | GB/s | vs roofline | vs torch |",
        "|---|---|---|---|---|",
      ]
      for k, r in rows.items():
        vt = f"{r['vs torch']:.2f}x" if r["vs torch"] else "–"
        lines.append(
          f"| {k} | {r['ms']:.3f} | {r['GBps']:.1f} | "
          f"{r['vs roofline']:.2f}x | {vt} |"
        )
  lines += [
    "",
    "## The targets XLA:CPU cannot reach",
    "",
    "| ratio | value |",
    "|---|---|",
  ]
  lines += [f"| {k} | {v:.3f} |" for k, v in res["blocked"].items()]
  lines += [
    "",
    "## Structure",
    "",
    "| configuration | traces over 5 steps | "
    "donated target in place | scratch / model copy |",
    "|---|---|---|---|",
  ]
  for k, v in res["structure"].items():
    sc = v["scratch / model copy"]
    lines.append(
      f"| {k} | {v['traces over 5 steps']} | "
      f"{v['donated target in place']} | "
      f"{'–' if sc is None else f'{100 * sc:.2f} %'} |"
    )
  pl = res.get("placement") or {}
  if pl.get("ms per step"):
    lines += [
      "",
      f"## The target's placement ({pl['tree']}, float32, one device)",
      "",
      "| case | ms per step | arguments / host arguments / temp (MB) |",
      "|---|---|---|",
    ]
    for k, v in pl["ms per step"].items():
      mem = pl["memory per device"].get(k) or {}
      sizes = " / ".join(
        f"{mem[f] / 2**20:.1f}" if f in mem else "–"
        for f in (
          "argument_size_in_bytes",
          "host_argument_size_in_bytes",
          "temp_size_in_bytes",
        )
      )
      lines.append(f"| {k} | {v:.3f} | {sizes} |")
    lines += [""] + [
      f"* {k}: {v:.3f}"
      for k, v in pl.items()
      if k.endswith("every=1") or k.endswith("moved)")
    ]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--out",
    type=pathlib.Path,
    required=True,
    help="directory for device_check.json / device_check.md",
  )
  p.add_argument("--budget-s", type=float, default=300.0)
  p.add_argument(
    "--tiny",
    action="store_true",
    help="small trees: the same code paths in seconds (CPU)",
  )
  p.add_argument(
    "--trees", nargs="+", default=None, help=f"subset of {list(TREES)}"
  )
  args = p.parse_args(argv)
  trees = TINY if args.tiny else TREES
  if args.trees:
    unknown = set(args.trees) - set(trees)
    if unknown:
      p.error(f"unknown trees {sorted(unknown)}; choose from {list(trees)}")
    trees = {k: trees[k] for k in args.trees}
  # roofline 2 + 2 modes x 6 variants per tree; blocked ~10; structure;
  # placement 4.
  planned = len(trees) * 14 + 14
  check = Check(trees, Budget(args.budget_s, planned), args.tiny)
  res = check.run()
  import jax

  res["meta"] = {
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "jax": jax.__version__,
    "python": sys.version.split()[0],
    "machine": platform.machine(),
    "cpus": os.cpu_count(),
    "budget_s": args.budget_s,
    "tiny": args.tiny,
    "seconds": time.perf_counter() - T0,
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "device_check.json").write_text(json.dumps(res, indent=1))
  md = markdown(res)
  (args.out / "device_check.md").write_text(md)
  print(md)
  log(
    f"wrote {args.out / 'device_check.json'} and {args.out / 'device_check.md'}"
  )
  return res


if __name__ == "__main__":
  main()
