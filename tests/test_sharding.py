"""Sharded meshes (8 simulated CPU devices, in a subprocess): the target
inherits each parameter's NamedSharding, the update compiles to a program
with no collectives, and a layout mismatch is reported.

Communication is counted in the compiled HLO: ``result[...]_collectives``
lists the kind of every collective instruction, one entry each, so comparing
the list compares the count.
"""

import pytest


@pytest.fixture(scope="module", params=["auto", "explicit"])
def result(request, on_eight_devices):
  """Mesh axes of both kinds: Auto (XLA picks layouts) and Explicit (layouts
  in the types; ``jax.make_mesh``'s default in recent JAX)."""
  return on_eight_devices("sharded_ema.py", request.param)


def test_eight_devices(result):
  assert result["devices"] == 8


@pytest.mark.parametrize(
  "key",
  [
    "init_eager_keeps",
    "init_jit_keeps",
    "init_out_shardings_keeps",
    "state_shardings_match",
    "update_keeps",
    "update_values_ok",
    "make_ema_update_keeps",
    "track_ema_keeps",
  ],
)
def test_shardings_are_kept(result, key):
  assert result[key] is True


@pytest.mark.parametrize(
  "key",
  [
    "update_collectives",
    "make_ema_update_collectives",
    "track_ema_collectives",
  ],
)
def test_no_collectives(result, key):
  assert result[key] == []


def test_skip_nonfinite_needs_only_a_scalar_all_reduce(result, request):
  # Several leaves sharded over different mesh axes: per-leaf reductions,
  # partitioned by XLA one by one, would need several all-reduces.
  assert result["sharded_leaves"] >= 3
  assert result["skip_nonfinite_scalar"] is True
  if request.node.callspec.params["result"] == "explicit":
    # The layout is in the types: each device checks its own shards, one
    # scalar crosses devices, however many leaves.
    assert result["skip_nonfinite_collectives"] == ["all-reduce"]
  else:
    # Auto axes: XLA partitions each leaf's reduction itself (layouts are
    # chosen after tracing); the count docs/howto/sharding.md states.
    assert result["skip_nonfinite_collectives"] == ["all-reduce"] * 3


def test_skip_nonfinite_sees_a_nan_or_inf_on_any_device(result):
  # A NaN or an Inf in the last element of each leaf in turn (held by some
  # devices only) skips the update; finite params update. A max all-reduce
  # would lose the NaN: XLA:CPU's drops it.
  assert result["skip_nonfinite_values_ok"] is True


def test_mismatch_is_reported(result):
  if "mismatch_errors" in result:  # explicit axes: ValueError, also in jit
    errors = result["mismatch_errors"]
    assert len(errors) == 3 and all(e and "['bias']" in e for e in errors)
    assert all("P('model',)" in e and "P('data',)" in e for e in errors)
    return
  msgs = result["mismatch_warnings"]
  assert len(msgs) == 2  # eager ema_update and make_ema_update
  for m in msgs:
    assert "['bias']" in m and "sharded differently" in m
  assert result["mismatch_collectives"], "a mismatch should need collectives"
  assert result["matched_warnings"] == []


OPTIONS = ["every", "several", "drift", "stochastic", "all"]


@pytest.mark.parametrize("name", OPTIONS)
def test_options_keep_shardings(result, name):
  assert result[f"{name}_state_shardings_match"] is True
  assert result[f"{name}_keeps"] is True


@pytest.mark.parametrize("name", ["stochastic", "all"])
def test_stochastic_rounding_gives_the_single_device_bits(result, name):
  # The rounding noise is a function of the element's global position, so a
  # sharded run and a one-device run agree bitwise (targets, steps, keys).
  assert result[f"{name}_equals_single_device"] is True


@pytest.mark.parametrize("name", OPTIONS)
def test_options_communicate_only_the_drift_scalars(result, name):
  # Elementwise updates need no communication; the drift norms are sums over
  # all devices: scalar all-reduces (XLA partitions each leaf's sum: 3 here),
  # nothing model-sized.
  if name in ("drift", "all"):
    assert set(result[f"{name}_collectives"]) == {"all-reduce"}
    assert result[f"{name}_scalar"] is True
  else:
    assert result[f"{name}_collectives"] == []
