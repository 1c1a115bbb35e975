"""Post-hoc EMA on the digits I-JEPA: pick the averaging width after training.

The demo's I-JEPA (``ijepa_digits.py``, its EMA target at momentum 0.996 as
usual) also tracks power-function EMAs (EDM2) of the *context* encoder:
sigma_rel 0.05 and 0.10, saved with :class:`jepa_ema.PostHocSnapshots` every
``--every`` steps, and 0.03, 0.07, 0.15 and 0.25 tracked directly as ground
truth. After training, a grid of widths is rebuilt post hoc from the
snapshots alone (:func:`jepa_ema.posthoc_reconstruct`) and every encoder is
evaluated like the demo's (k-NN, 1-shot).

Outputs ``posthoc.png`` (accuracy against sigma_rel, reconstructed vs
tracked, and each reconstruction's parameter-space error against its
ground truth) and ``posthoc.json``.

Usage::

  python examples/posthoc_digits.py --out-dir docs      # ~5 min on 2 cores
  python examples/posthoc_digits.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ijepa_digits.config import Config  # noqa: E402  (the demo's pieces)
from ijepa_digits.data import load_data  # noqa: E402
from ijepa_digits.training import encoder_metrics, train_run  # noqa: E402

import jepa_ema  # noqa: E402

SNAPSHOT_SIGMAS = (0.05, 0.10)
TRUTH_SIGMAS = (0.03, 0.07, 0.15, 0.25)
GRID = (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25)


def _norm(tree: Any) -> float:
  return float(
    np.sqrt(
      sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
    )
  )


def _dist(a: Any, b: Any) -> float:
  return _norm(
    jax.tree.map(
      lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b
    )
  )


def one_seed(
  cfg: Config, seed: int, data: dict, every: int, directory: pathlib.Path
) -> dict[str, Any]:
  cfg = dataclasses.replace(
    cfg, seed=seed, chunk=every, track=SNAPSHOT_SIGMAS + TRUTH_SIGMAS
  )
  snaps = jepa_ema.PostHocSnapshots(directory, SNAPSHOT_SIGMAS, every=every)
  n = len(SNAPSHOT_SIGMAS)
  tracked = jepa_ema.ema(
    tuple(jepa_ema.power_momentum(sigma_rel=s) for s in cfg.track)
  )
  res = train_run(
    "posthoc",
    cfg,
    cfg.momentum,
    data,
    progress=False,
    # The EMA training.build tracks (its first n momenta are the snapshots'
    # widths, checked by maybe_save; the others are the ground truth).
    on_chunk=lambda s: snaps.maybe_save(s.tracked[:n], tracked),
    keep_state=True,
  )
  state = res.pop("state")
  tracked = {s: st.target for s, st in zip(cfg.track, state.tracked)}
  out: dict[str, Any] = {
    "seed": seed,
    "snapshots": len(snaps),
    "ema_target": res["metrics"],
    "tracked": {},
    "reconstructed": {},
  }
  for sigma, target in tracked.items():
    out["tracked"][str(sigma)] = encoder_metrics(cfg, target, data)
  for sigma in GRID:
    t0 = time.time()
    rec = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=sigma)
    seconds = time.time() - t0
    m = encoder_metrics(cfg, rec, data)
    m["seconds"] = seconds
    if sigma in tracked:  # its ground truth was tracked directly
      truth = tracked[sigma]
      m["rel_error"] = _dist(rec, truth) / _norm(truth)
      m["nearest_tracked_rel_error"] = min(
        _dist(tracked[s], truth) for s in SNAPSHOT_SIGMAS
      ) / _norm(truth)
    out["reconstructed"][str(sigma)] = m
  return out


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 3, figsize=(14, 4))
  seeds = result["seeds"]
  for a, (key, title) in zip(
    ax[:2], (("knn5", "k-NN (5)"), ("1shot", "1-shot"))
  ):
    for kind, marker, color in (
      ("reconstructed", "o-", "tab:blue"),
      ("tracked", "s", "tab:red"),
    ):
      sig = sorted(float(s) for s in result["per_seed"][0][kind])
      vals = np.array(
        [[r[kind][str(s)][key] for s in sig] for r in result["per_seed"]]
      )
      a.errorbar(
        sig,
        vals.mean(0),
        yerr=[vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)],
        fmt=marker,
        color=color,
        capsize=3,
        ms=5,
        label=f"{kind} (mean, range)"
        if kind == "reconstructed"
        else "tracked directly (ground truth)",
      )
    for s in SNAPSHOT_SIGMAS:
      a.axvline(s, color="gray", ls=":", lw=1)
    a.set(
      xscale="log",
      xlabel="sigma_rel",
      title=f"{title} of the context encoder's power EMA",
    )
    a.legend(fontsize=7)
  sig = [float(s) for s in TRUTH_SIGMAS]
  err = np.array(
    [
      [r["reconstructed"][str(s)]["rel_error"] for s in sig]
      for r in result["per_seed"]
    ]
  )
  near = np.array(
    [
      [r["reconstructed"][str(s)]["nearest_tracked_rel_error"] for s in sig]
      for r in result["per_seed"]
    ]
  )
  ax[2].plot(sig, err.T, "o-", color="tab:blue", alpha=0.7)
  ax[2].plot(sig, near.T, "s--", color="tab:gray", alpha=0.7)
  ax[2].plot(
    [],
    [],
    "o-",
    color="tab:blue",
    label="||reconstruction - truth|| / ||truth||",
  )
  ax[2].plot(
    [],
    [],
    "s--",
    color="tab:gray",
    label="nearest snapshot profile (0.05 or 0.10)",
  )
  ax[2].set(
    xscale="log",
    yscale="log",
    xlabel="sigma_rel",
    title="parameter-space error vs ground truth",
  )
  ax[2].legend(fontsize=7)
  for a in ax:
    ticks = [v for v in GRID if v >= (0.03 if a is ax[2] else 0.02)]
    a.set_xticks(ticks)
    a.set_xticklabels([f"{v:g}" for v in ticks])
    a.minorticks_off()
  fig.suptitle(
    f"post-hoc EMA (EDM2) on the digits I-JEPA: snapshots of "
    f"sigma_rel {SNAPSHOT_SIGMAS} every {result['every']} steps, "
    f"seeds {seeds}",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument(
    "--every",
    type=int,
    default=100,
    help="snapshot interval in steps (default 100)",
  )
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument(
    "--out-dir", type=pathlib.Path, default=pathlib.Path("outputs")
  )
  args = p.parse_args(argv)
  steps = 60 if args.quick else args.steps
  every = 20 if args.quick else args.every
  if every < 1 or steps < every:
    p.error("need 1 <= --every <= --steps")
  cfg = Config(
    steps=steps,
    warmup=max(steps // 10, 1),
    depth=2 if args.quick else 3,
    pred_depth=1 if args.quick else 2,
  )
  data = load_data()
  t0 = time.time()
  per_seed = []
  for seed in args.seeds:
    with tempfile.TemporaryDirectory() as tmp:
      per_seed.append(one_seed(cfg, seed, data, every, pathlib.Path(tmp)))
    r = per_seed[-1]
    print(
      f"[{time.time() - t0:5.0f} s] seed {seed}: {r['snapshots']} snapshots",
      flush=True,
    )
    for sigma in GRID:
      m = r["reconstructed"][str(sigma)]
      truth = r["tracked"].get(str(sigma))
      extra = (
        f" | tracked k-NN {truth['knn5']:.3f} 1-shot "
        f"{truth['1shot']:.3f} | rel. error {m['rel_error']:.2e} "
        f"(nearest snapshot profile {m['nearest_tracked_rel_error']:.2e})"
        if truth
        else ""
      )
      print(
        f"  sigma_rel {sigma:.2f}: reconstructed k-NN {m['knn5']:.3f} "
        f"1-shot {m['1shot']:.3f}{extra}"
      )
  result = {
    "seeds": args.seeds,
    "steps": steps,
    "every": every,
    "per_seed": per_seed,
    "seconds": time.time() - t0,
  }
  args.out_dir.mkdir(parents=True, exist_ok=True)
  (args.out_dir / "posthoc.json").write_text(json.dumps(result, indent=1))
  plot(result, args.out_dir / "posthoc.png")
  print(f"\nwrote {args.out_dir / 'posthoc.png'} ({result['seconds']:.0f} s)")
  return result


if __name__ == "__main__":
  main()
