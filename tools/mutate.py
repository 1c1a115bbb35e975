"""Mutation testing for jepa_ema: how many small semantic changes the suite catches.

Each mutant is one AST-level change to one module of ``jepa_ema/`` (a swapped
comparison, ``and``/``or``, ``+``/``-``, a changed constant, a policy action
swapped for another, a removed call statement, ...; see :func:`mutants_of`).
For each mutant the script runs that module's test selection
(:data:`SELECTION`) and the module's doctests with
``pytest -x -q -p no:randomly -p no:cacheprovider``; a failing run catches the
mutant, a run past the timeout (3x the clean run) counts as caught too but is
reported apart.

The repository is never touched: it is copied (``git ls-files`` plus untracked
files git does not ignore) to a snapshot under ``/tmp``, the mutants are made
from that snapshot, and each worker mutates a copy of its own, with ``cwd`` and
``PYTHONPATH`` set to it (a smoke check asserts the copy's ``jepa_ema`` is the
one imported), restoring the file after each mutant.

Two stages keep a run within hours: a module may have a quick first-pass
selection (:data:`FIRST_PASS`, e.g. the tests whose name says ``drift``); a
mutant that survives it is run again against the full selection, so a
reported survivor survived the whole selection.

Run, e.g.::

  .venv/bin/python tools/mutate.py --modules _drift _every \\
    --json tools/mutation_results/results.json \\
    --markdown tools/mutation_results/results.md
  .venv/bin/python tools/mutate.py --modules schedules --sample 40 \\
    --json tools/mutation_results/results.json \\
    --markdown tools/mutation_results/results.md

Results accumulate in the JSON file (a rerun skips the mutants already there:
a mutant's id hashes the whole mutated file, so an edited module gets fresh
ids). Survivor verdicts live in ``--verdicts`` (default
``tools/mutation_results/verdicts.json``: ``{id: {"verdict": ..., "note":
...}}``) and are copied into the markdown. A line holding
``# pragma: no mutate`` is never mutated.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import os
import pathlib
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "jepa_ema"
PRAGMA = "# pragma: no mutate"
RESULTS = ROOT / "tools" / "mutation_results"
SUBPROCESS = "sub:"  # as in tools/mutate_contexts.py

# Module (path relative to the repository root) -> the test files that
# exercise it. Edit this table when modules move; a module of the package
# without an entry is reported (and skipped) by every run. The module's own
# doctests always run too.
SELECTION: dict[str, list[str]] = {
  "jepa_ema/__init__.py": ["tests/test_transform.py", "tests/test_docs.py"],
  "jepa_ema/schedules.py": [
    "tests/test_schedules.py",
    "tests/test_ports.py",
    "tests/test_options_meet.py",
    "tests/test_inputs.py",
  ],
  "jepa_ema/_kernel.py": [
    "tests/test_update.py",
    "tests/test_inputs.py",
    "tests/test_options_meet.py",
    "tests/test_combinations.py",
  ],
  "jepa_ema/update.py": [
    "tests/test_update.py",
    "tests/test_inputs.py",
    "tests/test_options_meet.py",
    "tests/test_combinations.py",
  ],
  "jepa_ema/transform.py": [
    "tests/test_transform.py",
    "tests/test_options.py",
    "tests/test_combinations.py",
    "tests/test_options_meet.py",
    "tests/test_policy.py",
    "tests/test_layout.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/policy.py": [
    "tests/test_policy.py",
    "tests/test_combinations.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/placement.py": ["tests/test_layout.py", "tests/test_sharding.py"],
  "jepa_ema/posthoc.py": ["tests/test_posthoc.py"],
  "jepa_ema/_every.py": [
    "tests/test_options.py",
    "tests/test_inputs.py",
    "tests/test_combinations.py",
    "tests/test_options_meet.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/_drift.py": [
    "tests/test_options.py",
    "tests/test_options_meet.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/_rounding.py": ["tests/test_options.py", "tests/test_inputs.py"],
  "jepa_ema/nnx.py": ["tests/test_nnx.py"],
  "jepa_ema/_checks.py": [
    "tests/test_inputs.py",
    "tests/test_policy.py",
    "tests/test_nnx.py",
    "tests/test_posthoc.py",
  ],
  "jepa_ema/_options.py": [
    "tests/test_inputs.py",
    "tests/test_options.py",
    "tests/test_transform.py",
    "tests/test_options_meet.py",
  ],
  "jepa_ema/_plan.py": [
    "tests/test_policy.py",
    "tests/test_combinations.py",
    "tests/test_layout.py",
    "tests/test_options.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/_skip.py": [
    "tests/test_options.py",
    "tests/test_options_meet.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/_write_back.py": [
    "tests/test_options.py",
    "tests/test_options_meet.py",
    "tests/test_combinations.py",
    "tests/test_reference_model.py",
  ],
  "jepa_ema/state.py": [
    "tests/test_transform.py",
    "tests/test_layout.py",
    "tests/test_policy.py",
    "tests/test_combinations.py",
    "tests/test_reference_model.py",
  ],
}

# The coverage map (``--build-map``) runs every test file but these: they
# build wheels, run the examples or benchmarks end to end, or start several
# processes, and none of them is in a SELECTION entry.
MAP_EXCLUDE = {
  "tests/test_benchmark.py",
  "tests/test_examples.py",
  "tests/test_floors.py",
  "tests/test_multiprocess.py",
  "tests/test_wheel.py",
}

# Optional quick first pass (extra pytest arguments allowed, e.g. ``-k``): a
# mutant it catches is caught; one that survives it is run again against the
# full SELECTION entry, so only the full selection decides a survivor.
FIRST_PASS: dict[str, list[str]] = {
  "jepa_ema/_drift.py": [
    "tests/test_options.py",
    "tests/test_options_meet.py",
    "-k",
    "drift",
  ],
  "jepa_ema/_every.py": [
    "tests/test_options.py",
    "tests/test_options_meet.py",
    "tests/test_combinations.py",
    "-k",
    "every or window or clip",
  ],
  "jepa_ema/schedules.py": ["tests/test_schedules.py", "tests/test_ports.py"],
}

PYTEST_FLAGS = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
TIMEOUT_FACTOR = 3.0
MIN_TIMEOUT_S = 30.0

ACTIONS = ("average", "copy", "keep", "exclude")
COMPARE_SWAPS: dict[type, type] = {
  ast.Lt: ast.LtE,
  ast.LtE: ast.Lt,
  ast.Gt: ast.GtE,
  ast.GtE: ast.Gt,
  ast.Eq: ast.NotEq,
  ast.NotEq: ast.Eq,
  ast.Is: ast.IsNot,
  ast.IsNot: ast.Is,
  ast.In: ast.NotIn,
  ast.NotIn: ast.In,
}
BINOP_SWAPS: dict[type, type] = {
  ast.Add: ast.Sub,
  ast.Sub: ast.Add,
  ast.Mult: ast.Div,
  ast.Div: ast.Mult,
  ast.FloorDiv: ast.Mult,
  ast.Mod: ast.FloorDiv,
  ast.Pow: ast.Mult,
  ast.BitOr: ast.BitAnd,  # `|` / `&` are JAX's elementwise or / and
  ast.BitAnd: ast.BitOr,
}
MINMAX = {
  "min": "max",
  "max": "min",
  "minimum": "maximum",
  "maximum": "minimum",
  "amin": "amax",
  "amax": "amin",
}


@dataclasses.dataclass
class Mutant:
  """One change to one module.

  Attributes:
    id: ``path:line:operator:hash``; the hash covers the whole mutated file,
      so an id names this exact program.
    path: The module, relative to the repository root.
    line: First line of the changed node (1-based).
    end_line: Last line of the changed node.
    operator: The kind of change (e.g. ``compare``, ``const``).
    description: What changed, e.g. ``< -> <=``.
    original: The original source lines of the change.
    mutated: The same lines after the change.
    source: The whole mutated module.
  """

  id: str
  path: str
  line: int
  end_line: int
  operator: str
  description: str
  original: str
  mutated: str
  source: str = dataclasses.field(repr=False)


# ---------------------------------------------------------------------------
# Making mutants.


def _line_offsets(data: bytes) -> list[int]:
  """Byte offset of the start of each line (index 0 is line 1)."""
  offsets, pos = [0], 0
  for line in data.splitlines(keepends=True):
    pos += len(line)
    offsets.append(pos)
  return offsets


def _is_docstring(stmt: ast.stmt) -> bool:
  return (
    isinstance(stmt, ast.Expr)
    and isinstance(stmt.value, ast.Constant)
    and isinstance(stmt.value.value, str)
  )


def _skipped_subtrees(tree: ast.Module) -> set[int]:
  """ids of nodes never mutated, nor their children: docstrings (any bare
  string statement), annotations, ``__all__``, raise statements (their
  messages are no promise), f-strings and match patterns."""
  skip: set[int] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Expr) and _is_docstring(node):
      skip.add(id(node))
    elif isinstance(node, (ast.Raise, ast.JoinedStr, ast.match_case)):
      skip.add(id(node))
    elif isinstance(node, ast.arg) and node.annotation is not None:
      skip.add(id(node.annotation))
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      if node.returns is not None:
        skip.add(id(node.returns))
    elif isinstance(node, ast.AnnAssign):
      skip.add(id(node.annotation))
    elif isinstance(node, (ast.Assign, ast.AugAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
        skip.add(id(node))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      skip.add(id(node))
  return skip


def _walk(tree: ast.AST, skip: set[int]) -> Iterator[ast.AST]:
  """Every node of ``tree`` outside the skipped subtrees, in source order."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if id(node) in skip:
      continue
    yield node
    stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _changes(
  node: ast.AST, in_function: bool
) -> Iterator[tuple[str, str, str]]:
  """The changes of one node: ``(operator, description, replacement)`` where
  ``replacement`` is new source for the node's span."""

  def unparse(new: ast.AST) -> str:
    text = ast.unparse(new)
    return text if isinstance(new, ast.stmt) else f"({text})"

  if isinstance(node, ast.Compare):
    for i, op in enumerate(node.ops):
      swap = COMPARE_SWAPS.get(type(op))
      if swap is not None:
        new = copy.deepcopy(node)
        new.ops[i] = swap()
        desc = f"{_op_text(op)} -> {_op_text(swap())}"
        yield "compare", desc, unparse(new)
  elif isinstance(node, ast.BoolOp):
    new = copy.deepcopy(node)
    new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    desc = "and -> or" if isinstance(node.op, ast.And) else "or -> and"
    yield "boolop", desc, unparse(new)
  elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
    yield "not", "not x -> x", unparse(node.operand)
  elif isinstance(node, (ast.BinOp, ast.AugAssign)):
    swap = BINOP_SWAPS.get(type(node.op))
    if swap is not None:
      new = copy.deepcopy(node)
      new.op = swap()
      desc = f"{_op_text(node.op)} -> {_op_text(swap())}"
      yield "arith", desc, unparse(new)
  elif isinstance(node, ast.Constant):
    v = node.value
    if isinstance(v, bool):
      yield "bool", f"{v} -> {not v}", str(not v)
    elif isinstance(v, int):
      new_v: float = 0 if v == 1 else 1 if v == 0 else v + 1
      yield "const", f"{v} -> {new_v}", repr(new_v)
    elif isinstance(v, float):
      new_v = 1.0 if v == 0.0 else 0.0 if v == 1.0 else v / 2
      yield "const", f"{v!r} -> {new_v!r}", repr(new_v)
    elif isinstance(v, str) and v in ACTIONS:
      new_s = ACTIONS[(ACTIONS.index(v) + 1) % len(ACTIONS)]
      yield "action", f"{v!r} -> {new_s!r}", repr(new_s)
  elif isinstance(node, ast.Call):
    f = node.func
    name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
    if name in MINMAX:
      new = copy.deepcopy(node)
      if isinstance(new.func, ast.Name):
        new.func.id = MINMAX[name]
      else:
        assert isinstance(new.func, ast.Attribute)
        new.func.attr = MINMAX[name]
      yield "minmax", f"{name} -> {MINMAX[name]}", unparse(new)
    if name == "where" and len(node.args) == 3 and not node.keywords:
      new = copy.deepcopy(node)
      new.args[1], new.args[2] = new.args[2], new.args[1]
      yield "where", "where(a, b, c) -> where(a, c, b)", unparse(new)
  elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
    yield "drop-call", "call statement removed", "pass"
  elif isinstance(node, ast.Return) and in_function and node.value is not None:
    if not (isinstance(node.value, ast.Constant) and node.value.value is None):
      yield "return-none", "return x -> return None", "return None"


