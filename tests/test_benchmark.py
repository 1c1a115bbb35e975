"""The benchmark's trees are the real ViT shapes, and its timing loop runs
(a smoke test: no speed is asserted here; see benchmarks/README.md)."""

import importlib.util
import pathlib

import pytest

PATH = (
  pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ema_bench.py"
)


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("ema_bench", PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(
  "tree,width,depth",
  [("vit_s16", 384, 12), ("vit_b16", 768, 12), ("vit_l16", 1024, 24)],
)
def test_vit_parameter_counts(bench, tree, width, depth):
  # Closed form of a ViT/16 at 224 px without a head: patch embedding,
  # cls + 197 positions, final norm, and per block 12 w^2 + 13 w.
  expected = (
    (768 * width + width)
    + width
    + 197 * width
    + 2 * width
    + depth * (12 * width * width + 13 * width)
  )
  assert bench.num_params(tree) == expected
  assert len(bench.tree_shapes(tree)) == 6 + 12 * depth


@pytest.mark.standard_promotion
def test_timing_loop_smoke(bench):
  variants = [bench.Roofline(), bench.JepaBound(), bench.JepaWrapper()]
  times = bench.time_interleaved("small1000", variants, repeats=3, budget_s=5)
  assert set(times) == {v.name for v in variants}
  assert all(len(v) == 3 and min(v) > 0 for v in times.values())


@pytest.fixture(scope="module")
def options_bench():
  path = PATH.parent / "options_bench.py"
  spec = importlib.util.spec_from_file_location("options_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.standard_promotion  # optax internals promote implicitly
def test_options_bench_accuracy_parts_run(options_bench):
  every = options_bench.every_accuracy(32, ks=(2, 4))["relative_to_lag"]
  assert set(every) == {"every=2", "every=4", "skip k=2", "skip k=4"}
  for k in (2, 4):  # the product momentum tracks the per-step EMA better
    assert every[f"every={k}"]["final"] < every[f"skip k={k}"]["final"]
  stag = options_bench.stagnation(256, steps=100, m=0.99)
  assert abs(stag["float32 target mean"] - (1 - 0.99**100)) < 1e-4


DEVICE_CHECK = PATH.parent / "device_check.py"


def test_device_check_tiny_runs_end_to_end(tmp_path):
  """``device_check.py --tiny``: the accelerator script's code paths, on CPU,
  in seconds; its JSON is complete and every ratio finite and positive (no
  timing is asserted)."""
  import json
  import math
  import os
  import subprocess
  import sys

  proc = subprocess.run(
    [
      sys.executable,
      str(DEVICE_CHECK),
      "--tiny",
      "--budget-s",
      "600",  # a budget it never reaches, so nothing is skipped under load
      "--out",
      str(tmp_path),
    ],
    capture_output=True,
    text=True,
    timeout=900,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "device_check.json").read_text())
  assert (tmp_path / "device_check.md").read_text().startswith("# device_check")
  assert res["skipped"] == []
  assert set(res["trees"]) == {"tiny_a", "tiny_b"}
  for tree in res["trees"].values():
    for mode in ("f32", "bf16 params, f32 target"):
      assert len(tree[mode]) == 5  # no torch GPU here
      for row in tree[mode].values():
        assert math.isfinite(row["vs roofline"]) and row["vs roofline"] > 0
  for key, value in res["blocked"].items():
    assert math.isfinite(value) and value > 0, key
  for row in res["structure"].values():
    assert row["traces over 5 steps"] == 1
    assert row["donated target in place"] is True
  placement = res["placement"]  # the CPU has pinned_host memory too
  assert len(placement["ms per step"]) == 4
  for key in ("pinned_host, every=1", "pinned_host, every=10"):
    assert placement[f"{key} target kind"] == "pinned_host"
    ratio = placement[f"{key} / device, every=1"]
    assert math.isfinite(ratio) and ratio > 0
  assert placement["device, every=1 target kind"] == "device"


def test_device_check_vit_g_is_a_billion_parameters():
  spec = importlib.util.spec_from_file_location("device_check", DEVICE_CHECK)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  n = module.n_params(module.shapes(module.TREES["vit_g14"]))
  assert 0.9e9 < n < 1.1e9
  assert module.n_params(module.shapes(module.TREES["vit_b16"])) == 85_798_656


SCALE = PATH.parent / "scale_bench.py"


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
  """``scale_bench.py --tiny`` on 8 simulated CPU devices (a subprocess: the
  device count is fixed when jax starts), the layouts the tests read."""
  import json
  import os
  import subprocess
  import sys

  out = tmp_path_factory.mktemp("scale")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  proc = subprocess.run(
    [sys.executable, str(SCALE), "--tiny", "--out", str(out)]
    + ["--layouts", "dp", "dp_zero", "lora"],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "scale_results.md").read_text().startswith("Measured on")
  return json.loads((out / "scale_results.json").read_text())


def test_scale_full_model_is_vit_b(scale):
  # The full run's encoder is the ViT-B/16 tree (blocks stacked for a scan).
  assert scale["meta"]["full encoder params"] == 85_798_656


def test_scale_zero_target_is_an_eighth_per_device(scale):
  a, b = scale["layouts"]["dp"], scale["layouts"]["dp_zero"]
  for r in (a, b):  # the shardings' figure is the arrays' own shards
    assert (
      r["target bytes on device 0 (its shards)"]
      == (r["target bytes per device"])
    )
  assert a["target bytes per device"] == a["target bytes (global)"]
  assert 8 * b["target bytes per device"] == a["target bytes per device"]
  # and XLA's per-device arguments shrink by exactly the target's 7/8
  mem = "memory per device, step with EMA"
  arg = "argument_size_in_bytes"
  assert a[mem][arg] - b[mem][arg] == (
    a["target bytes per device"] - b["target bytes per device"]
  )


def test_scale_zero_update_adds_no_collective(scale):
  for name in ("dp", "dp_zero", "lora"):
    r = scale["layouts"][name]
    added = r["collectives added by the EMA update"]
    assert all(v == 0 for v in added.values()), (name, added)
    assert r["collectives, EMA update alone"] == {}, name
  # the data-parallel step's one all-reduce (the gradients) stays the only
  # collective with a target laid out like the params
  assert set(scale["layouts"]["dp"]["collectives, step with EMA"]) == {
    "all-reduce"
  }


def test_scale_lora_state_is_the_adapters(scale):
  e = scale["layouts"]["lora"]
  assert e["target bytes (global)"] == e["adapter bytes (global)"]
  assert e["target bytes per device"] == e["adapter bytes (global)"]
  assert e["target bytes (global)"] < e["tracked bytes (global)"]
