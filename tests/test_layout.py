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
import optax
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


# What the default path (no target_sharding, no memory_kind) lowers to holds
# none of the layout and memory machinery: no barrier, no custom call, no
# memory-kind or sharding annotation, no host placement.
_MACHINERY = re.compile(
  r"optimization_barrier|custom_call|memory_kind|mhlo\.sharding|"
  r"sharding_constraint|annotate_device_placement|_xla_buffer_placement"
)
# The fixed reference: ema(0.9).update of {"w": f32[1024]} compiled by XLA:CPU
# (recorded with jax 0.10.2; regenerate with _computations below when a
# change of the kernel or of jax changes it on purpose). Its entry: the four
# arguments (params, step, target, skipped), one loop fusion for the blend,
# which reads the target and the params once each (12 bytes per param), one
# for the step's saturating increment, and nothing else.
_REFERENCE_JAX = "0.10.2"
_REFERENCE_ENTRY = {"parameter": 4, "fusion": 2, "copy": 1, "tuple": 1}
_REFERENCE_BLEND = {  # the two-sided lerp, t == o kept (the blend fusion)
  "parameter": 2,
  "subtract": 2,
  "abs": 1,
  "constant": 5,
  "broadcast": 5,
  "compare": 2,
  "multiply": 3,
  "select": 3,
  "add": 1,
}


def _computations(hlo: str) -> dict[str, dict[str, int]]:
  """Op counts per computation of a compiled HLO module (key "ENTRY" for
  the entry computation)."""
  out: dict[str, dict[str, int]] = {}
  name = None
  for ln in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$", ln)
    if m:
      name = "ENTRY" if m.group(1) else m.group(2)
      out[name] = {}
    elif ln.startswith("}"):
      name = None
    elif name is not None:
      op = re.search(r"=\s.*?\s([a-z][a-z0-9\-]*)\(", ln)
      if op:
        out[name][op.group(1)] = out[name].get(op.group(1), 0) + 1
  return out


@pytest.mark.parametrize(
  "kw", [dict(), dict(target_sharding=None, memory_kind=None)]
)
def test_default_paths_compile_to_the_same_program(kw):
  """The default program against a fixed reference (not against itself:
  adding a barrier or the offload step logic to the default path fails)."""
  params = {"w": jnp.ones((4, 3)), "n": jnp.array(2)}
  several = jepa_ema.ema((0.9, 0.99), every=2, skip_nonfinite=True, **kw)
  tx = optax.chain(optax.sgd(0.1), jepa_ema.track_ema(0.9, **kw))
  lowered = {
    "several, every, skip": jax.jit(several.update).lower(
      params, several.init(params)
    ),
    "track_ema": jax.jit(tx.update).lower(params, tx.init(params), params),
    "make_ema_update": jax.jit(
      jepa_ema.make_ema_update(0.9, donate=False)
    ).lower(params, params, 3),
  }
  for name, low in lowered.items():
    found = sorted(set(_MACHINERY.findall(low.as_text())))
    assert found == [], (name, found)
  # the check can fail: the offloaded program holds its memory kinds
  host = jepa_ema.ema(0.9, memory_kind="pinned_host")
  text = jax.jit(host.update).lower(params, host.init(params)).as_text()
  assert _MACHINERY.search(text)

  one = {"w": jnp.ones(1024)}
  plain = jepa_ema.ema(0.9, **kw)
  low = jax.jit(plain.update).lower(one, plain.init(one))
  assert _MACHINERY.search(low.as_text()) is None
  comps = _computations(low.compile().as_text())
  assert comps["ENTRY"] == _REFERENCE_ENTRY, comps["ENTRY"]
  blend = [c for n, c in comps.items() if n != "ENTRY" and c.get("abs")]
  assert len(blend) == 1, comps
  if jax.__version__ == _REFERENCE_JAX:  # XLA's fusion is the version's
    assert blend[0] == _REFERENCE_BLEND, blend[0]


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


# ---------------------------------------------------------------- round 4
# tests/scripts/zero_teacher.py: sharded_over, get_target(online=) in a
# data-parallel teacher forward pass, state_shardings of abstract and
# concrete states, a ZeRO-style + host-memory checkpoint round trip.


@pytest.fixture(scope="module")
def zero(on_eight_devices):
  return on_eight_devices("zero_teacher.py")


