"""The parallel suite keeps a fixture made once per module to one worker process.

tests/tiers.py gives every test that uses a module-scoped fixture (an installed kit, a
private cluster, a browser) the mark xdist_group(<module>); `--dist=loadgroup` (the
pyproject.toml addopts) then sends the module's tests to one process, which makes the
fixture once. pytest 9.2 with pytest-xdist 3.8 dropped the grouping without a word
(pytest-xdist issue 1386): every process made its own kit and cluster, and the suite
took minutes longer. This runs the project's configuration on a probe module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import os
import pytest

@pytest.fixture(scope="module")
def made_once(tmp_path_factory):
    return os.environ["PYTEST_XDIST_WORKER"]

@pytest.mark.parametrize("i", range(8))
def test_probe(made_once, i):
    with open(os.environ["PROBE_LOG"], "a") as log:
        log.write(f"{made_once} {os.environ['PYTEST_XDIST_WORKER']}\\n")
'''


def test_a_module_scoped_fixture_is_made_once_and_its_tests_run_in_one_process(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    log = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "tests.tiers",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
        cwd=ROOT, env={**os.environ, "PROBE_LOG": str(log), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = log.read_text().split("\n")[:-1]
    assert len(ran) == 8
    assert len(set(ran)) == 1, f"the module's tests ran as (fixture's process, process): {ran}"
