"""The figures: a run's four panels (:func:`plot`) and the sweep's
(:func:`plot_sweep`). matplotlib is imported only when drawing."""

from __future__ import annotations

import math
import pathlib

import numpy as np

from ijepa_digits.config import Config
from ijepa_digits.training import curve_steps

METRIC_LABELS = {
  "knn5": "k-NN (5)",
  "1shot": "1-shot",
  "5shot": "5-shot",
  "linear": "linear probe",
}


def plot(results: dict, cfg: Config, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
  colors = {"ema": "tab:blue", "no_ema": "tab:red"}
  labels = {
    "ema": f"EMA target (momentum {cfg.momentum})",
    "no_ema": "no EMA (momentum 0)",
  }
  for run, res in results["runs"].items():
    loss = np.asarray(res["curves"]["loss"])
    k = max(len(loss) // 60, 1)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax[0, 0].plot(
      np.arange(len(smooth)) + k - 1,
      smooth,
      color=colors[run],
      label=labels[run],
    )
    std = np.asarray(res["curves"]["emb_std"])
    ax[0, 1].plot(
      curve_steps(cfg), std, "o-", ms=3, color=colors[run], label=labels[run]
    )
    one_minus = 1.0 - np.asarray(res["curves"]["momentum"], np.float64)
    ax[1, 0].plot(
      np.maximum(one_minus, 1e-6),
      color=colors[run],
      label=f"1 - m(t), {labels[run]}",
    )
    if run == "ema":
      ax[1, 0].plot(
        res["curves"]["drift"],
        color=colors[run],
        ls="--",
        lw=1,
        label="drift ||target - online|| / ||online||",
      )
  ax[0, 0].set(
    title="I-JEPA loss (smoothed); low + no EMA = collapse",
    xlabel="step",
    yscale="log",
  )
  ax[0, 1].axhline(
    1 / math.sqrt(cfg.width), ls=":", c="gray", label="isotropic maximum"
  )
  ax[0, 1].set(
    title="target embedding std (0 = collapse)", xlabel="step", yscale="log"
  )
  ax[1, 0].set(
    title="1 - momentum and the target's drift (log)",
    xlabel="step",
    yscale="log",
  )
  names = list(results["table"])
  colors_bar = ["tab:blue", "tab:red", "tab:gray", "tab:olive"]
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    vals = [results["table"][name][m] for m in METRIC_LABELS]
    bars = ax[1, 1].bar(
      np.arange(len(METRIC_LABELS)) + i * width,
      vals,
      width,
      label=name,
      color=colors_bar[i % 4],
    )
    ax[1, 1].bar_label(bars, [f"{100 * v:.0f}" for v in vals], fontsize=6)
  ax[1, 1].set(
    title="test accuracy (%) of each frozen encoder",
    xticks=np.arange(len(METRIC_LABELS)) + 0.4 - width / 2,
    xticklabels=list(METRIC_LABELS.values()),
    ylim=(0, 1.22),
  )
  for a in ax.flat[:3]:
    a.legend(fontsize=7)
  ax[1, 1].legend(fontsize=7, ncol=2, loc="upper center")
  fig.suptitle(
    f"tiny I-JEPA on 8x8 digits, seed {cfg.seed}, {cfg.steps} steps",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _sweep_x(spec: str) -> float:
  """Where a sweep entry sits on the 1 - m axis (ramps: at their start)."""
  return 1.0 - (0.996 if spec in ("cosine", "linear") else float(spec))


def plot_sweep(sweep: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = [
    ("knn5", "k-NN (5) accuracy"),
    ("1shot", "1-shot accuracy"),
    ("emb_std", "embedding std"),
    ("eff_rank", "effective rank"),
  ]
  floor = 1e-5  # where m = 1 (1 - m = 0) is drawn on the log axis
  fig, ax = plt.subplots(1, 4, figsize=(15, 3.9))
  const = [s for s in sweep["momenta"] if s not in ("cosine", "linear")]
  xs = np.array([max(_sweep_x(s), floor) for s in const])
  random = sweep["random_init"]
  for a, (key, title) in zip(ax, metrics):
    vals = np.array([[r[key] for r in sweep["results"][s]] for s in const])
    mean, lo, hi = vals.mean(1), vals.min(1), vals.max(1)
    a.fill_between(xs, lo, hi, alpha=0.2, color="tab:blue")
    a.plot(xs, mean, "o-", color="tab:blue", label="constant m (mean, range)")
    for s, marker, color in (
      ("cosine", "^", "tab:green"),
      ("linear", "s", "tab:orange"),
    ):
      if s in sweep["results"]:
        v = np.array([r[key] for r in sweep["results"][s]])
        a.errorbar(
          [_sweep_x(s) * (1.15 if s == "linear" else 0.87)],
          [v.mean()],
          yerr=[[v.mean() - v.min()], [v.max() - v.mean()]],
          fmt=marker,
          color=color,
          capsize=3,
          label=f"{s} 0.996 -> 1",
        )
    r = np.array([x[key] for x in random])
    a.axhspan(
      r.min(), r.max(), color="gray", alpha=0.25, label="random-init encoder"
    )
    a.axvspan(
      1 - 0.9995,
      1 - 0.996,
      color="tab:purple",
      alpha=0.08,
      label="papers' range (0.996-0.9995)",
    )
    a.set(xscale="log", title=title, xlabel="1 - m  (m = 1 drawn at left)")
    a.set_xticks([floor, 1e-4, 1e-3, 1e-2, 1e-1, 1])
    a.set_xticklabels(["m=1", "1e-4", "1e-3", "0.01", "0.1", "m=0"])
  handles, labels = ax[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
  seeds = sweep["seeds"]
  fig.suptitle(
    f"momentum sweep, tiny I-JEPA on digits, {sweep['steps']} "
    f"steps, seeds {seeds}: target encoder after training",
    fontsize=10,
  )
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
