"""Structural performance facts (never wall-clock): the documented fast paths
donate the target, reuse its buffers in place, and compile to programs with no
model-sized temporary."""

import jax
import jax.numpy as jnp
import pytest

import jepa_ema


def tree(seed, n_leaves=6, size=4096, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), n_leaves)
  return {
    f"w{i}": jax.random.normal(k, (size,), dtype) for i, k in enumerate(keys)
  }


def model_bytes(t):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))


def pointers(t):
  return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(t)]


def test_ema_jit_donates_and_updates_in_place():
  ema = jepa_ema.ema(0.9)
  update = ema.jit()
  online = tree(1)
  state = ema.init(tree(0))
  update(online, ema.init(tree(0)))  # compile first
  old_ptrs = pointers(state.target)
  old = state
  state = update(online, state)
  assert all(x.is_deleted() for x in jax.tree.leaves(old.target))
  assert pointers(state.target) == old_ptrs  # same buffers, written in place
  assert not any(x.is_deleted() for x in jax.tree.leaves(online))


def test_make_ema_update_reuses_buffers():
  fn = jepa_ema.make_ema_update(0.9)
  online = tree(1)
  target = fn(tree(0), online, 0)
  ptrs = pointers(target)
  for step in range(5):
    target = fn(target, online, step)
  assert pointers(target) == ptrs


def test_without_donation_nothing_is_deleted():
  ema = jepa_ema.ema(0.9)
  update = ema.jit(donate=False)
  state = ema.init(tree(0))
  new = update(tree(1), state)
  assert not any(x.is_deleted() for x in jax.tree.leaves(state.target))
  assert pointers(new.target) != pointers(state.target)


@pytest.mark.parametrize(
  "dtype,kwargs",
  [
    (jnp.float32, {}),
    (jnp.bfloat16, {"dtype": jnp.float32}),
    (jnp.float32, {"skip_nonfinite": True}),
  ],
  ids=["f32", "bf16->f32", "skip"],
)
def test_compiled_update_has_no_model_sized_temporary(dtype, kwargs):
  big = tree(0, n_leaves=8, size=1 << 16, dtype=dtype)  # 8 x 64k params
  ema = jepa_ema.ema(jepa_ema.cosine_momentum(total_steps=10), **kwargs)
  state = ema.init(big)
  compiled = jax.jit(ema.update, donate_argnums=1).lower(big, state).compile()
  mem = compiled.memory_analysis()
  target_bytes = model_bytes(state.target)
  assert mem.temp_size_in_bytes < 0.05 * target_bytes, mem
  # The new target aliases the donated old one: no second copy is allocated.
  assert mem.alias_size_in_bytes >= target_bytes, mem


def test_track_ema_train_step_has_no_model_sized_temporary():
  import optax

  params = tree(0, n_leaves=8, size=1 << 16)
  tx = optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.99))
  opt_state = tx.init(params)

  def step(params, opt_state):
    grads = jax.tree.map(lambda p: 2.0 * p, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  mem = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, opt_state)
    .compile()
    .memory_analysis()
  )
  # params + updates is fused into the EMA and the param update: no
  # materialised model-sized "new params" temporary.
  assert mem.temp_size_in_bytes < 0.05 * model_bytes(params), mem
