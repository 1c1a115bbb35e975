"""pytest plugin for ``tools/mutate.py --build-map``: who runs which line.

Loaded with ``-p mutate_contexts`` inside ``coverage run``. It switches
coverage's dynamic context to the test's node id around each test (setup,
call and teardown), so the coverage data says which tests execute each line
of the package. It also records each test's duration and the tests that
start a subprocess (their lines run where coverage does not look), and
writes both to ``$MUTATE_CONTEXTS_OUT`` (JSON) at the end of the session.

With coverage's ``patch = subprocess``, a subprocess is measured too: its
static context (read from ``$COVERAGE_PROCESS_CONFIG``, which this plugin
rewrites around each test) is ``sub:`` and the node id of the test that
started it (lines a subprocess runs at its imports are then not mistaken
for the lines this process runs at import, context ``""``).
The tests that share such a subprocess's result through a fixture
(``on_eight_devices``) are recorded as ``users``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import coverage
import pytest

SUBPROCESS = "sub:"  # prefix of the contexts recorded in a subprocess
_current: list[str] = [""]
_spawners: set[str] = set()
_durations: dict[str, float] = {}
_users: set[str] = set()
_failed: list[str] = []
_original_init = subprocess.Popen.__init__


def _recording_init(self: subprocess.Popen, *args: Any, **kwargs: Any) -> None:
  if _current[0]:
    _spawners.add(_current[0])
  _original_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _recording_init  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Iterator[None]:
  cov = coverage.Coverage.current()
  _current[0] = item.nodeid
  if "on_eight_devices" in getattr(item, "fixturenames", ()):
    _users.add(item.nodeid)
  _set_subprocess_context(item.nodeid)
  if cov is not None:
    cov.switch_context(item.nodeid)
  t0 = time.monotonic()
  yield
  _durations[item.nodeid] = time.monotonic() - t0
  if cov is not None:
    cov.switch_context("")
  _set_subprocess_context("")
  _current[0] = ""


def _set_subprocess_context(context: str) -> None:
  """The static context of the subprocesses started from now on."""
  data = os.environ.get("COVERAGE_PROCESS_CONFIG")
  if data is None:
    return
  config = json.loads(base64.b64decode(data.encode()).decode())
  config["context"] = f"{SUBPROCESS}{context}" if context else ""
  os.environ["COVERAGE_PROCESS_CONFIG"] = base64.b64encode(
    json.dumps(config).encode()
  ).decode()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
  if report.failed:
    _failed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
  out = os.environ.get("MUTATE_CONTEXTS_OUT")
  if not out:
    return
  with open(out, "w") as f:
    json.dump(
      {
        "spawners": sorted(_spawners),
        "users": sorted(_users),
        "durations": _durations,
        "failed": _failed,
      },
      f,
    )
