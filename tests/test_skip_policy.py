"""A run with a skipped test fails unless the skip was for want of a GPU (tests/skip_policy.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from skip_policy import GPU_SKIP_REASON

HERE = os.path.dirname(os.path.abspath(__file__))


def run_pytest(tmp_path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text("import pytest\n\n\ndef test_runs():\n    pass\n\n\n" + body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "skip_policy", "-p", "no:cacheprovider",
                           "test_case.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": HERE})


@pytest.mark.parametrize("body", [
    'def test_data():\n    pytest.skip("../data is absent")\n',
    '@pytest.mark.skipif(True, reason="no network")\ndef test_hub():\n    pass\n',
    'def test_optional():\n    pytest.importorskip("a_package_that_is_not_installed")\n',
], ids=["skip", "skipif", "importorskip"])
def test_a_skip_fails_the_run_and_is_named(tmp_path, body):
    result = run_pytest(tmp_path, body)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "skipped tests fail this run" in result.stdout and "test_case.py::test_" in result.stdout


def test_a_skip_for_want_of_a_gpu_passes(tmp_path):
    result = run_pytest(tmp_path, f'def test_kernel():\n    pytest.skip("{GPU_SKIP_REASON}: no CUDA device")\n')
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "1 passed, 1 skipped" in result.stdout
