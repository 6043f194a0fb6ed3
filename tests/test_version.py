"""Every command says which MoltenIron it is (--version), the one the package installs."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from molteniron import __version__
from tests.stack import ROOT

COMMANDS = {"molteniron": "molteniron.clients.cli",
            "molteniron-worker": "molteniron.workers.main",
            "molteniron-cleaner": "molteniron.clients.cleaner",
            "molteniron-web": "molteniron.clients.web.main"}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_command_prints_its_version(prog):
    done = subprocess.run([sys.executable, "-m", COMMANDS[prog], "--version"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stdout) == (0, f"{prog} {__version__}\n"), done


def test_the_installed_package_has_that_version():
    assert version("molteniron") == __version__
