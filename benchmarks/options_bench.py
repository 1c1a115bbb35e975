"""The options of ``jepa_ema.ema``, measured side by side in one run.

Speed (one ViT/16-shaped float32 tree, every variant interleaved round by
round; ``ema(...).jit()``, state donated, as a user calls it):

* ``every=4``: the mean cost per training step over 4 steps, and the cost of
  a step that does not update (``lax.cond`` on the stored step);
* several momenta: ``ema((m1, m2, m3))`` in one call against three separate
  ``ema(m).jit()`` calls (memory traffic 4 + 8n = 28 against 12n = 36 bytes
  per parameter, if the compiler reads the params once). Run twice, in child
  processes: with XLA's default CPU flags and with
  ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=true``;
* ``drift=True`` / ``drift=10`` / ``drift=100`` (mean per step over whole
  intervals): against the plain update, and against the plain update
  followed by a separate jitted pass that computes the same norms;
* half-precision targets: float32 target of bfloat16 params
  (``dtype=float32``), bfloat16 and float16 targets rounded to nearest and
  stochastically.

Accuracy:

* ``every=k`` on a real optimisation trajectory (an MLP trained with AdamW on
  scikit-learn's digits): the distance of the ``every=k`` target and of the
  plain-skip target (ema-pytorch's ``update_every``: the per-step momentum on
  every k-th step) from the per-step target, relative to the per-step
  target's own lag behind the online params, for k = 2, 4, 8;
* half-precision stagnation: 2000 steps at m = 0.999 from 0 toward 1 (closed
  form 1 - 0.999**2000 = 0.8648): float32, bfloat16 and float16 targets
  rounded to nearest and stochastically.

Usage::

  python benchmarks/options_bench.py --quick   # ViT-S/16, fewer rounds (~1 min)
  python benchmarks/options_bench.py           # ViT-B/16 (~4 min)
  python benchmarks/options_bench.py --json benchmarks/options_results.json \
      --markdown benchmarks/options_results.md --plot docs/options_every.png
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ema_bench  # noqa: E402  (the tree shapes and roofline pass)

MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=true"
MOMENTA = (0.99, 0.996, 0.999)


def _jax():
  import jax
  import jax.numpy as jnp

  import jepa_ema

  return jax, jnp, jepa_ema


# ------------------------------------------------------------------- speed


def speed_variants(tree: str, section: str) -> dict[str, Callable[[], None]]:
  """name -> run() (one call, synchronous). Each holds its own buffers."""
  jax, jnp, jepa_ema = _jax()
  online = ema_bench.jax_tree(tree, 1)
  out: dict[str, Callable[[], None]] = {}

  def stateful(
    name: str,
    ema: Any,
    params: Any,
    reset_step: int | None = None,
    calls: int = 1,
  ) -> None:
    update = ema.jit()
    with warnings.catch_warnings():  # half-precision nearest: on purpose
      warnings.simplefilter("ignore", jepa_ema.PrecisionWarning)
      box = [
        ema.init(ema_bench.jax_tree(tree, 0, params[next(iter(params))].dtype))
      ]

    def run() -> None:
      state = box[0]
      if reset_step is not None:  # pin the step: always a non-update step
        state = state._replace(step=jnp.asarray(reset_step, jnp.int32))
      for _ in range(calls):
        state = update(params, state)
      jax.block_until_ready(state)
      box[0] = state

    run.calls = calls
    out[name] = run

  plain = jepa_ema.ema(MOMENTA[1])
  stateful("plain update", plain, online)
  if section == "several":
    three = [jepa_ema.ema(m) for m in MOMENTA]
    updates = [e.jit() for e in three]
    boxes = [e.init(ema_bench.jax_tree(tree, i)) for i, e in enumerate(three)]

    def separate() -> None:
      for i, u in enumerate(updates):
        boxes[i] = u(online, boxes[i])
      jax.block_until_ready(boxes)

    separate.calls = 1
    out["3 separate EMAs"] = separate
    stateful("ema((m1, m2, m3)), one call", jepa_ema.ema(MOMENTA), online)
    return out
  stateful(
    "every=4, mean per step", jepa_ema.ema(MOMENTA[1], every=4), online, calls=4
  )
  stateful(
    "every=4, a non-update step",
    jepa_ema.ema(MOMENTA[1], every=4),
    online,
    reset_step=0,
  )
  floor = jax.jit(lambda params, state: state, donate_argnums=1)
  fbox = [plain.init(ema_bench.jax_tree(tree, 3))]

  def dispatch_floor() -> None:  # what any jitted call of (params, state) costs
    fbox[0] = floor(online, fbox[0])
    jax.block_until_ready(fbox[0])

  dispatch_floor.calls = 1
  out["dispatch floor: jit returning the state"] = dispatch_floor
  stateful("drift=True", jepa_ema.ema(MOMENTA[1], drift=True), online)
  stateful(
    "drift=10, mean per step",
    jepa_ema.ema(MOMENTA[1], drift=10),
    online,
    calls=10,
  )
  stateful(
    "drift=100, mean per step",
    jepa_ema.ema(MOMENTA[1], drift=100),
    online,
    calls=100,
  )

  from jepa_ema import _drift

  norms = jax.jit(_drift.relative_distance)
  plain_update = plain.jit()
  box = [plain.init(ema_bench.jax_tree(tree, 2))]

  def plain_then_pass() -> None:
    box[0] = plain_update(online, box[0])
    jax.block_until_ready((box[0], norms(box[0].target, online)))

  plain_then_pass.calls = 1
  out["plain + separate drift pass"] = plain_then_pass

  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), online)
  stateful(
    "bf16 params, f32 target", jepa_ema.ema(0.999, dtype=jnp.float32), bf16
  )
  stateful("bf16 target, nearest", jepa_ema.ema(0.999), bf16)
  stateful(
    "bf16 target, stochastic", jepa_ema.ema(0.999, rounding="stochastic"), bf16
  )
  f16 = jax.tree.map(lambda x: x.astype(jnp.float16), online)
  stateful("f16 target, nearest", jepa_ema.ema(0.999), f16)
  stateful(
    "f16 target, stochastic", jepa_ema.ema(0.999, rounding="stochastic"), f16
  )
  return out


class _Closure(ema_bench.Variant):
  """A ``run()`` closure (``run.calls`` steps per call) as an ema_bench
  Variant, so both benchmarks share one interleaved timing loop."""

  def __init__(self, name: str, run: Callable[[], None]):
    self.name, self._run = name, run

  def setup(self, tree: str) -> None:
    pass  # the closure holds its buffers

  def run(self) -> None:
    self._run()

  def per_call(self) -> int:
    return self._run.calls


def time_rounds(
  variants: dict[str, Callable[[], None]], rounds: int
) -> dict[str, float]:
  """Median ms per step of each variant, interleaved round by round."""
  times = ema_bench.time_interleaved(
    "",
    [_Closure(k, run) for k, run in variants.items()],
    rounds,
    budget_s=float("inf"),
  )
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def speed_child(tree: str, section: str, rounds: int) -> None:
  ms = time_rounds(speed_variants(tree, section), rounds)
  print("RESULT " + json.dumps(ms))


def speed(tree: str, section: str, rounds: int, mof: bool) -> dict[str, float]:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = (flags + " " + MOF_FLAG).strip() if mof else flags
  proc = subprocess.run(
    [sys.executable, __file__, "--child", tree, section, str(rounds)],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


# ---------------------------------------------------------------- accuracy


def every_accuracy(
  steps: int, momentum: float = 0.996, ks: tuple[int, ...] = (2, 4, 8)
) -> dict[str, Any]:
  """every=k and plain skipping against the per-step EMA on a real run."""
  jax, jnp, jepa_ema = _jax()
  import optax
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y)
  sizes = (64, 256, 256, 10)
  keys = jax.random.split(jax.random.key(0), len(sizes))
  params = {
    f"dense{i}": {
      "w": jax.random.normal(keys[i], (a, b)) * (2 / a) ** 0.5,
      "b": jnp.zeros(b),
    }
    for i, (a, b) in enumerate(zip(sizes, sizes[1:]))
  }

  def loss_fn(p, xb, yb):
    h = xb
    for i in range(len(sizes) - 1):
      h = h @ p[f"dense{i}"]["w"] + p[f"dense{i}"]["b"]
      h = jax.nn.relu(h) if i < len(sizes) - 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean()

  tx = optax.adamw(1e-3)
  per_step = jepa_ema.ema(momentum)
  exact = {k: jepa_ema.ema(momentum, every=k) for k in ks}

  def skip_update(t, p, step, k):  # ema-pytorch's update_every
    return jax.lax.cond(
      step % k == k - 1,
      lambda: jepa_ema.ema_update(t, p, step, momentum),
      lambda: t,
    )

  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree)))

  def dist(a, b):
    return norm(jax.tree.map(jnp.subtract, a, b))

  @jax.jit
  def step_fn(carry, i):
    p, opt, ref, ex, sk = carry
    idx = jax.random.randint(
      jax.random.fold_in(jax.random.key(1), i), (64,), 0, x.shape[0]
    )
    grads = jax.grad(loss_fn)(p, x[idx], y[idx])
    upd, opt = tx.update(grads, opt, p)
    p = optax.apply_updates(p, upd)
    ref = per_step.update(p, ref)
    ex = {k: exact[k].update(p, ex[k]) for k in ks}
    sk = {k: skip_update(sk[k], p, i, k) for k in ks}
    lag = dist(ref.target, p)
    rel = {f"every={k}": dist(ex[k].target, ref.target) / lag for k in ks}
    rel.update({f"skip k={k}": dist(sk[k], ref.target) / lag for k in ks})
    return (p, opt, ref, ex, sk), rel

  carry = (
    params,
    tx.init(params),
    per_step.init(params),
    {k: exact[k].init(params) for k in ks},
    {k: jax.tree.map(jnp.copy, params) for k in ks},
  )
  _, rel = jax.lax.scan(step_fn, carry, jnp.arange(steps))
  half = steps // 2
  # Compare at steps where every window just ended (multiples of max(ks)).
  ends = np.arange(max(ks) - 1, steps, max(ks))
  ends = ends[ends >= half]
  return {
    "steps": steps,
    "momentum": momentum,
    "series_at_window_ends": {
      "steps": (ends_all := np.arange(max(ks) - 1, steps, max(ks))).tolist(),
      **{k: np.asarray(v)[ends_all].tolist() for k, v in rel.items()},
    },
    "relative_to_lag": {
      k: {
        "mean_2nd_half": float(np.mean(np.asarray(v)[ends])),
        "final": float(np.asarray(v)[ends[-1]]),
      }
      for k, v in rel.items()
    },
  }


def stagnation(n: int, steps: int = 2000, m: float = 0.999) -> dict[str, float]:
  jax, jnp, jepa_ema = _jax()
  ones = jnp.ones(n)
  out = {"closed form 1 - m^steps": 1 - m**steps}
  for name, ema in [
    ("float32 target", jepa_ema.ema(m)),
    ("bf16 nearest", jepa_ema.ema(m, dtype=jnp.bfloat16)),
    (
      "bf16 stochastic",
      jepa_ema.ema(m, dtype=jnp.bfloat16, rounding="stochastic"),
    ),
    ("f16 nearest", jepa_ema.ema(m, dtype=jnp.float16)),
    (
      "f16 stochastic",
      jepa_ema.ema(m, dtype=jnp.float16, rounding="stochastic"),
    ),
  ]:
    with warnings.catch_warnings():  # the stagnation is what is measured
      warnings.simplefilter("ignore", jepa_ema.PrecisionWarning)
      state0 = ema.init(jnp.zeros(n))
    state = jax.jit(
      lambda s, ema=ema: jax.lax.fori_loop(
        0, steps, lambda _, s: ema.update(ones, s), s
      )
    )(state0)
    t = np.asarray(state.target.astype(jnp.float32))
    out[f"{name} mean"] = float(t.mean())
    out[f"{name} std over elements"] = float(t.std())
  return out


def plot_every(every: dict[str, Any], path: pathlib.Path) -> None:
  """every=k vs plain skipping over the trajectory (log scale)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = dict(every["series_at_window_ends"])
  steps = series.pop("steps")
  fig, ax = plt.subplots(figsize=(7, 4))
  colors = {"2": "tab:blue", "4": "tab:orange", "8": "tab:green"}
  for name, values in series.items():
    k = name.split("=")[-1]
    ax.plot(
      steps,
      values,
      color=colors.get(k),
      ls="-" if "every" in name else "--",
      label=name.replace("skip", "plain skip"),
    )
  ax.set(
    yscale="log",
    xlabel="training step (window ends)",
    ylabel="|target - per-step target| / per-step lag",
    title=f"every=k (product momentum) vs plain skipping, "
    f"m = {every['momentum']}",
  )
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# -------------------------------------------------------------------- main


