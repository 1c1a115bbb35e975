"""Every program of the library lowers for GPU and TPU, from this CPU.

``jax.export`` lowers a jitted function for a platform without having it:
for ``cuda``, ``rocm`` and ``tpu`` each program below must lower, with no
host callback and no custom call (which would tie it to one backend, or to
the host). What runs there is not measured here (benchmarks/device_check.py
does that on a lent GPU); this pins portability.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import jepa_ema
from jepa_ema import posthoc

PLATFORMS = ["cuda", "rocm", "tpu"]
PARAMS = {
  "enc": {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)},
  "half": jnp.ones(6, jnp.bfloat16),
  "n": jnp.array(3),
}
POLICY = {"enc": "average", "half": "copy", "n": "exclude"}


def _ema_update(**kw):
  ema = jepa_ema.ema(jepa_ema.cosine_momentum(0.99, 1.0, total_steps=100), **kw)
  state = jax.eval_shape(ema.init, PARAMS)
  return jax.jit(ema.update), (PARAMS, state)


def _track_ema_step(**kw):
  tx = optax.chain(optax.adamw(1e-3), jepa_ema.track_ema(0.99, **kw))
  params = _float_params()  # optax's adamw does not take int leaves
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  grads = jax.tree.map(jnp.zeros_like, params)
  return jax.jit(step), (params, opt_state, grads)


def _float_params():
  return {k: v for k, v in PARAMS.items() if k != "n"}


PROGRAMS = {
  "ema_update": lambda: (
    jax.jit(jepa_ema.ema_update, static_argnums=3),
    (PARAMS, PARAMS, 5, 0.9),
  ),
  "ema_update, traced momentum": lambda: (
    jax.jit(jepa_ema.ema_update),
    (PARAMS, PARAMS, 5, jnp.float32(0.9)),
  ),
  "make_ema_update": lambda: (  # the jitted program its function calls
    jepa_ema.make_ema_update(jepa_ema.warmup_momentum()).__wrapped__,
    (PARAMS, PARAMS, 5),
  ),
  "ema": lambda: _ema_update(),
  "ema, every=4": lambda: _ema_update(every=4),
  "ema, several momenta": lambda: (
    jax.jit(jepa_ema.ema((0.9, 0.99)).update),
    (PARAMS, jax.eval_shape(jepa_ema.ema((0.9, 0.99)).init, PARAMS)),
  ),
  "ema, drift": lambda: _ema_update(drift=True),
  "ema, skip_nonfinite": lambda: _ema_update(skip_nonfinite=True),
  "ema, stochastic rounding": lambda: _ema_update(rounding="stochastic"),
  "ema, policy": lambda: _ema_update(policy=POLICY),
  "track_ema in a chain": lambda: _track_ema_step(),
  "track_ema, write-back": lambda: _track_ema_step(write_back_every=10),
  # posthoc_reconstruct's two jitted programs (its loop over snapshots is
  # Python): the first weighted snapshot, then each one added in place.
  "posthoc: first snapshot": lambda: (
    posthoc._scaled,
    (_float_params(), jnp.float32(0.3)),
  ),
  "posthoc: accumulate": lambda: (
    posthoc._axpy,
    (_float_params(), _float_params(), jnp.float32(0.7)),
  ),
}


@pytest.mark.standard_promotion  # optax's adamw in two of the programs
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_lowers_for_gpu_and_tpu(name):
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jepa_ema.PrecisionWarning)  # bf16 leaf
    fn, args = PROGRAMS[name]()
    exported = export.export(fn, platforms=PLATFORMS)(*args)
  text = exported.mlir_module()
  assert exported.platforms == tuple(PLATFORMS)
  calls = sorted(set(re.findall(r"custom_call @?(\w+)", text)))
  assert calls == [], f"{name}: custom calls {calls}"
  assert "callback" not in text, name
