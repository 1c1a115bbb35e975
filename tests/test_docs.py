"""The README's code runs, and the quickstart example does what it says."""

import pathlib
import re
import runpy
import sys
import warnings

import jax
import numpy as np
import pytest

import jepa_ema

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.standard_promotion
def test_readme_quickstart_runs_and_tracks():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python code block"
  ns: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), ns)  # pylint: disable=exec-used
  params, opt_state = ns["params"], ns["opt_state"]
  x = jax.numpy.ones((4, 8))
  for _ in range(3):
    params, opt_state, loss = ns["train_step"](params, opt_state, x)
  assert np.isfinite(float(loss))
  state = opt_state[-1]
  assert int(state.step) == 3
  # The target lags the online params: it is neither the old nor the new params.
  target = ns["jepa_ema"].get_target(opt_state)
  assert not np.allclose(target["kernel"], params["kernel"])


def test_options_page_block_runs():
  text = (ROOT / "docs" / "howto" / "options.md").read_text()
  block = [
    b
    for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if "every=4, drift=True" in b
  ][0]
  ns: dict = {}
  exec(compile(block, "README.md", "exec"), ns)  # pylint: disable=exec-used
  state, state16 = ns["state"], ns["state16"]
  assert int(state.step) == 8
  # after 8 steps of p <- 0.99 p, two every=4 updates: the target lags
  assert 0.0 < float(state.drift["global"]) < 0.1
  assert state16.target["encoder"]["w"].dtype == jax.numpy.bfloat16
  assert ns["teacher"]["encoder"]["w"].shape == (8, 8)


@pytest.mark.standard_promotion
def test_quickstart_example(capsys):
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    module = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
  finally:
    sys.path.pop(0)
  result = module["main"](["--steps", "120"])
  out = capsys.readouterr().out
  assert "momentum" in out and "EMA target loss" in out
  assert result["online_loss"] < 1e-2
  assert result["target_loss"] < 1e-1
  assert 0 < result["lag"] < 0.1


def _block(marker: str, page: str) -> str:
  text = (ROOT / "docs" / page).read_text()
  found = [
    b
    for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if marker in b
  ]
  assert len(found) == 1, marker
  return found[0]


def test_transfer_page_scaling_block():
  ns: dict = {}
  block = _block("scale_momentum(ref, 1024 / 256)", "howto/transfer.md")
  exec(compile(block, "transfer.md", "exec"), ns)  # pylint: disable=exec-used
  assert ns["lr"] == pytest.approx(2 * ns["base_lr"])
  np.testing.assert_allclose(float(ns["momentum"](0)), 0.996**4, rtol=1e-6)


def test_concepts_page_timm_port():
  ns: dict = {}
  block = _block("update_after_step", "concepts.md")
  exec(compile(block, "concepts.md", "exec"), ns)  # pylint: disable=exec-used
  timm, u = ns["timm"], ns["u"]
  assert [float(timm(t)) for t in range(u + 1)] == [0.0] * (u + 1)  # copies
  want = max(1 - 2 ** -ns["power"], ns["min_decay"])  # timm at step u + 2
  assert float(timm(u + 1)) == pytest.approx(want, abs=1e-7)


@pytest.mark.standard_promotion
def test_posthoc_page_block(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ns: dict = {}
  block = _block("snaps.maybe_save(state)", "howto/posthoc.md")
  exec(compile(block, "posthoc.md", "exec"), ns)  # pylint: disable=exec-used
  assert len(ns["snaps"]) == 6  # steps 100, 200, 300 x two widths
  assert ns["model"]["w"].shape == (3,)
  assert ns["x"].shape == (6,) and ns["x"].sum() == pytest.approx(1.0)


def _nearest_reference(dtype, m=0.999, steps=2000):
  """float32 blend rounded to ``dtype`` (to nearest) each step, from 0
  towards 1, in NumPy (ml_dtypes): independent of jepa_ema's code."""
  import ml_dtypes

  dt = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}[dtype]
  a = np.float32(1) - np.float32(m)
  t = np.zeros((), dt)
  for _ in range(steps):
    t32 = np.float32(t)
    t = np.asarray(t32 + a * (np.float32(1) - t32)).astype(dt)
  return float(t)


def test_half_precision_page_prints_what_it_says(capsys):
  """The bf16 / float16 page's printed table is what its block prints, the
  round-to-nearest runs warn at init, and every printed figure matches a
  reference computed independently: the float64 EMA ``1 - 0.999**2000``,
  a NumPy simulation of round-to-nearest (where the target stalls), and the
  exact EMA within 6 standard errors for the stochastic runs."""
  from inputs_table import stochastic_mean_bound

  block = _block("f16 target, stochastic", "howto/bf16.md")
  text = (ROOT / "docs" / "howto" / "bf16.md").read_text()
  said = re.search(r"prints\n\n```\n(.*?)```", text, flags=re.S).group(1)
  with pytest.warns(jepa_ema.PrecisionWarning) as caught:
    exec(compile(block, "bf16.md", "exec"), {})  # pylint: disable=exec-used
  assert len(caught) == 2  # the two round-to-nearest half-precision runs
  assert capsys.readouterr().out == said
  exact = 1 - 0.999**2000
  rows = dict(re.findall(r"^ *(.+?): (\d\.\d{4})  \(exact", said, flags=re.M))
  assert re.findall(r"\(exact: (\d\.\d{4})\)", said) == [f"{exact:.4f}"] * 5
  for kind in ("bf16", "f16"):
    assert rows[f"{kind} target, nearest"] == f"{_nearest_reference(kind):.4f}"
  assert abs(float(rows["f32 target"]) - exact) <= 5e-5 + 1e-5
  for kind, ulp in (("bf16", 2.0**-8), ("f16", 2.0**-11)):
    got = float(rows[f"{kind} target, stochastic"])
    assert abs(got - exact) <= stochastic_mean_bound(ulp, 0.999, 4096) + 5e-5


