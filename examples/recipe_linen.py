"""Recipe: Flax Linen with the target inside a ``TrainState``.

Two equivalent ways; this script runs both and checks they agree:

1. ``track_ema`` as the last element of the optax chain: the target lives in
   ``state.opt_state`` and ``jepa_ema.get_target(state.opt_state)`` reads it.
2. A ``TrainState`` subclass with an ``ema: EmaState`` field advanced with
   ``jepa_ema.ema(...).update`` after ``apply_gradients``.

The train step is jitted with the state donated, so the target is updated in
place. Run: ``python examples/recipe_linen.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jepa_ema


class EmaTrainState(train_state.TrainState):
  ema: Any = None  # a jepa_ema.EmaState


def main(steps: int = 30) -> dict[str, float]:
  model = nn.Sequential([nn.Dense(16), nn.gelu, nn.Dense(4)])
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  momentum = jepa_ema.linear_momentum(0.9, 1.0, total_steps=steps)  # I-JEPA
  ema = jepa_ema.ema(momentum)

  # 1. track_ema in the chain.
  s1 = train_state.TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optax.chain(optax.adamw(1e-2), jepa_ema.track_ema(momentum)),
  )
  # 2. The EMA as its own field.
  # (Its own copy of the params: step1 donates the buffers of s1.)
  params2 = jax.tree.map(jnp.copy, params)
  s2 = EmaTrainState.create(
    apply_fn=model.apply,
    params=params2,
    tx=optax.adamw(1e-2),
    ema=ema.init(params2),
  )

  def loss_fn(p, x):
    return jnp.mean((model.apply({"params": p}, x) - jnp.cos(x)) ** 2)

  def step1(state, x):
    grads = jax.grad(loss_fn)(state.params, x)
    return state.apply_gradients(grads=grads)  # track_ema runs in tx.update

  def step2(state, x):
    grads = jax.grad(loss_fn)(state.params, x)
    state = state.apply_gradients(grads=grads)
    return state.replace(ema=ema.update(state.params, state.ema))

  step1 = jax.jit(step1, donate_argnums=0)
  step2 = jax.jit(step2, donate_argnums=0)
  for i in range(steps):
    x = jax.random.normal(jax.random.key(i), (32, 4))
    s1, s2 = step1(s1, x), step2(s2, x)

  t1, t2 = jepa_ema.get_target(s1.opt_state), s2.ema.target
  gap = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2))
  )
  x = jax.random.normal(jax.random.key(99), (64, 4))
  online_loss, target_loss = float(loss_fn(s2.params, x)), float(loss_fn(t2, x))
  assert int(s2.ema.step) == steps and int(s1.step) == steps
  assert gap < 1e-6, gap
  assert not np.allclose(jax.tree.leaves(t2)[0], jax.tree.leaves(s2.params)[0])
  print(
    f"Linen: {steps} steps; online loss {online_loss:.4f}, EMA target "
    f"loss {target_loss:.4f}; track_ema vs TrainState field gap {gap:.1e}"
  )
  return {"gap": gap, "online_loss": online_loss, "target_loss": target_loss}


if __name__ == "__main__":
  main()
