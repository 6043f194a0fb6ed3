"""A CI job's view for tests: its environment and its hooks (clients/hooks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.stack import ROOT

HOOKS = ROOT / "clients" / "hooks"
EXAMPLES = ROOT / "examples" / "jenkins"
HOOK_CONFIG = "hook-conf.yaml"


def job_env(stack, workspace: Path, **env: str) -> dict:
    """What a CI job's steps see: `molteniron` on PATH, a workspace, an owner."""
    config = workspace / HOOK_CONFIG
    config.write_text("request_timeout: 5\n")
    return {**stack.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MOLTENIRON_CONFIG": str(config), "WORKSPACE": str(workspace),
            "MOLTENIRON_OWNER": "job", **env}


def run_hook(stack, workspace: Path, hook: str, *args: str,
             **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HOOKS / hook), *args], capture_output=True, text=True,
                          timeout=120, cwd=workspace, env=job_env(stack, workspace, **env))


def start_job_step(stack, workspace: Path, script: Path, *args: str,
                   **env: str) -> subprocess.Popen:
    """A hook or pipeline started as a CI system starts a step: in a process group of its
    own (os.killpg(step.pid, ...) is an abort of the whole step; step.send_signal, a
    signal to the script alone), with SIGINT and SIGTERM at their defaults whatever this
    test run inherited: bash cannot trap a signal ignored when it started, and a run
    started in the background (`cmd &` in a script, nohup) ignores SIGINT."""
    return subprocess.Popen(["bash", str(script), *args], cwd=workspace,
                            env=job_env(stack, workspace, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_signals)


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def group_alive(step: subprocess.Popen) -> bool:
    """Whether any process of the step's process group is still there."""
    try:
        os.killpg(step.pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(step: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the step's process group (a test's cleanup)."""
    if group_alive(step):
        os.killpg(step.pid, signal.SIGKILL)
    step.communicate()


# What pre_hook.sh writes into the workspace (and, while it works, beside them).
PRE_HOOK_FILES = ("molteniron-nodes.json", "hardware_info", "localrc")
PRE_HOOK_ASIDE = ".molteniron-pre-hook."


def leftovers(workspace: Path) -> list[str]:
    """The pre-hook's files in a workspace (the stack's own files may share it)."""
    return sorted(path.name for path in workspace.iterdir()
                  if path.name in PRE_HOOK_FILES or path.name.startswith(PRE_HOOK_ASIDE))
