"""Recipe: a Flax NNX target encoder kept by ``jepa_ema.nnx.EMA``.

``jepa_ema.nnx.EMA(model, momentum)`` is an NNX graph node, like
``flax.nnx.EMA(model, decay)``: ``ema.update(model)`` runs inside ``nnx.jit``
and ``ema.apply_to(model)`` is the teacher, a live view that follows every
update. The momentum here is a schedule (I-JEPA's cosine ramp), read from the
EMA's stored step. The train step donates the EMA, so its target is updated in
place (the script checks that the old buffers are deleted).

How this relates to ``flax.nnx.EMA(model, decay)``: ``decay`` is our
``momentum`` (the weight on the old value). With a constant momentum and
``only=nnx.Param`` the two compute the same thing, which this script checks.

Run: ``python examples/recipe_nnx.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jepa_ema
import jepa_ema.nnx


class Encoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l2(jax.nn.gelu(self.l1(x)))


def main(steps: int = 40) -> dict[str, float]:
  model = Encoder(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  schedule = jepa_ema.cosine_momentum(0.9, 1.0, total_steps=steps)
  ema = jepa_ema.nnx.EMA(model, schedule)  # a copy of the model's Variables
  teacher = ema.apply_to(model)  # the target encoder: a live view

  @nnx.jit(donate_argnums=(0, 1, 2))  # the EMA too: updated in place
  def train_step(model, optimizer, ema, teacher, x):
    target = jax.lax.stop_gradient(teacher(x))

    def loss_fn(model):
      noisy = x + 0.1 * jnp.sin(3 * x)  # a toy "view"
      return jnp.mean((model(noisy) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    ema.update(model)
    return loss

  # The same loop with flax.nnx.EMA and ours at a constant momentum.
  ours = jepa_ema.nnx.EMA(model, 0.95, only=nnx.Param)
  theirs = nnx.EMA(model, 0.95, only=nnx.Param)

  donated = []
  for step in range(steps):
    x = jax.random.normal(jax.random.key(step), (32, 4))
    old = jax.tree.leaves(ema.state.target)
    loss = train_step(model, optimizer, ema, teacher, x)
    donated.append(all(a.is_deleted() for a in old))  # reused in place
    ours.update(model)
    theirs.update(model)

  leaves = lambda node: jax.tree.leaves(nnx.state(node, nnx.Param))
  gap = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(ours), leaves(theirs))
  )
  lag = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(leaves(teacher), leaves(model))
  )
  assert int(ema.state.step) == steps
  assert all(donated), "the donated target must be updated in place"
  assert gap < 1e-5, f"constant momentum should match nnx.EMA, gap {gap}"
  assert lag > 0, "the target must lag the online model"
  assert isinstance(teacher, Encoder)
  print(
    f"NNX: {steps} steps, loss {float(loss):.4f}; teacher lags online by "
    f"{lag:.4f} (max abs); last momentum {float(ema.momentum()):.4f}; "
    f"constant momentum vs nnx.EMA: max gap {gap:.1e}; target updated in "
    "place on every step"
  )
  return {
    "loss": float(loss),
    "gap_vs_nnx_ema": gap,
    "lag": lag,
    "donated": all(donated),
  }


if __name__ == "__main__":
  main()
