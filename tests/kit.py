"""The deploy kit for tests: a copy of this checkout, deploy/install.sh --root into a
directory, and an interpreter every user may run (what install.sh --python needs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.stack import ROOT

DEPLOY = ROOT / "deploy"
# Where a system keeps the python3 every user runs: the first of these, that another
# user can start and that makes venvs, is the one the kit's tests install with.
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


def first_group(pattern: str, text: str, flags: int = 0) -> str:
    """Group 1 of pattern's first match in text (a shipped file must hold one)."""
    found = re.search(pattern, text, flags)
    assert found, f"no {pattern!r} in the shipped file"
    return found.group(1)


def copy_checkout(source: Path) -> Path:
    """This checkout's tracked and new files (symlinks as symlinks) copied to source: pip
    builds in the tree it is given, and other tests read this one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_symlink():  # molteniron/workers -> ../workers
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():  # a tracked file deleted in the work tree is not
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    return source


def install(root: Path, source: Path | str, *options: str,
            pip_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """deploy/install.sh --root ROOT [OPTION...] SOURCE [-- PIP_OPTION...], output captured."""
    return subprocess.run(["bash", str(DEPLOY / "install.sh"), "--root", str(root), *options,
                           str(source), *(("--", *pip_options) if pip_options else ())],
                          capture_output=True, text=True, timeout=600)


def public_python() -> str:
    """A python3 with venv support that a user other than root can run; fails the test
    naming what was tried when this machine has none."""
    tried = []
    for candidate in SYSTEM_PYTHONS:
        if not os.access(candidate, os.X_OK):
            tried.append(f"{candidate}: absent")
            continue
        runs = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               candidate, "-I", "-c", "import ensurepip, venv"],
                              capture_output=True, text=True, timeout=60)
        if runs.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {runs.stderr.strip()[-200:] or runs.returncode}")
    pytest.fail("no python3 that another user can run and that makes venvs (install "
                "python3-venv): " + "; ".join(tried), pytrace=False)


# --- the shipped systemd units ---------------------------------------------------

def service_settings(unit: str) -> dict[str, list[str]]:
    """The [Service] section of a shipped unit: key -> its values, in order."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in (DEPLOY / unit).read_text().splitlines():
        if line.startswith("["):
            section = line.strip()
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# The units' hardening (README "Deploying"), checked here as written, since
# systemd-analyze, which rates it, is not on every machine that runs these tests.
HARDENING = {
    "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "RemoveIPC": "yes", "UMask": "0077",
}
