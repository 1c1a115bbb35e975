"""tools/mutate.py, the suite's own measure: which mutants it makes and which
tests it runs for each (pure Python; no test is run, no JAX)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutate():
  pytest.importorskip("tqdm")
  spec = importlib.util.spec_from_file_location(
    "mutate_tool", ROOT / "tools" / "mutate.py"
  )
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules["mutate_tool"] = module
  spec.loader.exec_module(module)
  return module


SOURCE = textwrap.dedent(
  '''\
  """Docstring with a < b and 1 + 1."""

  LIMIT = 3


  def f(x, every=1):
    """f's docstring: x > 0."""
    if x > LIMIT and every:
      raise ValueError(f"x is {x + 1}")
    y = x + 2  # pragma: no mutate
    return jnp.where(x < 0, y, "copy")
  '''
)


def test_mutants_are_the_documented_changes_and_skip_what_is_no_promise(
  mutate,
):
  found = mutate.mutants_of("m.py", SOURCE)
  by = {(m.line, m.operator, m.description) for m in found}
  assert by == {
    (3, "const", "3 -> 4"),
    (6, "const", "1 -> 0"),
    (8, "compare", "> -> >="),
    (8, "boolop", "and -> or"),
    (11, "return-none", "return x -> return None"),
    (11, "compare", "< -> <="),
    (11, "const", "0 -> 1"),
    (11, "action", "'copy' -> 'keep'"),
    (11, "where", "where(a, b, c) -> where(a, c, b)"),
  }
  # No docstring, raise, f-string or pragma line is touched, and every
  # mutant is one valid program that differs from the original.
  for m in found:
    assert m.line not in (1, 7, 9, 10)
    compile(m.source, "m.py", "exec")
    assert m.source != SOURCE
  assert len({m.id for m in found}) == len(found)


def test_statement_lines_and_enclosing_spans(mutate):
  source = "def g(\n  a=1,\n):\n  return (\n    a\n  )\n\nB = 2\n"
  stmts = mutate.statement_lines(source)
  assert stmts[2] == 1  # a default argument: recorded on the def's line
  assert stmts[5] == 4  # inside a multi-line return
  assert stmts[8] == 8
  spans = mutate.enclosing_ranges(source)
  assert spans[2] == (1, 6) and spans[5] == (1, 6)
  assert spans[8] == (1, 8)  # module level: the whole module


def _cmap(lines, spawners=(), users=(), durations=None):
  tests = {c for cs in lines.values() for c in cs if c}
  return {
    "lines": {"jepa_ema/m.py": lines},
    "spawners": list(spawners),
    "users": list(users),
    "durations": durations or {t.removeprefix("sub:"): 1.0 for t in tests},
  }


def _mutant(mutate, line, end=None):
  return mutate.Mutant(
    id="x", path="jepa_ema/m.py", line=line, end_line=end or line,
    operator="const", description="", original="", mutated="", source="",
  )  # fmt: skip


def test_covering_tests_run_the_mutated_lines_fastest_first(mutate):
  cmap = _cmap(
    {"4": ["t::slow", "t::fast"], "5": ["t::other"]},
    durations={"t::slow": 9.0, "t::fast": 0.5, "t::other": 1.0},
  )
  stmts = {5: 4}  # line 5 is the second line of line 4's statement
  kind, tests = mutate.covering_tests(
    _mutant(mutate, 5), cmap, stmts, {5: (1, 9)}
  )
  assert kind == "cover"
  assert tests == ["t::fast", "t::other", "t::slow"]


def test_a_line_run_at_import_is_judged_by_its_definitions_users(mutate):
  # Line 2 (a default argument) runs only at import (context ""); the
  # function spans lines 1-6, whose body lines 4-5 tests run.
  cmap = _cmap(
    {"1": [""], "2": [""], "4": ["t::a"], "5": ["t::b"], "9": ["t::c"]}
  )
  kind, tests = mutate.covering_tests(
    _mutant(mutate, 2), cmap, {2: 1}, {2: (1, 6)}
  )
  assert kind == "import" and sorted(tests) == ["t::a", "t::b"]


def test_a_subprocess_line_brings_the_tests_that_share_its_result(mutate):
  cmap = _cmap(
    {"7": ["sub:tests/test_s.py::first"]},
    spawners=["tests/test_s.py::first"],
    users=[
      "tests/test_s.py::first",
      "tests/test_s.py::second",
      "tests/test_other.py::x",
    ],
  )
  kind, tests = mutate.covering_tests(_mutant(mutate, 7), cmap, {}, {})
  assert kind == "cover"
  assert sorted(tests) == ["tests/test_s.py::first", "tests/test_s.py::second"]


def test_a_line_no_test_reaches_is_uncovered(mutate):
  cmap = _cmap({"3": ["t::a"]})
  assert mutate.covering_tests(_mutant(mutate, 8), cmap, {}, {}) == (
    "uncovered",
    [],
  )


def test_wilson_interval_by_hand(mutate):
  # 95 of 100: the textbook Wilson interval is 0.8883-0.9785.
  lo, hi = mutate.wilson(95, 100)
  assert round(lo, 4) == 0.8882 and round(hi, 4) == 0.9785
  assert mutate.wilson(0, 0) == (0.0, 1.0)
  assert mutate.wilson(10, 10)[1] == 1.0


def test_the_score_leaves_out_equivalents_and_counts_added_tests_after(
  mutate, tmp_path
):
  def record(i, status):
    return {
      "id": f"jepa_ema/m.py:{i}:const:{i}", "path": "jepa_ema/m.py",
      "line": i, "end_line": i, "operator": "const", "description": "",
      "original": "x", "mutated": "y", "status": status, "made": 10,
      "seconds": 1.0, "runs": [],
    }  # fmt: skip

  results = {
    "mutants": {
      r["id"]: r
      for r in [record(i, "caught") for i in range(1, 7)]
      + [record(7, "timeout")]
      + [record(i, "survived") for i in (8, 9, 10)]
    },
    "clean": {},
  }
  verdicts = {
    "jepa_ema/m.py:8:const:8": {"verdict": "equivalent", "note": ""},
    "jepa_ema/m.py:9:const:9": {"verdict": "test added", "note": ""},
  }
  per = mutate.summarize(results, verdicts)["jepa_ema/m.py"]
  assert per["score"] == 7 / 9 and per["after"] == 8 / 9
  out = tmp_path / "m.md"
  mutate.write_markdown(out, results, verdicts, {"jepa_ema/m.py": 10})
  text = out.read_text()
  assert "Score over the 9 non-equivalent mutants run: 77.8 %" in text
  assert "| **all** | 10 | 10 | 6 | 1 | 3 | 1 | 77.8 % | 1 | 88.9 % |" in text
