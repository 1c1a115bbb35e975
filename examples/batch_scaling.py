"""The EMA Scaling Rule on the digits I-JEPA: does the momentum transfer?

The demo's I-JEPA (``ijepa_digits.py``: batch ``B`` = 128, 3000 steps,
momentum 0.996, Adam lr 3e-3) as the reference, then at ``kappa * B`` for
kappa in {2, 4} (``--kappas``; 1/2 also works) over the same number of epochs
(so ``kappa`` times fewer steps):

* (a) *unscaled*: the same per-step momentum and lr;
* (b) *scaled*: ``jepa_ema.scale_momentum(0.996, kappa)`` and the Adam lr
  rule ``lr * sqrt(kappa)`` (Busbridge et al. 2023, arXiv:2307.13813);
* at kappa = 4 also each half alone (momentum only, lr only), to see which
  part matters.

Every run's warm-up is 10 % of its steps. Reported over ``--seeds``: k-NN,
1-shot, embedding std of the target encoder, and its drift
``||target - online|| / ||online||`` against samples seen, in
``batch_scaling.png`` / ``batch_scaling.json``.

Usage::

  python examples/batch_scaling.py --out-dir docs       # ~12 min on 2 cores
  python examples/batch_scaling.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ijepa_digits.config import Config  # noqa: E402  (the demo's pieces)
from ijepa_digits.data import load_data  # noqa: E402
from ijepa_digits.training import train_run  # noqa: E402

import jepa_ema  # noqa: E402

REF_BATCH = 128
REF_MOMENTUM = 0.996


def variants(kappas: list[float]) -> list[tuple[str, float, bool, bool]]:
  """``(name, kappa, scale the momentum, scale the lr)``."""
  out = [("reference", 1.0, False, False)]
  for k in kappas:
    out += [
      (f"x{k:g} unscaled", k, False, False),
      (f"x{k:g} scaled", k, True, True),
    ]
    if k == max(kappas):
      out += [
        (f"x{k:g} momentum only", k, True, False),
        (f"x{k:g} lr only", k, False, True),
      ]
  return out


def run(
  ref: Config,
  kappa: float,
  scale_m: bool,
  scale_lr: bool,
  seed: int,
  data: dict,
) -> dict[str, Any]:
  steps = max(int(round(ref.steps / kappa)), 1)
  cfg = dataclasses.replace(
    ref,
    seed=seed,
    steps=steps,
    batch_size=int(round(REF_BATCH * kappa)),
    lr=ref.lr * (math.sqrt(kappa) if scale_lr else 1.0),
    warmup=max(steps // 10, 1),
    chunk=min(100, steps),
  )
  momentum = (
    jepa_ema.scale_momentum(REF_MOMENTUM, kappa)
    if scale_m
    else jepa_ema.constant_momentum(REF_MOMENTUM)
  )
  res = train_run(f"k{kappa:g}", cfg, momentum, data, progress=False)
  drift = np.asarray(res["curves"]["drift"])
  keep = np.unique(np.linspace(0, steps - 1, 100).astype(int))
  return {
    **res["metrics"],
    "seed": seed,
    "steps": steps,
    "batch": cfg.batch_size,
    "lr": cfg.lr,
    "momentum": float(momentum(0)),
    "samples": ((keep + 1) * cfg.batch_size).tolist(),
    "drift": drift[keep].tolist(),
    "seconds": res["train_seconds"],
  }


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(result["runs"])
  fig, ax = plt.subplots(1, 4, figsize=(16, 4))
  cmap = plt.get_cmap("tab10")
  for i, name in enumerate(names):
    rs = result["runs"][name]
    style = "--" if "unscaled" in name else ":" if "only" in name else "-"
    for j, r in enumerate(rs):
      ax[0].plot(
        r["samples"],
        r["drift"],
        style,
        color=cmap(i),
        lw=1.2,
        label=name if j == 0 else None,
      )
  ax[0].set(
    xscale="log",
    yscale="log",
    xlabel="samples seen",
    title="target drift ||target - online|| / ||online||",
  )
  ax[0].legend(fontsize=7)
  for a, (key, title) in zip(
    ax[1:],
    (("knn5", "k-NN (5)"), ("1shot", "1-shot"), ("emb_std", "embedding std")),
  ):
    for i, name in enumerate(names):
      v = np.array([r[key] for r in result["runs"][name]])
      a.errorbar(
        [i],
        [v.mean()],
        yerr=[[v.mean() - v.min()], [v.max() - v.mean()]],
        fmt="o",
        color=cmap(i),
        capsize=3,
      )
      a.scatter(np.full(len(v), i), v, s=8, color=cmap(i), alpha=0.5)
    a.set_xticks(range(len(names)))
    a.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    a.set(title=f"{title} (mean, range, seeds)")
  fig.suptitle(
    f"EMA Scaling Rule on the digits I-JEPA: batch {REF_BATCH} x "
    f"kappa, same epochs; seeds {result['seeds']}",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--kappas", type=float, nargs="+", default=[2.0, 4.0])
  p.add_argument(
    "--steps",
    type=int,
    default=3000,
    help="reference steps at batch 128 (default 3000, the demo's)",
  )
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument(
    "--out-dir", type=pathlib.Path, default=pathlib.Path("outputs")
  )
  args = p.parse_args(argv)
  if any(k <= 0 for k in args.kappas):
    p.error("--kappas must be positive")
  ref = Config(
    steps=40 if args.quick else args.steps,
    depth=2 if args.quick else 3,
    pred_depth=1 if args.quick else 2,
  )
  data = load_data()
  result: dict[str, Any] = {
    "seeds": args.seeds,
    "ref_steps": ref.steps,
    "ref_batch": REF_BATCH,
    "runs": {},
  }
  t0 = time.time()
  for name, kappa, scale_m, scale_lr in variants(args.kappas):
    result["runs"][name] = []
    for seed in args.seeds:
      r = run(ref, kappa, scale_m, scale_lr, seed, data)
      result["runs"][name].append(r)
      print(
        f"[{time.time() - t0:6.0f} s] {name:>18} seed {seed}: batch "
        f"{r['batch']}, {r['steps']} steps, lr {r['lr']:.2e}, m "
        f"{r['momentum']:.6f}: k-NN {r['knn5']:.3f} 1-shot "
        f"{r['1shot']:.3f} std {r['emb_std']:.4f} drift "
        f"{r['drift'][-1]:.4f}",
        flush=True,
      )
  result["seconds"] = time.time() - t0
  print(
    "\n| run | batch | steps | momentum | lr | k-NN (5) | 1-shot | "
    "emb std | final drift |\n|---|---|---|---|---|---|---|---|---|"
  )
  for name, rs in result["runs"].items():
    cell = lambda k, s=100, rs=rs: (
      f"{s * np.mean([r[k] for r in rs]):.1f} ± "
      f"{s * np.std([r[k] for r in rs], ddof=1 if len(rs) > 1 else 0):.1f}"
    )
    print(
      f"| {name} | {rs[0]['batch']} | {rs[0]['steps']} | "
      f"{rs[0]['momentum']:.6f} | {rs[0]['lr']:.2e} | {cell('knn5')} | "
      f"{cell('1shot')} | "
      f"{np.mean([r['emb_std'] for r in rs]):.4f} | "
      f"{np.mean([r['drift'][-1] for r in rs]):.4f} |"
    )
  args.out_dir.mkdir(parents=True, exist_ok=True)
  (args.out_dir / "batch_scaling.json").write_text(json.dumps(result))
  plot(result, args.out_dir / "batch_scaling.png")
  print(
    f"\nwrote {args.out_dir / 'batch_scaling.png'} ({result['seconds']:.0f} s)"
  )
  return result


if __name__ == "__main__":
  main()