def _op_text(op: ast.AST) -> str:
  text = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitOr: "|",
    ast.BitAnd: "&",
  }
  return text[type(op)]


def _function_nodes(tree: ast.Module) -> set[int]:
  """ids of the return statements that sit directly in a function."""
  inside: set[int] = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, ast.Return):
          inside.add(id(node))
  return inside


def mutants_of(path: str, source: str) -> list[Mutant]:
  """Every mutant of one module, in source order.

  Operators: comparison swaps (``<``/``<=``, ``>``/``>=``, ``==``/``!=``,
  ``is``/``is not``, ``in``/``not in``), ``and``/``or``, ``not`` removed,
  arithmetic swaps (``+``/``-``, ``*``/``/``, ``//`` -> ``*``, ``%`` ->
  ``//``, ``**`` -> ``*``, ``|``/``&``), numeric constants (0 -> 1, 1 -> 0,
  n -> n + 1; 0.0 -> 1.0, 1.0 -> 0.0, x -> x / 2), a policy action string
  swapped for the next of ``average, copy, keep, exclude``, ``True``/``False``,
  ``return x`` -> ``return None``, a call statement removed, ``min``/``max``
  (also ``minimum``/``maximum``), and ``where(a, b, c)`` -> ``where(a, c,
  b)``. Skipped: docstrings, annotations, ``__all__``, imports, raise
  statements, f-strings, and lines marked ``# pragma: no mutate``.

  Args:
    path: The module's path relative to the repository root (for ids).
    source: The module's source.

  Returns:
    The mutants; a change that leaves the AST as it was, or repeats another
    mutant's program, is dropped.
  """
  data = source.encode()
  lines = source.splitlines()
  offsets = _line_offsets(data)
  tree = ast.parse(source)
  skip = _skipped_subtrees(tree)
  in_function = _function_nodes(tree)
  original_dump = ast.dump(tree)
  seen: set[str] = set()
  out: list[Mutant] = []
  for node in _walk(tree, skip):
    if not hasattr(node, "lineno") or node.end_lineno is None:
      continue
    line, end = node.lineno, node.end_lineno
    if PRAGMA in lines[line - 1]:
      continue
    start_b = offsets[line - 1] + node.col_offset
    end_b = offsets[end - 1] + (node.end_col_offset or 0)
    for operator, desc, repl in _changes(node, id(node) in in_function):
      new_data = data[:start_b] + repl.encode() + data[end_b:]
      new_source = new_data.decode()
      try:
        new_tree = ast.parse(new_source)
      except SyntaxError:
        continue
      if ast.dump(new_tree) == original_dump:
        continue
      digest = hashlib.sha1(new_data).hexdigest()[:12]
      if digest in seen:
        continue
      seen.add(digest)
      first = data[offsets[line - 1] : start_b].decode()
      last = data[end_b : offsets[end]].decode().rstrip("\n")
      out.append(
        Mutant(
          id=f"{path}:{line}:{operator}:{digest}",
          path=path,
          line=line,
          end_line=end,
          operator=operator,
          description=desc,
          original="\n".join(lines[line - 1 : end]),
          mutated=first + repl + last,
          source=new_source,
        )
      )
  return out


