"""Micro benchmark behind the kernel choice in jepa_ema/update.py.

Times candidate EMA formulas as a donated jit over one flat float32 buffer
(86 M floats, ViT-B sized), interleaved over 10 rounds. Usage:
``python benchmarks/kernel_formulas.py [--n 86000000]``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def clipped(t, o, m):
  a = 1 - m
  mixed = jnp.clip(t + a * (o - t), jnp.minimum(t, o), jnp.maximum(t, o))
  return jnp.where(a == 0, t, jnp.where(a == 1, o, mixed))


def two_sided(t, o, m):  # what jepa_ema used until the overflow fix
  a = 1 - m
  near = a <= 0.5
  base, far = jnp.where(near, t, o), jnp.where(near, o, t)
  mixed = base + jnp.where(near, a, m) * (far - base)
  return jnp.where(a == 0, t, jnp.where(a == 1, o, mixed))


def two_sided_safe(t, o, m):  # what jepa_ema uses (see _kernel.lerp)
  a = 1 - m
  near = a <= 0.5
  base, far = jnp.where(near, t, o), jnp.where(near, o, t)
  w = jnp.where(near, a, m)
  d = far - base
  big = jnp.isinf(d)  # o - t overflowed: halve both (exact), double w
  d = jnp.where(big, far * 0.5 - base * 0.5, d)
  mixed = base + jnp.where(big, w + w, w) * d
  mixed = jnp.where(d == 0, base, mixed)
  return jnp.where(a == 0, t, jnp.where(a == 1, o, mixed))


def plain(t, o, m):
  return m * t + (1 - m) * o


def add(t, o, m):  # the 2-read-1-write reference
  del m
  return t + o


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=86_000_000)
  p.add_argument("--rounds", type=int, default=10)
  n = p.parse_args().n
  rounds = p.parse_args().rounds
  t0 = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
  o = jnp.asarray(np.random.default_rng(1).standard_normal(n, dtype=np.float32))
  m = jnp.float32(0.996)
  fns = {
    f.__name__: jax.jit(f, donate_argnums=0)
    for f in (clipped, two_sided, two_sided_safe, plain, add)
  }
  ts = {k: jnp.asarray(t0) for k in fns}
  for k, f in fns.items():
    ts[k] = f(ts[k], o, m).block_until_ready()
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      s = time.perf_counter()
      ts[k] = f(ts[k], o, m).block_until_ready()
      times[k].append(time.perf_counter() - s)
  for k, v in times.items():
    med = float(np.median(v))
    print(f"{k:10s} {med * 1e3:7.1f} ms  {12 * n / med / 1e9:5.1f} GB/s")


if __name__ == "__main__":
  main()
