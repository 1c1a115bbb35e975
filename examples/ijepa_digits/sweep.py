"""The momentum sweep (``--sweep``): every momentum of :data:`SWEEP_MOMENTA`
over several seeds, its table on stdout and ``momentum_sweep.{png,json}``."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

from ijepa_digits.config import Config
from ijepa_digits.figures import METRIC_LABELS, plot_sweep
from ijepa_digits.training import random_init_metrics, train_run

SWEEP_MOMENTA = (
  "0.0",
  "0.9",
  "0.99",
  "0.996",
  "0.999",
  "0.9999",
  "1.0",
  "cosine",
  "linear",
)


def run_sweep(
  cfg: Config,
  seeds: list[int],
  data: dict,
  out_dir: pathlib.Path,
  progress: bool,
) -> dict[str, Any]:
  from tqdm.auto import tqdm

  sweep = {
    "steps": cfg.steps,
    "seeds": seeds,
    "momenta": list(SWEEP_MOMENTA),
    "results": {s: [] for s in SWEEP_MOMENTA},
    "random_init": [],
    "config": dataclasses.asdict(cfg),
  }
  total = len(seeds) * len(SWEEP_MOMENTA)
  bar = tqdm(total=total, desc="sweep", disable=not progress, file=sys.stdout)
  t0 = time.time()
  for seed in seeds:
    cfg_s = dataclasses.replace(cfg, seed=seed)
    sweep["random_init"].append(random_init_metrics(cfg_s, data))
    for spec in SWEEP_MOMENTA:
      res = train_run(spec, cfg_s, spec, data, progress=False)
      sweep["results"][spec].append(
        {
          **res["metrics"],
          "seed": seed,
          "drift": res["target_online_rel_dist"],
          "train_seconds": res["train_seconds"],
        }
      )
      m = res["metrics"]
      bar.write(
        f"seed {seed} m={spec:>7}: k-NN {m['knn5']:.3f} 1-shot "
        f"{m['1shot']:.3f} std {m['emb_std']:.4f} rank "
        f"{m['eff_rank']:.1f} ({res['train_seconds']:.0f} s)"
      )
      bar.update(1)
  bar.close()
  sweep["seconds"] = time.time() - t0
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "momentum_sweep.json").write_text(json.dumps(sweep, indent=1))
  plot_sweep(sweep, out_dir / "momentum_sweep.png")
  print(
    "\n| momentum | k-NN (5) | 1-shot | 5-shot | linear | emb std | "
    "eff. rank |\n|---|---|---|---|---|---|---|"
  )
  rows = {**sweep["results"], "random init": sweep["random_init"]}
  for spec, rs in rows.items():
    cells = []
    for key in ("knn5", "1shot", "5shot", "linear", "emb_std", "eff_rank"):
      v = np.array([r[key] for r in rs])
      scale, fmt = (
        (100, ".1f")
        if key in METRIC_LABELS
        else (1, ".3f" if key == "emb_std" else ".1f")
      )
      cells.append(
        f"{scale * v.mean():{fmt}} ± {scale * v.std(ddof=1) if len(v) > 1 else 0:{fmt}}"
      )
    print(f"| {spec} | " + " | ".join(cells) + " |")
  print(
    f"\nwrote {out_dir / 'momentum_sweep.json'} and "
    f"{out_dir / 'momentum_sweep.png'} ({sweep['seconds']:.0f} s)"
  )
  return sweep
