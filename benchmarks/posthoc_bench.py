"""Speed of post-hoc EMA reconstruction against the memory roofline.

``posthoc_reconstruct`` over ``N`` snapshots of a ViT/16-sized tree is one
multiply (8 bytes per float32 parameter: read the snapshot, write the
accumulator) and ``N - 1`` in-place multiply-adds (12 bytes: read both, write
the accumulator), so it is memory-bound. The roofline is the same number of
flat donated ``t + o`` passes over one buffer of the model's size (XLA),
timed in the same run, interleaved.

The snapshots are handed over as loaders that return trees already in memory
(two distinct trees, alternated), so this measures the reconstruction itself,
not the disk; reading ``N`` snapshots from disk adds ``N x model size`` of I/O.

Usage::

  python benchmarks/posthoc_bench.py                     # ViT-B/16, 20 snapshots
  python benchmarks/posthoc_bench.py --tree vit_s16 --snapshots 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ema_bench  # noqa: E402  (the ViT tree shapes)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tree", default="vit_b16", choices=sorted(ema_bench.VITS))
  p.add_argument("--snapshots", type=int, default=20)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--json", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp

  import jepa_ema

  n_params = ema_bench.num_params(args.tree)
  trees = [ema_bench.jax_tree(args.tree, seed) for seed in (0, 1)]
  steps = [1000 * (1 + i // 2) for i in range(args.snapshots)]
  sigmas = [(0.05, 0.10)[i % 2] for i in range(args.snapshots)]
  snaps = [
    (s, r, (lambda i=i: trees[i % 2]))
    for i, (s, r) in enumerate(zip(steps, sigmas))
  ]

  flat_t = jnp.asarray(
    np.random.default_rng(0).standard_normal(n_params, dtype=np.float32)
  )
  flat_o = jnp.asarray(
    np.random.default_rng(1).standard_normal(n_params, dtype=np.float32)
  )
  add = jax.jit(lambda t, o: t + o, donate_argnums=0)

  def roofline():
    nonlocal flat_t
    for _ in range(args.snapshots):
      flat_t = add(flat_t, flat_o)
    flat_t.block_until_ready()

  def reconstruct():
    out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07)
    jax.block_until_ready(out)

  def weights():
    jepa_ema.posthoc_coefficients(steps, sigmas, sigma_rel=0.07)

  for f in (roofline, reconstruct, weights):  # compile, warm up
    f()
  times = {"roofline": [], "reconstruct": [], "weights": []}
  for _ in range(args.rounds):
    for name, f in (
      ("roofline", roofline),
      ("reconstruct", reconstruct),
      ("weights", weights),
    ):
      t0 = time.perf_counter()
      f()
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  bytes_moved = n_params * 4 * (8 / 4 + 12 / 4 * (args.snapshots - 1))
  roof_bytes = n_params * 4 * 3 * args.snapshots
  result = {
    "tree": args.tree,
    "params": n_params,
    "snapshots": args.snapshots,
    "rounds": args.rounds,
    "backend": jax.default_backend(),
    "median_s": med,
    "reconstruct_GBps": bytes_moved / med["reconstruct"] / 1e9,
    "roofline_GBps": roof_bytes / med["roofline"] / 1e9,
    "reconstruct_vs_roofline": (bytes_moved / med["reconstruct"])
    / (roof_bytes / med["roofline"]),
  }
  print(
    f"{args.tree} ({n_params / 1e6:.1f} M params), {args.snapshots} "
    f"snapshots, median of {args.rounds} interleaved rounds on "
    f"{result['backend']}:"
  )
  print(
    f"  posthoc_reconstruct  {med['reconstruct'] * 1e3:8.1f} ms  "
    f"{result['reconstruct_GBps']:6.1f} GB/s"
  )
  print(
    f"  roofline (N x t+o)   {med['roofline'] * 1e3:8.1f} ms  "
    f"{result['roofline_GBps']:6.1f} GB/s"
  )
  print(f"  posthoc_coefficients {med['weights'] * 1e3:8.3f} ms")
  print(
    f"  reconstruction at {result['reconstruct_vs_roofline']:.2f}x the "
    "roofline's bandwidth"
  )
  if args.json:
    args.json.write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
