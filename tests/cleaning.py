"""Running molteniron-cleaner in tests: a cleaning command written as a script, and
`python -m molteniron.clients.cleaner` processes on a stack (tests/test_cleaning.py,
tests/test_metrics.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.stack import ROOT


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable /bin/sh script in tmp_path with this body: its path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def cleaner(stack, env: dict, *args: str) -> subprocess.Popen:
    """A cleaner process on the stack's broker, with env (its config) on top of the stack's."""
    return subprocess.Popen([sys.executable, "-m", "molteniron.clients.cleaner", *args],
                            env={**stack.env, **env}, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def clean_once(stack, env: dict) -> tuple[int, dict, str]:
    """Run `cleaner --once`: (its exit code, the outcome it printed last, its stderr)."""
    done = cleaner(stack, env, "--once")
    stdout, stderr = done.communicate(timeout=60)
    return done.returncode, json.loads(stdout.strip().splitlines()[-1]), stderr
