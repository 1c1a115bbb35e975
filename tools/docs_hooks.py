"""mkdocs hooks: the pages that mirror the code must match it.

* ``api.md`` must document every public name of jepa_ema.
* ``guarantees.md`` must hold the current table of odd inputs, as
  ``tests/inputs_table.py`` renders it (``python tests/inputs_table.py
  --write`` regenerates it), and every promise on it must name the tests
  that pin it, tests that exist (``tests/guarantee_pins.py``).
* the how-to pages of the recipes must hold their example's current code
  (``python tests/recipe_pages.py --write`` regenerates them).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tests_module(name: str) -> Any:
  path = ROOT / "tests" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
  recipes = _tests_module("recipe_pages")
  if f"docs/{page.file.src_uri}" in recipes.PAGES and recipes.stale():
    raise PluginError(
      f"stale recipe copies in {recipes.stale()}; run "
      "python tests/recipe_pages.py --write"
    )
  if page.file.src_uri == "guarantees.md":
    table = _tests_module("inputs_table")
    if table.current() != table.render():
      raise PluginError(
        "docs/guarantees.md: the table of odd inputs is stale; run "
        "python tests/inputs_table.py --write"
      )
    found = _tests_module("guarantee_pins").problems(markdown)
    if found:
      raise PluginError("docs/guarantees.md: " + "; ".join(found))
    return markdown
  if page.file.src_uri != "api.md":
    return markdown
  import jepa_ema

  documented = set(re.findall(r"^::: jepa_ema\.(\w+)$", markdown, flags=re.M))
  missing = sorted(set(jepa_ema.__all__) - documented)
  unknown = sorted(documented - set(jepa_ema.__all__))
  if missing or unknown:
    raise PluginError(
      f"docs/api.md: public names missing from the API reference: {missing}; "
      f"entries that are not public names: {unknown}"
    )
  return markdown
