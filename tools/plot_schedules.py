"""Draws docs/schedules.png: every momentum schedule of jepa_ema over a run.

Run: ``python tools/plot_schedules.py`` (needs matplotlib).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jepa_ema  # noqa: E402

T = 10_000


def main(path: pathlib.Path = pathlib.Path("docs/schedules.png")) -> None:
  t = jnp.arange(T + 2_000)
  schedules = {
    "constant_momentum(0.996)": jepa_ema.constant_momentum(0.996),
    "cosine_momentum(0.996, 1, T)": jepa_ema.cosine_momentum(
      0.996, 1.0, total_steps=T
    ),
    "linear_momentum(0.996, 1, 1.25 T)": jepa_ema.linear_momentum(
      0.996, 1.0, total_steps=1.25 * T
    ),
    "warmup_momentum(0.9999, power=3/4)": jepa_ema.warmup_momentum(
      0.9999, power=3 / 4
    ),
    "halflife_momentum(500, rampup=0.05)": jepa_ema.halflife_momentum(
      500.0, rampup=0.05
    ),
    "power_momentum(sigma_rel=0.10)": jepa_ema.power_momentum(sigma_rel=0.10),
    "scale_momentum(cosine, kappa=4)": jepa_ema.scale_momentum(
      jepa_ema.cosine_momentum(0.996, 1.0, total_steps=T), 4.0
    ),
  }
  fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
  for name, s in schedules.items():
    m = jnp.asarray(s(t))
    ax[0].plot(t, m, label=name)
    ax[1].plot(t, jnp.maximum(1.0 - m, 1e-7), label=name)
  ax[0].set(xlabel="step t", ylabel="m(t)", ylim=(0.95, 1.0005),
            title="momentum (zoomed to [0.95, 1])")  # fmt: skip
  ax[1].set(xlabel="step t", ylabel="1 - m(t)", yscale="log",
            title="1 - momentum (log): the averaging horizon is 1 / (1 - m)")  # fmt: skip
  ax[1].axvline(T, color="gray", ls=":", lw=1)
  ax[0].axvline(T, color="gray", ls=":", lw=1)
  ax[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
