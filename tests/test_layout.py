"""The target's own layout and memory: ``target_sharding=`` and ``memory_kind=``.

The checks that need 8 devices or host memory run in one subprocess
(``tests/scripts/layout_checks.py``, 8 simulated CPU devices, both Auto and
Explicit mesh axes): an offload error can abort the process instead of
raising. Every value is compared bitwise with the same EMA without the
option, and communication is read from the HLO of the library's own
compiled updates (``result[...]_collectives`` lists every collective
instruction). The single-device checks (bad memory kinds, the default paths
unchanged) run here.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import jepa_ema

AXES = ["auto", "explicit"]
FORMS = ["sharding", "prefix", "callable"]


@pytest.fixture(scope="module")
def result(on_eight_devices):
  return on_eight_devices("layout_checks.py")


def test_eight_devices_with_host_memory(result):
  assert result["devices"] == 8
  assert "pinned_host" in result["memories"]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("form", FORMS)
def test_target_sharding_is_created_and_kept(result, axes, form):
  # Eager init, jit(init), jit(init, out_shardings=ema.state_shardings);
  # then 4 jitted, donated updates.
  r = result[axes]
  assert r[f"zero_{form}_init"] == [True, True, True]
  assert r[f"zero_{form}_keeps"] is True


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("form", FORMS)
def test_target_sharding_gives_the_bits_of_the_plain_ema(result, axes, form):
  assert result[axes][f"zero_{form}_bitwise"] is True


@pytest.mark.parametrize("axes", AXES)
def test_eager_update_keeps_the_layout_and_the_bits(result, axes):
  assert result[axes]["zero_eager_keeps"] is True
  assert result[axes]["zero_eager_bitwise"] is True


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("form", FORMS)
def test_zero_style_update_has_no_collective(result, axes, form):
  # Replicated params, target sharded over "data": each device's slice of
  # the target is inside the param it holds whole.
  assert result[axes][f"zero_{form}_collectives"] == []


@pytest.mark.parametrize("axes", AXES)
def test_zero_style_target_costs_a_fraction_per_device(result, axes):
  per_device, full = result[axes]["zero_sharding_bytes_per_device"]
  assert per_device * 4 == full  # sharded 4 ways over "data"
  # The prefix form keeps "head" sharded over "model" only (2 ways).
  per_device, full = result[axes]["zero_prefix_bytes_per_device"]
  assert per_device == (8 + 16 * 8) * 4 // 4 + 8 * 4 * 4 // 2


@pytest.mark.parametrize("axes", AXES)
def test_layout_kept_when_the_step_reads_the_new_target_whole(result, axes):
  # A jitted step that updates and then reads the target replicated (a
  # teacher): the returned target is still sharded over "data".
  assert result[axes]["zero_read_whole_keeps"] is True


@pytest.mark.parametrize("axes", AXES)
def test_finer_layout_inside_sharded_params_has_no_collective(result, axes):
  # Params sharded over "model", target over both axes.
  assert result[axes]["finer_collectives"] == []
  assert result[axes]["finer_bitwise"] is True


@pytest.mark.parametrize("axes", AXES)
def test_coarser_layout_works_at_an_all_gather_per_leaf(result, axes):
  # Sharded params, replicated target: the documented cost.
  r = result[axes]
  assert r["coarser_collectives"] == ["all-gather"] * 4
  assert r["coarser_keeps"] is True
  assert r["coarser_bitwise"] is True


@pytest.mark.parametrize("axes", AXES)
def test_state_shardings_report_the_real_layout(result, axes):
  # ema.state_shardings == state_shardings(..., target_sharding=) on the
  # abstract state == the layout jit(init, out_shardings=...) gives == what
  # state_shardings reads from a concrete state.
  for form in FORMS:
    assert result[axes][f"zero_{form}_state_shardings"] == [True] * 3


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize(
  "name", ["options_zero", "options_host", "options_both"]
)
def test_every_option_with_policy_keeps_layout_memory_and_bits(
  result, axes, name
):
  # Two momenta, every=2, drift, skip_nonfinite, dtype=bfloat16 with
  # stochastic rounding, and a policy that averages, copies and excludes;
  # target_sharding, memory_kind=(None, "pinned_host"), or both.
  r = result[axes]
  assert r[f"{name}_layouts_ok"] is True  # after init and each update
  assert r[f"{name}_excluded_is_none"] is True
  assert r[f"{name}_bitwise"] is True
  assert r[f"{name}_drift_close"] is True  # sums in another order
  # Only the scalar reductions of skip_nonfinite and drift cross devices.
  assert set(r[f"{name}_collectives"]) <= {"all-reduce"}


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("name", ["track_zero", "track_host"])
def test_track_ema_train_step(result, axes, name):
  r = result[axes]
  assert r[f"{name}_collectives"] == []
  assert r[f"{name}_keeps"] is True
  assert r[f"{name}_bitwise"] is True  # target and params


@pytest.mark.parametrize("axes", AXES)
def test_bad_target_shardings_are_clear_errors(result, axes):
  errors = result[axes]["errors"]
  assert "ValueError" in errors["no_such_key"]
  assert "['tail']" in errors["no_such_key"]
  assert "ValueError" in errors["not_divisible"]
  assert "['odd']" in errors["not_divisible"]
  assert "(6,)" in errors["not_divisible"]
  assert "['enc']['b']" in errors["too_many_dims"]
  assert "devices [0, 1, 2, 3]" in errors["other_devices"]
  assert "memory_kind='pinned_host'" in errors["memory_kind_in_sharding"]


@pytest.mark.parametrize(
  "name", ["every1", "every3", "several", "several_every2"]
)
def test_offloaded_targets_live_in_host_memory(result, name):
  # After eager init, jit(init), jit(init, out_shardings=...), and after each
  # of 6 jitted donated updates: every target leaf (floating, int scalar,
  # int vector: the donation traps) in its memory kind, values bitwise those
  # of the same EMA on the device.
  host = result["host"]
  assert host[f"{name}_checks"] == [True] * 9
  assert set(host[f"{name}_steps"]) == {6}
  # state.step, skipped (and the other small fields) stay on the device.
  assert host[f"{name}_small_on_device"] is True


def test_state_in_device_memory_is_moved_to_its_memory_kind(result):
  # E.g. restored without its memory kind: with every=3 the jitted update
  # moves it on idle and update steps alike, values bitwise the plain EMA.
  assert result["host"]["from_device_checks"] == [True] * 4


def test_device_put_brings_an_offloaded_target_back(result):
  assert result["host"]["brought_back"] is True


def test_posthoc_snapshots_save_offloaded_targets_unchanged(result):
  host = result["host"]
  assert host["posthoc_kinds"] == ["pinned_host"]
  assert host["posthoc_count"] == [4, 4]
  assert host["posthoc_unchanged"] is True


# --------------------------------------------------------- one device


def test_unknown_memory_kind_names_it():
  with pytest.raises(ValueError, match="'hbm'.*'pinned_host'"):
    jepa_ema.ema(0.9, memory_kind="hbm")


def test_unpinned_host_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="'unpinned_host' cannot hold a target"):
    jepa_ema.track_ema(0.9, memory_kind="unpinned_host")


def test_memory_kind_tuple_needs_one_per_momentum():
  with pytest.raises(ValueError, match="2 memory kinds.*3 momenta"):
    jepa_ema.ema((0.9, 0.99, 0.999), memory_kind=(None, "pinned_host"))


def test_device_memory_kind_is_the_default():
  params = {"w": jnp.ones(3)}
  a = jepa_ema.ema(0.9, memory_kind="device")
  assert a.init(params).target["w"].sharding.memory_kind == "device"


@pytest.mark.parametrize(
  "kw", [dict(), dict(target_sharding=None, memory_kind=None)]
)
def test_default_paths_compile_to_the_same_program(kw):
  params = {"w": jnp.ones((4, 3)), "n": jnp.array(2)}
  plain = jepa_ema.ema((0.9, 0.99), every=2, skip_nonfinite=True)
  opt = jepa_ema.ema((0.9, 0.99), every=2, skip_nonfinite=True, **kw)
  state = plain.init(params)

  def text(e):  # compiled (the checkify checks' error codes are gone), and
    # without source locations (the call sites differ)
    hlo = jax.jit(e.update).lower(params, state).compile().as_text()
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)
    return [ln for ln in hlo.splitlines() if "_id=" not in ln and '"' not in ln]

  assert text(plain) == text(opt)


def test_target_sharding_must_hold_shardings():
  with pytest.raises(TypeError, match=r"\['w'\]"):
    jepa_ema.ema(0.9, target_sharding={"w": "data"})


@pytest.mark.parametrize(
  "prefix, where",
  [
    (lambda bad: {"enc": bad, "head": None}, r"\['enc'\]\['b'\]"),
    (lambda bad: {"enc": None, "head": bad}, r"\['head'\]"),
    (
      lambda bad: {"enc": {"w": None, "b": bad}, "head": None},
      r"\['enc'\]\['b'\]",
    ),
  ],
)
def test_bad_sharding_in_a_prefix_names_the_full_key_path(prefix, where):
  # The key path from the params' root, not from the prefix's leaf.
  mesh = jax.make_mesh((1,), ("data",))
  bad = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec("data", None, None)
  )
  params = {
    "enc": {"w": jnp.ones((4, 2)), "b": jnp.ones(2)},
    "head": jnp.ones(3),
  }
  e = jepa_ema.ema(0.9, target_sharding=prefix(bad))
  with pytest.raises(ValueError, match=where + r": its spec has 3 entries"):
    e.init(params)