@pytest.mark.parametrize("axes", AXES)
def test_sharded_over_shards_the_first_dimension_that_divides(zero, axes):
  r = zero[axes]["helper"]
  # Mesh (data 4, model 2); params replicated unless said otherwise.
  assert r["specs"] == {
    "w": ["data", None],  # (16, 6): the first dimension divides
    "b": None,  # (10,): 4 does not divide 10, keeps the param's layout
    "k": [None, "data"],  # (3, 8): the first dimension that divides
    "m": ["data", "model"],  # P(None, 'model'): the param's axis kept
    "q": None,  # already over 'data': the param's layout
    "s": None,  # a scalar
  }
  assert r["specs_both"]["w"] == [["data", "model"], None]  # size 8 divides 16
  assert r["specs_both"]["k"] == [None, ["data", "model"]]
  assert r["specs_both"]["m"] is None  # already over 'model'
  assert r["equal_and_hashable"] is True
  assert "no axis 'batch'" in r["unknown_axis"] and "['b']" in r["unknown_axis"]


@pytest.mark.parametrize("axes", AXES)
def test_sharded_over_layout_is_created_and_kept_bitwise(zero, axes):
  r = zero[axes]["helper"]
  want = {
    "w": ["data", None],
    "b": [None],
    "k": [None, "data"],
    "m": ["data", "model"],
    "q": ["data", None],
    "s": [],
  }
  # Eager init, jit(init, out_shardings=ema.state_shardings), then three
  # jitted, donated updates (on Auto axes the traced params carry no
  # layout: the helper keeps the one it computed from the concrete params).
  assert r["init_eager"] == want
  assert r["init_jit"] == want
  assert r["after_updates"] == want
  assert r["bitwise"] is True
  assert r["w_shard_shape"] == [4, 6]  # 1/4 of (16, 6) per device


@pytest.mark.parametrize("axes", AXES)
def test_sharded_over_costs_an_eighth_on_eight_data_parallel_devices(
  zero, axes
):
  per_device = zero[axes]["helper"]["eight_bytes_per_device"]
  assert per_device == {"w": 64 * 32 * 4 // 8, "b": 10 * 4}  # b: 8 ∤ 10


@pytest.mark.parametrize("memory", ["zero", "zero_host"])
def test_data_parallel_teacher_reads_a_zero_target_on_explicit_axes(
  zero, memory
):
  if memory not in zero["explicit"]["teacher"]:
    pytest.skip("this platform has no pinned_host memory")
  r = zero["explicit"]["teacher"][memory]
  # The stored target as it is: the forward pass does not type-check (the
  # issue's error), or reads host memory.
  assert r["stored"] == ["data", None]
  assert r["raw_forward"] == "ShardingTypeError"
  # get_target(online=params): like the params, eagerly and inside jit.
  assert r["eager_layout"] == [None, None] and r["eager_memory"] == "device"
  assert r["eager_b_is_online"] is True  # an excluded leaf, from online
  assert r["stored_unchanged"] is True
  assert r["eager_forward"] is True and r["jit_forward"] is True  # bitwise
  assert r["jit_typed"] == ["P(None, None)", "MemorySpace.Device"]
  assert r["jit_out"] == ["data", None]  # the batch's layout


@pytest.mark.parametrize("memory", ["zero", "zero_host"])
def test_teacher_on_auto_axes_gets_the_same_weights(zero, memory):
  if memory not in zero["auto"]["teacher"]:
    pytest.skip("this platform has no pinned_host memory")
  r = zero["auto"]["teacher"][memory]
  assert r["eager_layout"] == [None, None] and r["eager_memory"] == "device"
  assert r["eager_forward"] is True
  # Inside jit XLA picks the layout (and the order of the contraction's
  # sum): the same values to float32 rounding.
  assert r["jit_forward_max_rel"] < 1e-6


@pytest.mark.parametrize("axes", AXES)
def test_state_shardings_never_reports_another_layout(zero, axes):
  r = zero[axes]["state_shardings"]
  assert r["method_spec"][0] == "data"  # ema.state_shardings knows
  assert r["keywords_spec"][0] == "data"
  assert r["concrete_spec"][0] == "data"  # a concrete state as it is
  assert r["concrete_step_is_its_own"] is True
  assert r["abstract_is_concrete_mesh"] is True
  if axes == "explicit":  # eval_shape carries the layout: reported
    assert r["abstract_spec"] == ["data", None]
  else:  # Auto axes: eval_shape drops it (the docstring says so)
    assert r["abstract_spec"] == []


@pytest.mark.parametrize("axes", AXES)
def test_checkpoint_restores_a_zero_and_host_state_in_its_layout(zero, axes):
  if not zero["host_memory"]:
    pytest.skip("this platform has no pinned_host memory")
  r = zero[axes]["checkpoint"]
  assert r["bitwise"] is True
  assert r["layout"] == [
    [["data", None], "device", [None]],
    [["data", None], "pinned_host", [None]],
  ]
  assert all(r["same_shardings"])
  assert r["updates_after_restore"] == ["device", "pinned_host"]
