"""Every program of the library lowers for CPU, GPU and TPU, from this CPU.

``jax.export`` lowers a jitted function for a platform without having it:
for ``cpu``, ``cuda``, ``rocm`` and ``tpu`` at once each program below must
lower, with no host callback (the checkify report compiles to nothing when
the program is not checkified) and no custom call (which would tie it to one
backend, or to the host). The one exception is ``memory_kind=``: a transfer
between device and host memory lowers to XLA's own placement annotation
(``annotate_device_placement``), which each backend's compiler turns into
its copies; nothing else. What runs there is not measured here
(benchmarks/device_check.py does that on a lent GPU); this pins portability
of the lowering, not speed, and not that a backend's compiler accepts every
placement (host memory inside a ``lax.cond`` with ``every=k`` is compiled and
run on CPU only here).
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import jepa_ema
from jepa_ema import posthoc

PLATFORMS = ["cpu", "cuda", "rocm", "tpu"]
PLACEMENT_CALLS = ["annotate_device_placement"]  # memory_kind= only
PARAMS = {
  "enc": {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)},
  "half": jnp.ones(6, jnp.bfloat16),
  "n": jnp.array(3),
}
POLICY = {"enc": "average", "half": "copy", "n": "exclude"}


def _ema_update(momentum=None, **kw):
  momentum = momentum or jepa_ema.cosine_momentum(0.99, 1.0, total_steps=100)
  ema = jepa_ema.ema(momentum, **kw)
  # A concrete state: an abstract one (eval_shape, ShapeDtypeStruct) drops
  # the memory kind from the type in JAX 0.10.2.
  concrete = "memory_kind" in kw or "target_sharding" in kw
  state = ema.init(PARAMS) if concrete else jax.eval_shape(ema.init, PARAMS)
  return jax.jit(ema.update, donate_argnums=1), (PARAMS, state)


def _mesh_sharding(*spec):
  mesh = jax.make_mesh((1,), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


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
  "ema, drift=3": lambda: _ema_update(drift=3),
  "ema, dtype=float32": lambda: _ema_update(dtype=jnp.float32),
  "ema, skip_nonfinite": lambda: _ema_update(skip_nonfinite=True),
  "ema, stochastic bf16": lambda: _ema_update(rounding="stochastic"),
  "ema, stochastic f16": lambda: _ema_update(
    dtype=jnp.float16, rounding="stochastic"
  ),
  "ema, policy": lambda: _ema_update(policy=POLICY),
  "ema, target_sharding": lambda: _ema_update(  # a prefix; None: as params
    target_sharding={
      "enc": _mesh_sharding("data"),
      "half": _mesh_sharding("data"),
      "n": None,
    }
  ),
  "ema, memory_kind": lambda: _ema_update(memory_kind="pinned_host"),
  "ema, memory_kind, every=3": lambda: _ema_update(
    every=3, memory_kind="pinned_host"
  ),
  "ema, several momenta, memory kinds, policy": lambda: _ema_update(
    (0.9, 0.999), memory_kind=(None, "pinned_host"), policy=POLICY
  ),
  "ema, every option with placement": lambda: _ema_update(
    (0.9, 0.999),
    every=2,
    drift=True,
    skip_nonfinite=True,
    dtype=jnp.bfloat16,
    rounding="stochastic",
    policy=POLICY,
    target_sharding=_mesh_sharding(),
    memory_kind="pinned_host",
  ),
  "track_ema in a chain": lambda: _track_ema_step(),
  "track_ema, write-back": lambda: _track_ema_step(write_back_every=10),
  "track_ema, target_sharding": lambda: _track_ema_step(
    target_sharding=_mesh_sharding()
  ),
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
  allowed = PLACEMENT_CALLS if "memory" in name or "placement" in name else []
  assert calls == allowed, f"{name}: custom calls {calls}"
  assert "callback" not in text, name


def _region_end(lines, i):
  """The line closing the regions of the op opened on line ``i``."""
  indent = len(lines[i]) - len(lines[i].lstrip())
  for j in range(i + 1, len(lines)):
    ln = lines[j]
    if len(ln) - len(ln.lstrip()) == indent and ln.lstrip().startswith("})"):
      return j
  return len(lines)


def test_offloaded_every_k_transfers_only_inside_the_update_branch():
  # With every=k the host <-> device transfers of an offloaded target are
  # in the update branch of the lax.cond: no transfer on the other steps.
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jepa_ema.PrecisionWarning)  # bf16 leaf
    fn, args = PROGRAMS["ema, memory_kind, every=3"]()
  lines = export.export(fn, platforms=PLATFORMS)(*args).mlir_module()
  lines = lines.splitlines()
  cases = [i for i, ln in enumerate(lines) if "stablehlo.case" in ln]
  placed = [
    i for i, ln in enumerate(lines) if "annotate_device_placement" in ln
  ]
  assert cases and placed
  inside = [
    p for p in placed if any(c < p < _region_end(lines, c) for c in cases)
  ]
  assert inside == placed
  # To the device before the blend, back to the host after, per platform
  # (cuda, rocm, tpu; CPU's lowering needs no annotation): one pair per
  # target leaf, and none in the idle branch (the targets stay where they
  # are).
  kinds = re.findall(r'_xla_buffer_placement = "(\w+)"', "\n".join(lines))
  n_leaves = len(jax.tree.leaves(args[1].target))
  assert (
    sorted(kinds) == ["device"] * 3 * n_leaves + ["pinned_host"] * 3 * n_leaves
  )