def test_every_guarantee_names_tests_that_exist():
  import guarantee_pins

  assert guarantee_pins.problems() == []
  named = guarantee_pins.pins(guarantee_pins.PAGE.read_text())
  assert len(named) >= 30  # the page is parsed, not skipped


def test_guarantee_pins_fail_on_a_missing_test_or_an_unpinned_promise():
  import guarantee_pins

  page = guarantee_pins.PAGE.read_text()
  renamed = page.replace(
    "test_property_fixed_point`", "test_property_fixed_pointless`", 1
  )
  assert guarantee_pins.problems(renamed) == [
    "tests/test_update.py::test_property_fixed_pointless is named on the "
    "page but does not exist"
  ]
  unpinned = page.replace(
    "  `tests/test_update.py::test_property_fixed_point`.", "", 1
  ).replace("no drift from rounding. *Pinned by*", "no drift from rounding.")
  found = guarantee_pins.problems(unpinned)
  assert len(found) == 1 and "A converged target stays put" in found[0]
  row = "| `tests/test_sharding.py::test_mismatch_is_reported` |"
  assert guarantee_pins.problems(page.replace(row, "| |"))[0].startswith(
    "Reported: no test pins"
  )


def test_recipe_pages_hold_the_current_recipes(tmp_path, monkeypatch):
  """The how-to pages hold their recipe's code (readable on GitHub), and a
  stale copy is caught."""
  import recipe_pages

  assert recipe_pages.stale() == []
  for page, example in recipe_pages.PAGES.items():
    text = (ROOT / page).read_text()
    assert "--8<--" not in text
    assert (ROOT / example).read_text() in text
  page = tmp_path / "docs" / "howto" / "nnx.md"
  page.parent.mkdir(parents=True)
  page.write_text(
    (ROOT / "docs/howto/nnx.md").read_text().replace("nnx.jit", "jit")
  )
  for name, example in recipe_pages.PAGES.items():
    if name != "docs/howto/nnx.md":
      (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / example).parent.mkdir(exist_ok=True)
    (tmp_path / example).write_text((ROOT / example).read_text())
  monkeypatch.setattr(recipe_pages, "ROOT", tmp_path)
  assert recipe_pages.stale() == ["docs/howto/nnx.md"]


def _quoted(page: str, source: str, extra: str = "") -> str:
  """The copy of ``source`` that ``page`` holds between its results markers
  (``extra``: a regex for the start marker's further text)."""
  found = re.search(
    rf"<!-- results:start {re.escape(source)}{extra} -->\n(.*?)\n"
    r"<!-- results:end -->",
    (ROOT / page).read_text(),
    flags=re.S,
  )
  assert found is not None, f"{page} has no results block for {source}"
  return found.group(1)


def test_sharding_page_holds_the_current_scale_results():
  """The sharding page holds a copy of benchmarks/scale_results.md (readable on
  GitHub, no include line), equal to the generated file."""
  assert "--8<--" not in (ROOT / "docs/howto/sharding.md").read_text()
  quoted = _quoted(
    "docs/howto/sharding.md", "benchmarks/scale_results.md", " [^>]*"
  )
  generated = (ROOT / "benchmarks/scale_results.md").read_text().rstrip("\n")
  assert quoted == generated, (
    "docs/howto/sharding.md holds a stale copy of benchmarks/scale_results.md"
  )


def test_testing_page_holds_the_current_mutation_results():
  """docs/testing.md quotes tools/mutate.py's summary of the last run (the
  table and the score, tools/mutation_results/package_summary.md) as it is."""
  source = "tools/mutation_results/package_summary.md"
  generated = (ROOT / source).read_text().rstrip("\n")
  assert _quoted("docs/testing.md", source) == generated, (
    "docs/testing.md holds a stale copy of the mutation summary"
  )


DOCS = sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.standard_promotion  # flax / optax / orbax inside
@pytest.mark.parametrize(
  "page", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS]
)
def test_docs_code_blocks_run(page, tmp_path, monkeypatch):
  """Every ```python block of a docs page runs, in order, in one namespace
  per page, so the docs cannot rot. Blocks that only include an example
  file (``--8<--``), or hold a copy of one (tests/recipe_pages.py), are that
  example, run by tests/test_examples.py."""
  monkeypatch.chdir(tmp_path)
  text = re.sub(
    r"<!-- recipe:start .*?<!-- recipe:end -->",
    "",
    page.read_text(),
    flags=re.S,
  )
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  ns: dict = {"__name__": "docs"}
  with warnings.catch_warnings():
    # The bf16 page stalls targets on purpose (its own test asserts the
    # warnings: test_half_precision_page_prints_what_it_says).
    warnings.simplefilter("ignore", jepa_ema.PrecisionWarning)
    for block in blocks:
      if not block.strip().startswith("--8<--"):
        exec(compile(block, str(page), "exec"), ns)  # pylint: disable=exec-used
