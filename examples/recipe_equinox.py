"""Recipe: an EMA of an Equinox module's floating-point arrays.

``eqx.filter(model, eqx.is_inexact_array)`` keeps the float arrays and puts
``None`` elsewhere (activation functions, static ints); jepa_ema averages that
filtered pytree, and ``eqx.combine`` rebuilds a full target module for the
teacher forward pass. Run: ``python examples/recipe_equinox.py``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jepa_ema


def main(steps: int = 30) -> dict[str, float]:
  model = eqx.nn.MLP(4, 4, 16, 2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  ema = jepa_ema.ema(jepa_ema.cosine_momentum(0.9, 1.0, total_steps=steps))
  ema_state = ema.init(params)

  @eqx.filter_jit
  def train_step(params, opt_state, ema_state, x):
    teacher = eqx.combine(ema_state.target, static)
    target = jax.lax.stop_gradient(jax.vmap(teacher)(x))

    def loss_fn(p):
      student = eqx.combine(p, static)
      return jnp.mean((jax.vmap(student)(x * 0.9) - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = eqx.apply_updates(params, updates)
    return params, opt_state, ema.update(params, ema_state), loss

  history = [params]
  for i in range(steps):
    x = jax.random.normal(jax.random.key(i), (32, 4))
    params, opt_state, ema_state, loss = train_step(
      params, opt_state, ema_state, x
    )
    history.append(params)

  # Hand-rolled float64 reference over the same trajectory.
  sched = jepa_ema.cosine_momentum(0.9, 1.0, total_steps=steps)
  ref = [np.asarray(a, np.float64) for a in jax.tree.leaves(history[0])]
  for t, p in enumerate(history[1:]):
    m = float(np.float32(sched(t)))
    ref = [
      m * r + (1 - m) * np.asarray(a, np.float64)
      for r, a in zip(ref, jax.tree.leaves(p))
    ]
  err = max(
    float(np.max(np.abs(np.asarray(a) - r)))
    for a, r in zip(jax.tree.leaves(ema_state.target), ref)
  )
  teacher = eqx.combine(ema_state.target, static)
  assert isinstance(teacher, eqx.nn.MLP)
  assert err < 1e-5, err
  print(
    f"Equinox: {steps} steps, loss {float(loss):.4f}; EMA vs float64 "
    f"reference max error {err:.1e}"
  )
  return {"loss": float(loss), "err": err}


if __name__ == "__main__":
  main()