# ---------------------------------------------------------------------------
# Copies of the repository.


def repo_files(root: pathlib.Path) -> list[str]:
  """Tracked files plus untracked ones git does not ignore (present ones)."""
  out = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=root,
    capture_output=True,
    check=True,
  ).stdout.decode()
  names = sorted({n for n in out.split("\0") if n})
  return [n for n in names if (root / n).is_file()]


def copy_tree(
  src: pathlib.Path, dst: pathlib.Path, names: Sequence[str]
) -> None:
  """Copies ``names`` (relative paths) from ``src`` into a fresh ``dst``."""
  if dst.exists():
    shutil.rmtree(dst)
  for name in names:
    target = dst / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / name, target)


def test_env(
  copy_root: pathlib.Path, cache: pathlib.Path | None = None
) -> dict[str, str]:
  """The environment of a test run in ``copy_root``: its package first on
  the path, no bytecode written (a restored file must never meet the
  mutant's cached bytecode), JAX on the CPU.

  With ``cache``, JAX's persistent compilation cache lives there (every
  program, however quick to compile): the programs a mutant does not touch
  are loaded instead of compiled again. A cache entry is keyed by the
  program itself, so a mutated program never meets an unmutated one's
  executable; that no test depends on a cold cache is checked after a run
  (:func:`check_killers`).
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(copy_root), str(ROOT / "tools")])
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  env.setdefault("JAX_PLATFORMS", "cpu")
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def smoke_check(copy_root: pathlib.Path) -> str:
  """Asserts that a test run in ``copy_root`` imports the copy's package.

  A throwaway test file in the copy prints ``jepa_ema.__file__`` from inside
  pytest (the way the mutants are run), then is removed.

  Returns:
    The imported package's ``__file__``.
  """
  probe = copy_root / "tests" / "test_zz_mutate_probe.py"
  probe.write_text(
    f"import {PACKAGE}\n\n\ndef test_probe():\n"
    f"  print('PROBE', {PACKAGE}.__file__)\n"
  )
  try:
    proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-s", *PYTEST_FLAGS[1:], probe],
      cwd=copy_root,
      env=test_env(copy_root),
      capture_output=True,
      text=True,
    )
  finally:
    probe.unlink()
  found = re.findall(r"^PROBE (.+)$", proc.stdout, re.M)
  expected = (copy_root / PACKAGE / "__init__.py").resolve()
  if not found or pathlib.Path(found[0]).resolve() != expected:
    raise SystemExit(f"the copy's tests import {found}, not {expected}")
  return found[0]


# ---------------------------------------------------------------------------
# Running tests.


@dataclasses.dataclass
class Run:
  """One pytest run: ``status`` is ``passed``, ``failed``, ``error``
  (collection / usage error, or no tests) or ``timeout``."""

  status: str
  seconds: float
  detail: str


def run_pytest(
  copy_root: pathlib.Path,
  args: Sequence[str],
  timeout: float | None,
  extra: Sequence[str] = (),
  cache: pathlib.Path | None = None,
) -> Run:
  """Runs ``pytest PYTEST_FLAGS *extra *args`` in ``copy_root``.

  A run past ``timeout`` has its whole process group killed.
  """
  cmd = [sys.executable, "-m", "pytest", *PYTEST_FLAGS, *extra, *args]
  t0 = time.monotonic()
  proc = subprocess.Popen(
    cmd,
    cwd=copy_root,
    env=test_env(copy_root, cache),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  try:
    output, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return Run("timeout", time.monotonic() - t0, f"past {timeout:.0f} s")
  return _as_run(proc.returncode, time.monotonic() - t0, output)


def _as_run(returncode: int, seconds: float, output: str) -> Run:
  """A finished pytest run from its exit code and output."""
  if returncode == 0:
    return Run("passed", seconds, "")
  # A node id may hold spaces (parametrize ids): up to " - " (the message).
  failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)
  lines = output.strip().splitlines()
  detail = failed[0] if failed else (lines[-1] if lines else "")
  status = "failed" if returncode == 1 else "error"
  return Run(status, seconds, detail[:300])


class WarmRunner:
  """pytest runs forked from a warm Python (``tools/mutate_server.py``)
  that has the heavy libraries imported already: the same runs as
  :func:`run_pytest`, without paying the imports each time."""

  def __init__(self, copy_root: pathlib.Path, cache: pathlib.Path | None):
    self.proc = subprocess.Popen(
      [sys.executable, str(ROOT / "tools" / "mutate_server.py")],
      cwd=copy_root,
      env=test_env(copy_root, cache),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    assert self.proc.stdout is not None
    ready = self.proc.stdout.readline()
    if not ready.strip():
      raise SystemExit("tools/mutate_server.py did not start")

  def run(
    self, args: Sequence[str], timeout: float | None, extra: Sequence[str]
  ) -> Run:
    assert self.proc.stdin is not None and self.proc.stdout is not None
    request = {
      "args": [*PYTEST_FLAGS, *extra, *args],
      "timeout": 1e9 if timeout is None else timeout,
    }
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    reply = json.loads(self.proc.stdout.readline())
    if reply["rc"] == "timeout":
      return Run("timeout", reply["seconds"], f"past {timeout:.0f} s")
    return _as_run(reply["rc"], reply["seconds"], reply["output"])

  def close(self) -> None:
    self.proc.kill()
    self.proc.wait()


def selection_args(module: str, stage: dict[str, list[str]]) -> list[str]:
  """pytest arguments for ``module``: its tests then its own doctests."""
  return [*stage[module], module]


# ---------------------------------------------------------------------------
# The coverage map: which tests run which line.


def build_map(
  copy_root: pathlib.Path,
  out: pathlib.Path,
  cache: pathlib.Path | None,
  work: pathlib.Path,
  shards: int = 2,
) -> dict[str, Any]:
  """Runs the tests under ``coverage`` with one context per test and
  writes ``{"lines": {module: {line: [node ids]}}, "spawners": [...],
  "durations": {...}}`` to ``out``.

  The test files (all but :data:`MAP_EXCLUDE`, plus the package's
  doctests) are split into ``shards`` processes run side by side, with
  their logs and coverage data in ``work``. Lines
  run at import (outside any test) carry the empty context ``""``.
  ``spawners`` are the tests that start a subprocess: the lines they reach
  there are not in the map.
  """
  if work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True)
  files = sorted(
    p.relative_to(copy_root).as_posix()
    for p in (copy_root / "tests").glob("test_*.py")
  )
  files = [f for f in files if f not in MAP_EXCLUDE]
  # Balance the shards by file size (a rough proxy for run time).
  groups: list[list[str]] = [[] for _ in range(shards)]
  load = [0] * shards
  for f in sorted(files, key=lambda f: -(copy_root / f).stat().st_size):
    i = load.index(min(load))
    groups[i].append(f)
    load[i] += (copy_root / f).stat().st_size
  groups[load.index(min(load))].append(PACKAGE)  # the doctests
  rc = work / "coveragerc"
  rc.write_text(
    "[run]\nparallel = True\npatch = subprocess\n"
    f"source = {copy_root / PACKAGE}\ndata_file = {work / '.coverage'}\n"
  )
  procs = []
  for i, group in enumerate(groups):
    env = test_env(copy_root, cache)
    env["MUTATE_CONTEXTS_OUT"] = str(work / f"contexts{i}.json")
    cmd = [
      sys.executable,
      "-m",
      "coverage",
      "run",
      f"--rcfile={rc}",
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:randomly",
      "-p",
      "no:cacheprovider",
      "-p",
      "mutate_contexts",
      *group,
    ]
    log = open(work / f"shard{i}.log", "w")
    procs.append(
      (
        subprocess.Popen(
          cmd, cwd=copy_root, env=env, stdout=log, stderr=subprocess.STDOUT
        ),
        log,
      )
    )
  for proc, log in procs:
    proc.wait()
    log.close()
  import coverage  # only this stage needs it (the `mutate` extra)

  cov = coverage.Coverage(data_file=str(work / ".coverage"))
  cov.combine([str(work)])
  data = cov.get_data()
  lines: dict[str, dict[str, list[str]]] = {}
  for measured in data.measured_files():
    path = pathlib.Path(measured).resolve()
    try:
      module = path.relative_to(copy_root.resolve()).as_posix()
    except ValueError:
      continue
    by_line = data.contexts_by_lineno(measured)
    lines[module] = {str(k): sorted(v) for k, v in sorted(by_line.items())}
  spawners: set[str] = set()
  users: set[str] = set()
  durations: dict[str, float] = {}
  failed: list[str] = []
  for i in range(shards):
    ctx_file = work / f"contexts{i}.json"
    if not ctx_file.exists():
      raise SystemExit(f"shard {i} wrote no contexts: see {work}/shard{i}.log")
    ctx = json.loads(ctx_file.read_text())
    spawners.update(ctx["spawners"])
    users.update(ctx["users"])
    durations.update(ctx["durations"])
    failed += ctx["failed"]
  if failed:
    raise SystemExit(f"the clean tests fail under coverage: {failed[:5]}")
  result = {
    "lines": lines,
    "spawners": sorted(spawners),
    "users": sorted(users),
    "durations": durations,
    "files": files,
  }
  save_json(out, result)
  return result


def statement_lines(source: str) -> dict[int, int]:
  """Line -> first line of the innermost statement holding it (a compound
  statement holds only its header lines): where coverage records it."""
  out: dict[int, int] = {}
  for node in ast.walk(ast.parse(source)):  # outer statements first
    if not isinstance(node, ast.stmt) or node.end_lineno is None:
      continue
    end = node.end_lineno
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
      end = body[0].lineno - 1
      decorators = getattr(node, "decorator_list", [])
      start = min([node.lineno] + [d.lineno for d in decorators])
    else:
      start = node.lineno
    for line in range(start, max(start, end) + 1):
      out[line] = node.lineno
  return out


def enclosing_ranges(source: str) -> dict[int, tuple[int, int]]:
  """Line -> the line span of the innermost function or class holding it
  (the whole module for a line in none)."""
  tree = ast.parse(source)
  n = len(source.splitlines())
  out = {line: (1, n) for line in range(1, n + 1)}
  for node in ast.walk(tree):  # outer definitions first
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      assert node.end_lineno is not None
      span = (node.lineno, node.end_lineno)
      for line in range(node.lineno, node.end_lineno + 1):
        out[line] = span
  return out


def covering_tests(
  mutant: Mutant,
  cmap: dict[str, Any],
  stmts: dict[int, int],
  spans: dict[int, tuple[int, int]],
) -> tuple[str, list[str]]:
  """The first stage for ``mutant`` from the coverage map.

  Returns:
    ``("cover", ids)``: the tests that run the mutated lines, fastest
    first; ``("import", ids)``: the lines run only at import (a default
    argument, a class attribute, a module constant), so the tests that run
    any line of the enclosing function or class (or module) decide;
    ``("spawned", ids)``: no test runs
    them in process, but these tests of the selection start a subprocess
    that may; ``("uncovered", [])``: no test reaches them.
  """
  by_line = cmap["lines"].get(mutant.path, {})
  contexts: set[str] = set()
  for line in range(mutant.line, mutant.end_line + 1):
    for key in {line, stmts.get(line, line)}:
      contexts.update(by_line.get(str(key), []))
  if "" in contexts:  # run at import here: who uses the definition?
    start, end = spans.get(mutant.line, (mutant.line, mutant.end_line))
    for line in range(start, end + 1):
      contexts.update(by_line.get(str(line), []))
  tests = {c.removeprefix(SUBPROCESS) for c in contexts if c}
  spawning_files = {t.split("::")[0] for t in tests if t in cmap["spawners"]}
  # A subprocess's result is shared by the tests of its file that use it.
  tests |= {u for u in cmap["users"] if u.split("::")[0] in spawning_files}
  ordered = sorted(tests, key=lambda c: (cmap["durations"].get(c, 0.0), c))
  if "" in contexts:
    return "import", ordered
  if ordered:
    return "cover", ordered
  files = set(SELECTION.get(mutant.path, []))
  spawned = [t for t in cmap["spawners"] if t.split("::")[0] in files]
  if spawned:
    return "spawned", spawned
  return "uncovered", []


def _record_killers(
  copy_root: pathlib.Path,
  results: dict[str, Any],
  cache: pathlib.Path | None,
  out: pathlib.Path | None,
) -> None:
  """:func:`check_killers`, its verdicts stored in ``results`` (and saved)."""
  checked = check_killers(copy_root, results, cache)
  results.setdefault("killers", {}).update(checked)
  save_json(out, results)
  bad = [k for k, v in checked.items() if v != "passed"]
  print(f"{len(checked)} catching tests checked unmutated", end="")
  print(f"; warning: {len(bad)} fail unmutated: {bad[:5]}" if bad else "")


def _tests_in(cmap: dict[str, Any], path: str) -> list[str]:
  """The map's tests (node ids) in one file or module's doctests."""
  return [t for t in cmap["durations"] if t.split("::")[0] == path]


def _timeout_of(cmap: dict[str, Any], tests: Sequence[str]) -> float:
  """3x the tests' time in the map's run (itself slowed by coverage), plus
  a minute for start-up and compiling."""
  spent = sum(cmap["durations"].get(t, 1.0) for t in tests)
  return max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * spent + 60.0)


def killer(record: dict[str, Any]) -> str | None:
  """The node id of the test that caught a mutant (None: not caught by a
  named test, e.g. a collection error, or an id an older parser cut)."""
  last = record["runs"][-1] if record["runs"] else {}
  detail = last.get("detail", "")
  if (
    record["status"] != "caught"
    or last.get("status") != "failed"
    or "::" not in detail
    or detail.count("[") != detail.count("]")
  ):
    return None
  return detail


def check_killers(
  copy_root: pathlib.Path,
  results: dict[str, Any],
  cache: pathlib.Path | None,
) -> dict[str, str]:
  """Runs every test that caught a mutant on the unmutated copy (with the
  same compilation cache): a kill by a test that fails unmutated is no
  kill. Returns ``{node id: "passed" | ...}`` for the tests checked."""
  killers = sorted(
    {k for r in results["mutants"].values() if (k := killer(r)) is not None}
  )
  checked: dict[str, str] = {}
  for i in range(0, len(killers), 200):
    chunk = killers[i : i + 200]
    run = run_pytest(copy_root, chunk, None, (), cache)
    if run.status == "passed":
      checked.update({k: "passed" for k in chunk})
    else:  # one at a time to name the culprit
      for k in chunk:
        checked[k] = run_pytest(copy_root, [k], None, (), cache).status
  return checked


# ---------------------------------------------------------------------------
# Results.


def load_json(path: pathlib.Path | None) -> dict[str, Any]:
  if path is None or not path.exists():
    return {"mutants": {}, "clean": {}}
  return json.loads(path.read_text())


def save_json(path: pathlib.Path | None, data: dict[str, Any]) -> None:
  if path is None:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)


def summarize(
  results: dict[str, Any], verdicts: dict[str, Any]
) -> dict[str, dict[str, Any]]:
  """Counts per module: made, run, caught, timeouts, survivors, and the
  score over non-equivalent mutants."""
  per: dict[str, dict[str, Any]] = {}
  for r in results["mutants"].values():
    s = per.setdefault(
      r["path"],
      {
        "made": r.get("made", 0),
        "run": 0,
        "caught": 0,
        "timeouts": 0,
        "survived": 0,
        "equivalent": 0,
        "added": 0,
        "seconds": 0.0,
      },
    )
    s["made"] = max(s["made"], r.get("made", 0))
    s["run"] += 1
    s["seconds"] += r["seconds"]
    if r["status"] == "caught":
      s["caught"] += 1
    elif r["status"] == "timeout":
      s["timeouts"] += 1
    else:
      s["survived"] += 1
      verdict = verdicts.get(r["id"], {}).get("verdict")
      if verdict == "equivalent":
        s["equivalent"] += 1
      elif verdict == "test added":
        s["added"] += 1
  for s in per.values():
    denominator = s["run"] - s["equivalent"]
    caught = s["caught"] + s["timeouts"]
    s["score"] = caught / denominator if denominator else 1.0
    s["after"] = (caught + s["added"]) / denominator if denominator else 1.0
  return per


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a proportion ``k / n``."""
  if n == 0:
    return 0.0, 1.0
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def write_markdown(
  path: pathlib.Path,
  results: dict[str, Any],
  verdicts: dict[str, Any],
  made: dict[str, int] | None = None,
) -> None:
  """The summary table and one row per survivor (verdict blank until
  given in the verdicts file). ``made``: the mutants of every module, run
  or not. The table and the score alone also go to ``<stem>_summary.md``
  beside ``path`` (docs/testing.md holds a copy)."""
  per = summarize(results, verdicts)
  for mod, n in (made or {}).items():
    per.setdefault(
      mod,
      dict.fromkeys(
        ("run", "caught", "timeouts", "survived", "equivalent", "added"), 0
      )
      | {"seconds": 0.0, "score": 1.0, "after": 1.0},
    )["made"] = n
  out = [
    "# Mutation testing: jepa_ema",
    "",
    "Made by `tools/mutate.py` (see its docstring for the operators and the",
    "per-module test selection). Caught includes collection errors; a",
    "timeout (3x the clean run) counts as caught. Score = (caught + timeouts)"
    " / (run - equivalent); score after = the same with the survivors whose "
    "verdict is `test added` counted as caught.",
    "",
    "| module | made | run | caught | timeouts | survived | equivalent "
    "| score | test added | score after | s/mutant |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]

  def pct(x: float, run: int) -> str:
    return f"{100 * x:.1f} %" if run else "-"

  for mod, s in sorted(per.items()):
    if not s["made"]:
      continue
    out.append(
      f"| `{mod}` | {s['made']} | {s['run']} | {s['caught']} | "
      f"{s['timeouts']} | {s['survived']} | {s['equivalent']} | "
      f"{pct(s['score'], s['run'])} | {s['added']} | "
      f"{pct(s['after'], s['run'])} | "
      f"{s['seconds'] / max(s['run'], 1):.0f} |"
    )
  total = {
    k: sum(s[k] for s in per.values())
    for k in (
      "made",
      "run",
      "caught",
      "timeouts",
      "survived",
      "equivalent",
      "added",
    )
  }
  caught = total["caught"] + total["timeouts"]
  n = total["run"] - total["equivalent"]
  lo, hi = wilson(caught, n)
  seconds = sum(s["seconds"] for s in per.values())
  out.append(
    f"| **all** | {total['made']} | {total['run']} | {total['caught']} | "
    f"{total['timeouts']} | {total['survived']} | {total['equivalent']} | "
    f"{100 * caught / max(n, 1):.1f} % | {total['added']} | "
    f"{100 * (caught + total['added']) / max(n, 1):.1f} % | "
    f"{seconds / max(total['run'], 1):.0f} |"
  )
  lo2, hi2 = wilson(caught + total["added"], n)
  out += [
    "",
    f"Score over the {n} non-equivalent mutants run: "
    f"{100 * caught / max(n, 1):.1f} % (95 % Wilson interval "
    f"{100 * lo:.1f}-{100 * hi:.1f} %); with the tests added for the "
    f"survivors (each checked to fail on its mutant): "
    f"{100 * (caught + total['added']) / max(n, 1):.1f} % "
    f"({100 * lo2:.1f}-{100 * hi2:.1f} %). Run in a seeded random order "
    "(`--shuffle`), so a run stopped early is a uniform sample of the "
    f"package: {total['run']} of {total['made']} mutants here.",
  ]
  killers = results.get("killers", {})
  if killers:
    bad = sorted(k for k, v in killers.items() if v != "passed")
    out.append(
      f"\nThe {len(killers)} tests that caught a mutant all pass unmutated."
      if not bad
      else f"\n{len(bad)} catching tests fail unmutated: {bad}"
    )
  kinds: dict[str, int] = {}
  for r in results["mutants"].values():
    if r["status"] == "survived":
      v = verdicts.get(r["id"], {}).get("verdict", "open")
      kinds[v] = kinds.get(v, 0) + 1
  order = ("test added", "equivalent", "not a promise", "open")  # noqa: E501
  out.append(
    "\nVerdicts of the survivors: "
    + ", ".join(f"{kinds.get(k, 0)} {k}" for k in order)
    + "."
  )
  first = next(i for i, line in enumerate(out) if line.startswith("| module"))
  summary = path.with_name(path.stem + "_summary.md")
  summary.parent.mkdir(parents=True, exist_ok=True)
  summary.write_text("\n".join(out[first:]) + "\n")
  for mod, clean in sorted(results.get("clean", {}).items()):
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(clean.items()))
    out.append(f"\nClean run of `{mod}`'s selection: {stages}.")
  out += [
    "",
    "## Survivors",
    "",
    "| id | where | change | original | mutated | verdict | note |",
    "|---|---|---|---|---|---|---|",
  ]

  def cell(text: str) -> str:
    text = " ⏎ ".join(x.strip() for x in text.splitlines())
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"

  survivors = [
    r for r in results["mutants"].values() if r["status"] == "survived"
  ]
  for r in sorted(survivors, key=lambda r: (r["path"], r["line"])):
    v = verdicts.get(r["id"], {})
    out.append(
      f"| `{r['id'].rsplit(':', 1)[1]}` | {r['path']}:{r['line']} | "
      f"{r['description']} | {cell(r['original'])} | {cell(r['mutated'])} | "
      f"{v.get('verdict', '')} | {v.get('note', '').replace('|', '/')} |"
    )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(out) + "\n")


