"""Issue 21, CLI conventions: options after the command, json and tables that agree,
times with their offset, tables that fit the terminal, completion, hooks-dir."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.stack import ROOT


def cli_alone(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI with no broker, no worker and a configuration file that is not there."""
    return subprocess.run([sys.executable, "-m", "molteniron.clients.cli", *args],
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
                               "MOLTENIRON_CONFIG": "/nonexistent/molteniron.yaml",
                               **(env or {})},
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)


def test_hooks_dir_prints_the_folder_of_the_shipped_hooks_without_config_or_broker():
    done = cli_alone("hooks-dir")
    assert done.returncode == 0, done
    path = done.stdout.strip()
    assert done.stdout == path + "\n" and os.path.isabs(path), done
    assert {"pre_hook.sh", "post_hook.sh", "keep_lease.sh"} <= set(os.listdir(path))
    assert all(os.access(os.path.join(path, name), os.X_OK)
               for name in ("pre_hook.sh", "post_hook.sh", "keep_lease.sh"))
