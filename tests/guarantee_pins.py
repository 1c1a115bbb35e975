"""Each promise of ``docs/guarantees.md`` names the tests that pin it.

A pin is written ``tests/test_<module>.py::test_<name>`` in backticks. Every
bullet of the "Exact" and "Bounded" sections and every row of the
"Reported" table must hold at least one, and every pin must name a test
function that exists (a module-level ``def test_...`` of that file, found by
parsing it, so nothing is imported). The docs build (``tools/docs_hooks.py``)
and ``tests/test_docs.py`` both fail on what :func:`problems` reports.

Run ``python tests/guarantee_pins.py`` to list the problems, if any.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guarantees.md"
PIN = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")
PINNED_SECTIONS = ("Exact", "Bounded", "Reported")


@functools.cache
def _tests_in(path: str) -> frozenset[str]:
  file = ROOT / path
  if not file.is_file():
    return frozenset()
  tree = ast.parse(file.read_text())
  return frozenset(
    node.name
    for node in tree.body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
  )


def _sections(markdown: str) -> dict[str, str]:
  parts = re.split(r"^## (.+)$", markdown, flags=re.M)
  return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _promises(section: str) -> list[str]:
  """The bullets (with their continuation lines) and table body rows."""
  items: list[str] = []
  for line in section.splitlines():
    if line.startswith("* "):
      items.append(line)
    elif line.startswith("  ") and items and items[-1].startswith("* "):
      items[-1] += " " + line.strip()
    elif line.startswith("| ") and not set(line) <= set("|- "):
      items.append(line)
  rows = [i for i in items if i.startswith("| ")]
  return [i for i in items if i.startswith("* ")] + rows[1:]  # no header


def pins(markdown: str) -> list[tuple[str, str]]:
  return PIN.findall(markdown)


def problems(markdown: str | None = None) -> list[str]:
  """What is wrong with the page's pins: promises without one, pins that
  name no existing test. Empty when the page is sound."""
  text = PAGE.read_text() if markdown is None else markdown
  sections = _sections(text)
  out = []
  for name in PINNED_SECTIONS:
    if name not in sections:
      out.append(f"docs/guarantees.md has no section '## {name}'")
      continue
    for item in _promises(sections[name]):
      if not PIN.search(item):
        out.append(f"{name}: no test pins this promise: {item[:90]}...")
  for path, test in pins(text):
    if test not in _tests_in(path):
      out.append(f"{path}::{test} is named on the page but does not exist")
  return out


if __name__ == "__main__":
  found = problems()
  print("\n".join(found) if found else "every promise is pinned by a test")
  raise SystemExit(1 if found else 0)
