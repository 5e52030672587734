"""A skipped test fails the run unless it skipped for want of a GPU.

Every test runs on a CPU machine with nothing but the repository and its installed packages (its
data samples live in ``tests/fixtures``), so a skip can only hide a failure: a missing file, a
package that did not install, a fixture that broke. Only a test that needs an accelerator may skip,
with a reason that starts with ``GPU_SKIP_REASON``. Loaded by ``conftest.py`` for every run.
"""

from __future__ import annotations

import pytest

GPU_SKIP_REASON = "needs a CUDA GPU"

_refused: list[str] = []


def _reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = _reason(report).removeprefix("Skipped: ")
        if not reason.startswith(GPU_SKIP_REASON):
            _refused.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _refused:
        terminalreporter.section("skipped tests fail this run (only a missing GPU may skip a test)", red=True)
        for line in _refused:
            terminalreporter.line(line)


def pytest_sessionfinish(session):
    if _refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
