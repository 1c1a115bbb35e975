"""Recipe: a Flax NNX target encoder kept by jepa_ema inside ``nnx.jit``.

The target is a plain dict of arrays (``nnx.to_pure_dict`` of the online
model's ``nnx.Param`` state) inside a ``jepa_ema.EmaState``; the train step
advances it with a schedule, donated, so it is updated in place (the script
checks that the old buffers are deleted). ``nnx.replace_by_pure_dict`` and
``nnx.merge`` turn it back into a model for the teacher forward pass. A plain
dict rather than an ``nnx.State`` also keeps the EMA state an ordinary
checkpointable pytree; see docs/howto/nnx.md for what ``nnx.jit`` donation
does with either.

How this relates to ``flax.nnx.EMA(model, decay)``: ``decay`` is our
``momentum``; nnx.EMA has a fixed decay, no step and no schedule, and keeps
its average as Variables inside a module. With a constant momentum the two
compute the same thing, which this script checks.

Run: ``python examples/recipe_nnx.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jepa_ema


class Encoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l2(jax.nn.gelu(self.l1(x)))


def main(steps: int = 40) -> dict[str, float]:
  model = Encoder(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ema = jepa_ema.ema(jepa_ema.cosine_momentum(0.9, 1.0, total_steps=steps))
  ema_state = ema.init(nnx.to_pure_dict(params))  # a copy of the params

  def teacher_of(model, target):  # the target encoder, as a module
    state = nnx.state(model, nnx.Param)  # a State of the right structure
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state, rest)

  @nnx.jit(donate_argnums=2)  # ema_state: its target is updated in place
  def train_step(model, optimizer, ema_state, x):
    target = jax.lax.stop_gradient(teacher_of(model, ema_state.target)(x))

    def loss_fn(model):
      noisy = x + 0.1 * jnp.sin(3 * x)  # a toy "view"
      return jnp.mean((model(noisy) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    online = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return loss, ema.update(online, ema_state)

  # The same loop with nnx.EMA at a constant decay, for comparison.
  const = jepa_ema.ema(0.95)
  const_state = const.init(nnx.state(model, nnx.Param))
  nnx_ema = nnx.EMA(model, decay=0.95, only=nnx.Param)

  donated = []
  for step in range(steps):
    x = jax.random.normal(jax.random.key(step), (32, 4))
    old = jax.tree.leaves(ema_state.target)
    loss, ema_state = train_step(model, optimizer, ema_state, x)
    donated.append(all(a.is_deleted() for a in old))  # reused in place
    const_state = const.update(nnx.state(model, nnx.Param), const_state)
    nnx_ema.update(model)

  ours = jax.tree.leaves(const_state.target)
  theirs = [
    v[...]
    for v in jax.tree.leaves(
      nnx_ema.params, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
  ]
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ours, theirs))
  online = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lag = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(ema_state.target), jax.tree.leaves(online))
  )
  assert int(ema_state.step) == steps
  assert all(donated), "the donated target must be updated in place"
  assert gap < 1e-5, f"constant momentum should match nnx.EMA, gap {gap}"
  assert lag > 0, "the target must lag the online model"
  teacher = teacher_of(model, ema_state.target)
  assert isinstance(teacher, Encoder)
  print(
    f"NNX: {steps} steps, loss {float(loss):.4f}; target lags online by "
    f"{lag:.4f} (max abs); constant momentum vs nnx.EMA: max gap "
    f"{gap:.1e}; target updated in place on every step"
  )
  return {
    "loss": float(loss),
    "gap_vs_nnx_ema": gap,
    "lag": lag,
    "donated": all(donated),
  }


if __name__ == "__main__":
  main()