def markdown(res: dict[str, Any]) -> str:
  lines = [
    f"# options_bench ({res['tree']}, {res['num_params'] / 1e6:.1f} M "
    f"float32 params; {res['machine']})",
    "",
  ]
  sp = res["speed"]
  base = sp["default"]["plain update"]
  lines += [
    "## Speed (median ms per training step, interleaved)",
    "",
    "| variant | ms | vs plain update |",
    "|---|---|---|",
  ]
  for name, ms in sp["default"].items():
    lines.append(f"| {name} | {ms:.2f} | {ms / base:.2f}x |")
  for mode in ("several_default", "several_mof"):
    s = sp[mode]
    lines.append(
      f"| {mode.replace('several_', 'several momenta, XLA flags: ')}: "
      f"ema((m1, m2, m3)) / 3 separate EMAs | "
      f"{s['ema((m1, m2, m3)), one call']:.2f} / {s['3 separate EMAs']:.2f}"
      f" | {s['ema((m1, m2, m3)), one call'] / s['3 separate EMAs']:.2f}x"
      f" (ideal 28/36 = 0.78x) |"
    )
  lines += [
    "",
    "## every=k on a real trajectory (MLP, AdamW, digits; "
    f"m = {res['every']['momentum']}, {res['every']['steps']} steps)",
    "",
    "Distance from the per-step target / the per-step target's "
    "lag behind the online params (at window ends, second half):",
    "",
    "| k | every=k (product momentum) | plain skip (per-step momentum) |",
    "|---|---|---|",
  ]
  rel = res["every"]["relative_to_lag"]
  for k in (2, 4, 8):
    lines.append(
      f"| {k} | {rel[f'every={k}']['mean_2nd_half']:.4f} | "
      f"{rel[f'skip k={k}']['mean_2nd_half']:.4f} |"
    )
  lines += [
    "",
    "## half-precision stagnation (2000 steps, m = 0.999, 0 -> 1)",
    "",
    "| | value |",
    "|---|---|",
  ]
  lines += [f"| {k} | {v:.4f} |" for k, v in res["stagnation"].items()]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--quick",
    action="store_true",
    help="ViT-S/16, fewer rounds and steps (about a minute)",
  )
  p.add_argument("--json", default=None)
  p.add_argument("--markdown", default=None)
  p.add_argument(
    "--plot",
    default=None,
    help="write the every=k figure here (needs matplotlib)",
  )
  p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    speed_child(args.child[0], args.child[1], int(args.child[2]))
    return {}
  tree = "vit_s16" if args.quick else "vit_b16"
  rounds = 5 if args.quick else 15
  from tqdm import tqdm

  jobs = [
    ("default", lambda: speed(tree, "options", rounds, mof=False)),
    ("several_default", lambda: speed(tree, "several", rounds, False)),
    ("several_mof", lambda: speed(tree, "several", rounds, True)),
  ]
  res: dict[str, Any] = {
    "tree": tree,
    "num_params": ema_bench.num_params(tree),
    "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, "
    f"jax {__import__('jax').__version__}",
    "speed": {},
  }
  bar = tqdm(total=len(jobs) + 2, desc="options_bench", unit="part")
  for key, job in jobs:
    bar.set_postfix_str(key)
    res["speed"][key] = job()
    bar.update()
  bar.set_postfix_str("every=k accuracy")
  res["every"] = every_accuracy(600 if args.quick else 3000)
  bar.update()
  bar.set_postfix_str("bf16 stagnation")
  res["stagnation"] = stagnation(1 << 14 if args.quick else 1 << 18)
  bar.update()
  bar.close()
  md = markdown(res)
  print(md)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
  if args.markdown:
    pathlib.Path(args.markdown).write_text(md)
  if args.plot:
    plot_every(res["every"], pathlib.Path(args.plot))
  return res


if __name__ == "__main__":
  main()
