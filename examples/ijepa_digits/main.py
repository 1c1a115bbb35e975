"""A tiny I-JEPA on scikit-learn's 8x8 digits, trained on a laptop CPU.

The command line (``python examples/ijepa_digits.py``, what ``make demo``
runs): two runs with the same seed, the EMA target (``--momentum``, default
constant 0.996; ``cosine`` / ``linear`` select the BYOL and I-JEPA ramps to
1) and the momentum-0 contrast; the evaluation of both frozen target
encoders, the random-init encoder and raw pixels; a table on stdout,
``ijepa_digits.png`` and ``ijepa_digits.json`` in ``--out-dir``. ``--sweep``
runs :mod:`ijepa_digits.sweep` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import jax

from ijepa_digits.config import Config
from ijepa_digits.data import NUM_TOKENS, load_data
from ijepa_digits.evaluation import evaluate
from ijepa_digits.figures import plot
from ijepa_digits.sweep import run_sweep
from ijepa_digits.training import random_init_metrics, train_run


def _kill_point(spec: str) -> tuple[str, int]:
  """``--test-kill-at``: ``after:N`` or ``commit:N``."""
  when, _, step = spec.partition(":")
  if when not in ("after", "commit") or not step.isdigit():
    raise argparse.ArgumentTypeError(
      f"expected after:STEP or commit:STEP, got {spec!r}"
    )
  return when, int(step)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawTextHelpFormatter,
  )
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="training steps per run (default 3000; 150 --quick;\n1500 --sweep)",
  )
  p.add_argument(
    "--momentum",
    default="0.996",
    help="'cosine' (BYOL), 'linear' (I-JEPA) or a float",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="short CI run (150 steps, a smaller model)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--lr",
    type=float,
    default=3e-3,
    help="peak AdamW learning rate (momentum-0 collapse needs a\n"
    "high one: at 1e-3 it does not collapse)",
  )
  p.add_argument(
    "--runs", default="ema,no_ema", help="comma-separated subset of ema,no_ema"
  )
  p.add_argument("--out-dir", default="outputs", type=pathlib.Path)
  p.add_argument("--checkpoint-dir", default=None, type=pathlib.Path)
  p.add_argument("--checkpoint-every", type=int, default=250)
  p.add_argument(
    "--no-eval-baselines",
    action="store_true",
    help="skip the random-init and raw-pixel baselines",
  )
  p.add_argument("--no-progress", action="store_true")
  p.add_argument(
    "--sweep",
    action="store_true",
    help="momentum sweep over --seeds instead of the two runs;\n"
    "writes momentum_sweep.{png,json} to --out-dir",
  )
  p.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=[0, 1, 2],
    help="seeds of --sweep (default 0 1 2)",
  )
  p.add_argument(  # tests: SIGKILL at a known point (see Checkpointer)
    "--test-kill-at",
    type=_kill_point,
    default=None,
    metavar="{after,commit}:STEP",
    help=argparse.SUPPRESS,
  )
  args = p.parse_args(argv)

  steps = (
    args.steps
    if args.steps is not None
    else (150 if args.quick else 1500 if args.sweep else 3000)
  )
  if steps < 1:
    p.error("--steps must be >= 1")
  if args.checkpoint_every < 1:
    p.error("--checkpoint-every must be >= 1")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  if not runs or any(r not in ("ema", "no_ema") for r in runs):
    p.error(f"--runs must be a subset of ema,no_ema, got {args.runs!r}")
  if args.sweep and args.checkpoint_dir is not None:
    p.error("--sweep does not checkpoint; drop --checkpoint-dir")
  cfg = Config(
    steps=steps,
    lr=args.lr,
    momentum=args.momentum,
    seed=args.seed,
    warmup=max(steps // 10, 1),
    chunk=min(100, steps),
    # --quick: 2 + 1 blocks instead of 3 + 2 (compiles faster)
    depth=2 if args.quick else 3,
    pred_depth=1 if args.quick else 2,
  )
  cfg.schedule()  # validate --momentum early
  data = load_data()
  print(
    f"digits: {len(data['x_train'])} train / {len(data['x_test'])} test "
    f"images, {NUM_TOKENS} tokens of 2x2 pixels; {steps} steps per run; "
    f"jax {jax.__version__} on {jax.devices()[0].platform}"
  )
  if args.sweep:
    return run_sweep(cfg, args.seeds, data, args.out_dir, not args.no_progress)

  results: dict[str, Any] = {
    "config": dataclasses.asdict(cfg),
    "runs": {},
    "table": {},
  }
  for run in runs:
    momentum = args.momentum if run == "ema" else "0.0"
    res = train_run(
      run,
      cfg,
      momentum,
      data,
      args.checkpoint_dir,
      args.checkpoint_every,
      not args.no_progress,
      args.test_kill_at,
    )
    results["runs"][run] = res
    label = (
      f"EMA target (m={args.momentum})"
      if run == "ema"
      else "no-EMA target (m=0)"
    )
    results["table"][label] = res["metrics"]

  if not args.no_eval_baselines:
    results["table"]["random-init encoder"] = random_init_metrics(cfg, data)
    results["table"]["raw pixels"] = evaluate(
      data["pix_train"],
      data["pix_test"],
      data["y_train"],
      data["y_test"],
      cfg.seed,
    )

  print(
    "\n| encoder | k-NN (5) | 1-shot | 5-shot | linear | emb std | "
    "eff. rank |\n|---|---|---|---|---|---|---|"
  )
  for name, m in results["table"].items():
    print(
      f"| {name} | {m['knn5']:.3f} | {m['1shot']:.3f} | {m['5shot']:.3f} "
      f"| {m['linear']:.3f} | {m['emb_std']:.4f} | {m['eff_rank']:.1f} |"
    )

  for run, res in results["runs"].items():
    per = ", ".join(
      f"{k} {v:.3f}"
      for k, v in res["target_online_rel_dist_per_module"].items()
    )
    print(
      f"{run}: target drift ||target - online|| / ||online|| = "
      f"{res['target_online_rel_dist']:.4f} (per module: {per}); "
      f"trained in {res['train_seconds']:.1f} s"
    )

  args.out_dir.mkdir(parents=True, exist_ok=True)
  json_path = args.out_dir / "ijepa_digits.json"
  json_path.write_text(json.dumps(results, indent=1))
  png_path = args.out_dir / "ijepa_digits.png"
  plot(results, cfg, png_path)
  print(f"\nwrote {json_path} and {png_path}")
  return results


if __name__ == "__main__":
  main()