# ---------------------------------------------------------------------------
# The run.


def package_modules(root: pathlib.Path) -> list[str]:
  return sorted(
    p.relative_to(root).as_posix() for p in (root / PACKAGE).glob("**/*.py")
  )


def resolve_modules(
  names: Sequence[str] | None, root: pathlib.Path
) -> list[str]:
  """``_drift``, ``jepa_ema/_drift.py`` or ``jepa_ema._drift`` -> path."""
  known = package_modules(root)
  if not names:
    return [m for m in known if m in SELECTION]
  out = []
  for name in names:
    stem = name.removesuffix(".py").replace(".", "/").removeprefix(PACKAGE)
    path = f"{PACKAGE}/{stem.strip('/')}.py"
    if path not in known:
      raise SystemExit(f"no module {name!r} (looked for {path})")
    out.append(path)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; see the module docstring."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--modules", nargs="*", help="default: all in SELECTION")
  p.add_argument("--max-mutants", type=int, help="stop after this many runs")
  p.add_argument("--sample", type=int, help="seeded sample per module")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--shuffle",
    action="store_true",
    help="run the mutants in a seeded random order (a run stopped early "
    "is then a uniform sample of the package)",
  )
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--json", type=pathlib.Path)
  p.add_argument("--markdown", type=pathlib.Path)
  p.add_argument(
    "--verdicts", type=pathlib.Path, default=RESULTS / "verdicts.json"
  )
  p.add_argument("--only", nargs="*", help="run just these mutant ids")
  p.add_argument("--rerun", action="store_true", help="ignore stored results")
  p.add_argument(
    "--no-first-pass", action="store_true", help="full selection only"
  )
  p.add_argument("--hypothesis-profile", help="passed on to pytest")
  p.add_argument(
    "--timeout",
    type=float,
    help="per-mutant timeout in seconds instead of 3x a clean run (the "
    "clean runs are then skipped: for re-checking known survivors)",
  )
  p.add_argument("--list", action="store_true", help="list mutants, run none")
  p.add_argument(
    "--map",
    type=pathlib.Path,
    help="coverage map (see --build-map): each mutant first runs only the "
    "tests that execute its lines; without it, FIRST_PASS then SELECTION",
  )
  p.add_argument(
    "--build-map",
    action="store_true",
    help="(re)build --map from a run of the tests under coverage first",
  )
  p.add_argument(
    "--confirm",
    action="store_true",
    help="with --map: run a mutant that survives its covering tests "
    "against its module's whole SELECTION too",
  )
  p.add_argument(
    "--check-killers",
    action="store_true",
    help="with nothing to run (e.g. --max-mutants 0): run the tests that "
    "caught mutants on the unmutated package, as a finished run does",
  )
  p.add_argument(
    "--no-warm",
    action="store_true",
    help="start each pytest run from scratch instead of forking it from a "
    "warm Python (tools/mutate_server.py)",
  )
  p.add_argument(
    "--no-compile-cache",
    action="store_true",
    help="compile every program afresh in every run",
  )
  p.add_argument("--workdir", type=pathlib.Path)
  p.add_argument(
    "--reuse-snapshot",
    action="store_true",
    help="keep --workdir's snapshot of the package (its mutant ids), "
    "refresh the rest, e.g. to re-run survivors against new tests",
  )
  args = p.parse_args(argv)

  missing = [m for m in package_modules(ROOT) if m not in SELECTION]
  for m in missing:
    print(f"warning: {m} has no entry in SELECTION; it is not mutated")
  modules = resolve_modules(args.modules, ROOT)
  verdicts = load_json(args.verdicts) if args.verdicts.exists() else {}

  work = (
    args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="jepa_mutate_"))
  ).resolve()
  work.mkdir(parents=True, exist_ok=True)
  names = repo_files(ROOT)
  snapshot = work / "snapshot"
  if args.reuse_snapshot and (snapshot / PACKAGE).is_dir():
    # Keep the package as it was snapshotted (the mutant ids stay valid);
    # refresh everything else (new tests) from the checkout.
    outside = [n for n in names if not n.startswith(f"{PACKAGE}/")]
    for name in outside:
      (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, snapshot / name)
    names = [
      p.relative_to(snapshot).as_posix()
      for p in snapshot.rglob("*")
      if p.is_file() and "__pycache__" not in p.parts
    ]
    print(f"reused {snapshot}; {len(outside)} files outside {PACKAGE}/ fresh")
  else:
    copy_tree(ROOT, snapshot, names)
    print(f"snapshot of {len(names)} files in {snapshot}")

  cache = None if args.no_compile_cache else work / "jax_cache"
  cmap: dict[str, Any] | None = None
  if args.map is not None:
    if args.build_map or not args.map.exists():
      print(f"building the coverage map {args.map} (the tests, under coverage)")
      t0 = time.monotonic()
      cmap = build_map(snapshot, args.map, cache, work / "map")
      print(f"coverage map built in {time.monotonic() - t0:.0f} s")
    else:
      cmap = load_json(args.map)
  stmts = {
    mod: statement_lines((snapshot / mod).read_text())
    for mod in package_modules(snapshot)
  }
  spans = {
    mod: enclosing_ranges((snapshot / mod).read_text())
    for mod in package_modules(snapshot)
  }

  results = load_json(args.json)
  made_by: dict[str, int] = {}
  todo: list[tuple[Mutant, int]] = []
  for mod in modules:
    if mod not in SELECTION:
      print(f"warning: {mod} has no entry in SELECTION; skipped")
      continue
    found = mutants_of(mod, (snapshot / mod).read_text())
    made = len(found)
    made_by[mod] = made
    current = {m.id for m in found}
    for k in [k for k, r in results["mutants"].items() if r["path"] == mod]:
      if k not in current:  # the module changed: those results are stale
        del results["mutants"][k]
    chosen = found
    if args.sample is not None and args.sample < len(found):
      rng = random.Random(f"{args.seed}:{mod}")
      chosen = sorted(rng.sample(found, args.sample), key=lambda m: m.line)
    if args.only:
      chosen = [m for m in found if m.id in args.only]
    print(f"{mod}: {made} mutants made, {len(chosen)} chosen")
    for m in chosen:
      if args.list:
        print(f"  {m.id}  {m.description}\n    - {m.original.strip()}")
        print(f"    + {m.mutated.strip()}")
      elif args.rerun or m.id not in results["mutants"]:
        todo.append((m, made))
  if args.list:
    return 0
  if args.shuffle:  # a run stopped early is then a uniform sample
    random.Random(args.seed).shuffle(todo)
  if args.max_mutants is not None:
    todo = todo[: args.max_mutants]
  save_json(args.json, results)
  if not todo:
    print("nothing to run")
    if args.check_killers:  # e.g. after a run stopped before its end
      _record_killers(snapshot, results, cache, args.json)
    if args.markdown:
      write_markdown(args.markdown, results, verdicts, made_by)
    return 0

  extra = []
  if args.hypothesis_profile:
    extra = ["--hypothesis-profile", args.hypothesis_profile]
  print("imports from", smoke_check(snapshot))

  # Clean runs: every selection must pass unmutated; they set the timeouts.
  # With a map, the map's own run was the clean run (it refuses failing
  # tests) and its durations set the timeouts.
  timeouts: dict[tuple[str, str], float] = {}
  for mod in sorted({m.path for m, _ in todo}):
    if cmap is not None:
      timeouts[mod, "full"] = _timeout_of(
        cmap,
        [t for f in SELECTION[mod] for t in _tests_in(cmap, f)]
        + _tests_in(cmap, mod),
      )
      continue
    stages = {"full": SELECTION}
    if mod in FIRST_PASS and not args.no_first_pass:
      stages["first"] = FIRST_PASS
    for stage, table in stages.items():
      if args.timeout is not None:  # no clean run: e.g. to confirm a kill
        timeouts[mod, stage] = args.timeout
        continue
      run = run_pytest(snapshot, selection_args(mod, table), None, extra, cache)
      if run.status != "passed":
        raise SystemExit(
          f"the clean {stage} selection of {mod} does not pass: {run.detail}"
        )
      print(f"clean {stage} selection of {mod}: {run.seconds:.0f} s")
      results["clean"].setdefault(mod, {})[stage] = run.seconds
      timeouts[mod, stage] = max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * run.seconds)
  save_json(args.json, results)

  copies: queue.Queue[pathlib.Path] = queue.Queue()
  runners: dict[pathlib.Path, WarmRunner] = {}
  for i in range(args.workers):
    dst = work / f"worker{i}"
    copy_tree(snapshot, dst, names)
    if not args.no_warm:
      runners[dst] = WarmRunner(dst, cache)
    copies.put(dst)
  lock = threading.Lock()
  # Tests that caught a mutant of a module run first for its next mutants
  # (the run learns where the strong tests are; previous results count).
  kills: dict[str, dict[str, int]] = {}
  for r in results["mutants"].values():
    if (k := killer(r)) is not None:
      per = kills.setdefault(r["path"], {})
      per[k] = per.get(k, 0) + 1

  def plan(mutant: Mutant) -> list[tuple[str, list[str], float]]:
    """The stages of one mutant: ``(name, pytest args, timeout)``."""
    full = selection_args(mutant.path, SELECTION)
    if cmap is None:
      stages = []
      if (mutant.path, "first") in timeouts:
        first = selection_args(mutant.path, FIRST_PASS)
        stages.append(("first", first, timeouts[mutant.path, "first"]))
      return stages + [("full", full, timeouts[mutant.path, "full"])]
    kind, tests = covering_tests(
      mutant, cmap, stmts[mutant.path], spans[mutant.path]
    )
    full_stage = ("full", full, timeouts[mutant.path, "full"])
    if kind == "import" and not tests:
      return [full_stage]
    if kind == "uncovered":
      return [("uncovered", [], 0.0)]
    with lock:
      known = dict(kills.get(mutant.path, {}))
    tests = sorted(tests, key=lambda t: -known.get(t, 0))  # stable: fast first
    stages = [(kind, tests, _timeout_of(cmap, tests))]
    return stages + [full_stage] if args.confirm else stages

  def one(mutant: Mutant, made: int) -> dict[str, Any]:
    root = copies.get()
    target = root / mutant.path
    original = target.read_text()
    try:
      target.write_text(mutant.source)
      runs = []
      for stage, pytest_args, timeout in plan(mutant):
        if not pytest_args:  # no test reaches the change
          runs.append(
            {"stage": stage, "status": "passed", "seconds": 0.0, "detail": ""}
          )
          break
        if root in runners:
          run = runners[root].run(pytest_args, timeout, extra)
        else:
          run = run_pytest(root, pytest_args, timeout, extra, cache)
        runs.append({"stage": stage, **dataclasses.asdict(run)})
        if run.status != "passed":
          break
    finally:
      target.write_text(original)
      copies.put(root)
    last = runs[-1]["status"]
    status = {"passed": "survived", "timeout": "timeout"}.get(last, "caught")
    record = {
      k: v for k, v in dataclasses.asdict(mutant).items() if k != "source"
    }
    record.update(
      status=status,
      made=made,
      seconds=sum(r["seconds"] for r in runs),
      runs=runs,
    )
    with lock:
      results["mutants"][mutant.id] = record
      if (k := killer(record)) is not None:
        per = kills.setdefault(mutant.path, {})
        per[k] = per.get(k, 0) + 1
      save_json(args.json, results)
    return record

  bar = tqdm(total=len(todo), unit="mutant")
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = [pool.submit(one, m, made) for m, made in todo]
    for fut in concurrent.futures.as_completed(futures):
      r = fut.result()
      bar.update()
      bar.set_postfix_str(f"{r['status']} {r['path']}:{r['line']}")
      if r["status"] == "survived":
        tqdm.write(f"SURVIVED {r['id']}: {r['description']}")
  bar.close()
  for runner in runners.values():
    runner.close()

  print("checking the tests that caught mutants on the unmutated copy")
  _record_killers(snapshot, results, cache, args.json)

  for mod, s in sorted(summarize(results, verdicts).items()):
    print(
      f"{mod}: made {s['made']}, run {s['run']}, caught {s['caught']}, "
      f"timeouts {s['timeouts']}, survived {s['survived']}, "
      f"{s['seconds'] / max(s['run'], 1):.0f} s/mutant"
    )
  if args.markdown:
    write_markdown(args.markdown, results, verdicts, made_by)
  return 0


if __name__ == "__main__":
  sys.exit(main())
