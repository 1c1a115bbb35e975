"""Recipe: ``track_ema`` under ``optax.MultiSteps`` (gradient accumulation).

Put ``track_ema`` *inside* the chain that MultiSteps wraps. MultiSteps only
commits the inner state on the k-th mini-step, so the EMA advances once per
real optimizer step and its schedule counts real steps. (Placed outside the
wrapper it would advance on every mini-step, with zero updates in between.)
Run: ``python examples/recipe_multisteps.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jepa_ema


def main(k: int = 4, real_steps: int = 10) -> dict[str, float]:
  tx = optax.MultiSteps(
    optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.8)), every_k_schedule=k
  )
  params = {"w": jnp.zeros(3)}
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x):
    grads = jax.grad(lambda p: jnp.sum((p["w"] - x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  ref = np.zeros(3)
  for i in range(k * real_steps):
    x = jnp.full(3, 1.0 + 0.1 * i)
    params, opt_state = step(params, opt_state, x)
    if (i + 1) % k == 0:  # a real optimizer step happened
      ref = 0.8 * ref + 0.2 * np.asarray(params["w"], np.float64)
  ema_state = opt_state.inner_opt_state[-1]
  target = jepa_ema.get_target(opt_state)
  err = float(np.max(np.abs(np.asarray(target["w"]) - ref)))
  assert int(ema_state.step) == real_steps, int(ema_state.step)
  assert int(opt_state.gradient_step) == real_steps
  assert err < 1e-6, err
  print(
    f"MultiSteps(k={k}): {k * real_steps} mini-steps, EMA step "
    f"{int(ema_state.step)} == optimizer steps {real_steps}; error vs "
    f"reference {err:.1e}"
  )
  return {"ema_step": int(ema_state.step), "err": err}


if __name__ == "__main__":
  main()
