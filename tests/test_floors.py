"""The declared minimum versions are the tested ones: every ``>=`` floor of
pyproject.toml (runtime, test, examples and wheel) is pinned ``==`` in
.ci/min-constraints.txt, which ``make test-min`` installs and runs the suite
on; there (JEPA_EMA_FLOORS=1) the installed versions are checked too."""

import importlib.metadata
import os
import pathlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRAS = ("test", "examples", "wheel")  # what make test-min installs


def floors() -> dict[str, Version]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in EXTRAS:
    reqs += project["optional-dependencies"][extra]
  out: dict[str, Version] = {}
  for text in reqs:
    req = Requirement(text)
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert lows, f"{text!r} declares no floor"
    name = canonicalize_name(req.name)
    out[name] = max([*lows, out.get(name, Version("0"))])
  return out


def pins() -> dict[str, Version]:
  out = {}
  text = (ROOT / ".ci" / "min-constraints.txt").read_text()
  for line in text.splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = re.fullmatch(r"([\w.-]+)==([\w.]+)", line).groups()
      out[canonicalize_name(name)] = Version(version)
  return out


def test_every_floor_is_pinned_in_the_min_constraints():
  declared, pinned = floors(), pins()
  assert len(declared) >= 10  # the file is parsed, not skipped
  assert {n: pinned.get(n) for n in declared} == declared


@pytest.mark.skipif(
  not os.environ.get("JEPA_EMA_FLOORS"), reason="only under make test-min"
)
def test_the_floors_are_what_is_installed():
  installed = {n: Version(importlib.metadata.version(n)) for n in pins()}
  assert installed == pins()
