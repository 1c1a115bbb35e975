"""A first look at jepa_ema: a momentum schedule and a few EMA steps.

Run with ``make demo`` (or ``python examples/quickstart.py``). It trains a tiny
linear regression with optax AdamW and keeps the target as an EMA of the online
parameters through ``jepa_ema.track_ema``, printing the momentum and how far the
target lags behind the online weights.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jepa_ema


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args(argv)

  schedule = jepa_ema.cosine_momentum(0.9, 1.0, total_steps=args.steps)
  print("cosine momentum schedule (BYOL/DINO form), base 0.9 -> 1.0:")
  for t in [
    0,
    args.steps // 4,
    args.steps // 2,
    3 * args.steps // 4,
    args.steps,
  ]:
    print(f"  step {t:5d}: m = {float(schedule(t)):.5f}")

  key_w, key_x = jax.random.split(jax.random.key(0))
  true_w = jax.random.normal(key_w, (8, 1))
  params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros(1)}
  tx = optax.chain(optax.adamw(5e-2), jepa_ema.track_ema(schedule))
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  @jax.jit
  def train_step(params, opt_state, x):
    y = x @ true_w
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def lag(target, online):
    num = sum(
      jnp.sum((t - o) ** 2)
      for t, o in zip(jax.tree.leaves(target), jax.tree.leaves(online))
    )
    den = sum(jnp.sum(o**2) for o in jax.tree.leaves(online))
    return float(jnp.sqrt(num / den))

  print("\n step   loss     momentum  |target-online|/|online|")
  loss = jnp.inf
  for step in range(args.steps):
    x = jax.random.normal(jax.random.fold_in(key_x, step), (64, 8))
    params, opt_state, loss = train_step(params, opt_state, x)
    if step % max(args.steps // 8, 1) == 0 or step == args.steps - 1:
      target = jepa_ema.get_target(opt_state)
      print(
        f"{step:5d}  {float(loss):.5f}  {float(schedule(step)):.5f}"
        f"   {lag(target, params):.4f}"
      )

  target = jepa_ema.get_target(opt_state)
  ema_loss = float(loss_fn(target, x, x @ true_w))
  print(
    f"\nfinal online loss {float(loss):.5f}; EMA target loss {ema_loss:.5f}"
  )
  return {
    "online_loss": float(loss),
    "target_loss": ema_loss,
    "lag": lag(target, params),
  }


if __name__ == "__main__":
  main()
