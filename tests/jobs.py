"""A CI job's view for tests: its environment and its hooks (clients/hooks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.stack import ROOT

HOOKS = ROOT / "clients" / "hooks"


def job_env(stack, workspace: Path, **env: str) -> dict:
    """What a CI job's steps see: `molteniron` on PATH, a workspace, an owner."""
    config = workspace / "hook-conf.yaml"
    config.write_text("request_timeout: 5\n")
    return {**stack.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MOLTENIRON_CONFIG": str(config), "WORKSPACE": str(workspace),
            "MOLTENIRON_OWNER": "job", **env}


def run_hook(stack, workspace: Path, hook: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HOOKS / hook), *args], capture_output=True, text=True,
                          timeout=120, cwd=workspace, env=job_env(stack, workspace, **env))
