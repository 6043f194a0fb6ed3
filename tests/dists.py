"""The project as a user gets it, for tests: a wheel and an sdist, and a venv with the wheel.

Both are built from a copy of this source tree, never in it: a build writes build/ and
*.egg-info where it runs, and whatever an earlier build left in build/lib goes into the
next wheel as it is. The venv lives in a temporary folder and runs with no PYTHONPATH,
from a folder outside the checkout, so it sees only what the wheel installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml
from sqlalchemy import create_engine, make_url, text

from tests.stack import ROOT, wait_until

# Never part of a release: what tools, venvs, test runs and builds leave in a checkout.
LEFT_BY_TOOLS = {".git", ".venv", ".tox", "build", "dist", "__pycache__", ".pytest_cache",
                 ".hypothesis", ".molteniron", ".mypy_cache", ".ruff_cache"}
LEFT_BY_BENCH = ROOT / "bench" / "logs"
BUILD_TIMEOUT = 600  # seconds; a build installs setuptools from PyPI first (isolation)


def _left_over(directory: str, names: list[str]) -> set[str]:
    return {name for name in names
            if name in LEFT_BY_TOOLS or name.endswith((".egg-info", ".pyc"))
            or Path(directory, name) == LEFT_BY_BENCH}


def copy_source(dest: Path) -> Path:
    """This source tree without what tools left in it; symlinks stay symlinks."""
    shutil.copytree(ROOT, dest, symlinks=True, ignore=_left_over)
    return dest


def source_files(root: Path, under: str = "") -> set[str]:
    """Every file below root/under (symlinked folders followed), relative to root."""
    found = set()
    for directory, dirs, files in os.walk(root / under, followlinks=True):
        dirs[:] = sorted(set(dirs) - _left_over(directory, dirs))
        for name in set(files) - _left_over(directory, files):
            found.add(str(Path(directory, name).relative_to(root)))
    return found


def build(source: Path, out: Path, *kinds: str) -> subprocess.CompletedProcess:
    """`python -m build --sdist/--wheel` on source into out, as a user runs it (isolated)."""
    done = subprocess.run([sys.executable, "-m", "build", *(f"--{kind}" for kind in kinds),
                           "--outdir", str(out), str(source)],
                          cwd=source, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                          env=outside_env())
    assert done.returncode == 0, f"build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def only(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def wheel_files(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def wheel_modes(wheel: Path) -> dict[str, int]:
    """Each file's permission bits as the wheel records them (pip installs them so)."""
    with zipfile.ZipFile(wheel) as archive:
        return {info.filename: (info.external_attr >> 16) & 0o777 for info in archive.infolist()}


def sdist_members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    """The sdist's members by path below its top folder (molteniron-VERSION/)."""
    with tarfile.open(sdist) as archive:
        return {member.name.partition("/")[2]: member for member in archive.getmembers()
                if member.name.partition("/")[2]}


def extract_sdist(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, filter="data")
        else:  # Python before 3.12 (and 3.11.4): no filters
            archive.extractall(dest)
    (top,) = dest.iterdir()
    return top


def outside_env(bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment without anything that points into this checkout: no PYTHONPATH, no
    venv of ours on PATH, no MoltenIron settings (each test gives its own), nothing of this
    pytest run (PYTEST_XDIST_WORKER, PYTEST_ADDOPTS...). bin_dir first on PATH."""
    path = [entry for entry in os.environ.get("PATH", os.defpath).split(os.pathsep)
            if entry and not Path(entry).resolve().is_relative_to(ROOT)]
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTHON", "PYTEST_", "MOLTENIRON_")) and name != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(([str(bin_dir)] if bin_dir else []) + path)
    return {**env, **extra}


class Venv:
    """A venv of its own in `home`, with a wheel installed the way a user installs it."""

    def __init__(self, home: Path):
        self.home = home
        self.bin = home / "bin"
        self.python = self.bin / "python"
        self.outside = home.parent / "outside"  # the cwd of every command: not the checkout
        self.outside.mkdir(exist_ok=True)

    def create(self) -> None:
        # The interpreter under our own venv, so that the new venv inherits nothing of it.
        base = getattr(sys, "_base_executable", sys.executable)
        self.run(base, "-m", "venv", str(self.home))

    def install(self, wheel: Path) -> None:
        self.run(str(self.python), "-m", "pip", "install", "--no-input", str(wheel))

    def env(self, **extra: str) -> dict[str, str]:
        return outside_env(self.bin, **extra)

    def run(self, *args: str, timeout: float = BUILD_TIMEOUT, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
        """A command with the venv's bin first on PATH, run from outside the checkout."""
        done = subprocess.run(list(args), cwd=self.outside, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, \
                f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def start(self, *args: str, log: Path, **env: str) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(list(args), cwd=self.outside, env=self.env(**env),
                                    stdout=out, stderr=subprocess.STDOUT)


class InstalledPool:
    """A worker from the venv serving a vhost and a database of this test's own."""

    def __init__(self, venv: Venv, workdir: Path, amqp_url: str, db_url: str):
        self.venv, self.workdir, self.db_url = venv, workdir, db_url
        self.cleaned = workdir / "cleaned"
        clean = workdir / "clean.sh"
        clean.write_text(f'#!/bin/sh\necho "$MOLTENIRON_NODE_NAME" >> "{self.cleaned}"\n')
        clean.chmod(0o755)
        self.config = workdir / "conf.yaml"
        self.config.write_text(yaml.safe_dump({
            "amqp_url": amqp_url, "db_url": db_url, "admins": "off", "request_timeout": 10,
            "cleaning_command": str(clean), "cleaning_timeout": 30}))
        self.worker: subprocess.Popen | None = None

    def start_worker(self) -> None:
        # No --no-migrate: the worker makes the database and its schema from the wheel's
        # migrations.
        self.worker = self.venv.start("molteniron-worker", "--config", str(self.config),
                                      log=self.workdir / "worker.log")
        wait_until(lambda: self.worker.poll() is not None or self.cli("status").returncode == 0,
                   90, "the installed worker to answer `molteniron status`")
        assert self.worker.poll() is None, self.worker_log()

    def worker_log(self) -> str:
        return (self.workdir / "worker.log").read_text()[-5000:]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("molteniron", "--timeout", "5", *args)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.venv.run(*args, check=False, timeout=120,
                             MOLTENIRON_CONFIG=str(self.config), **env)

    def nodes(self) -> list[tuple]:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(
                    text("SELECT name, state, owner FROM nodes ORDER BY id"))]
        finally:
            engine.dispose()


def drop_database(db_url: str) -> None:
    url = make_url(db_url)
    engine = create_engine(url.set(database=""))
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
    finally:
        engine.dispose()


def reply(done: subprocess.CompletedProcess) -> dict:
    """The JSON reply a command printed last, once it exited 0."""
    assert done.returncode == 0, done
    return json.loads(done.stdout.strip().splitlines()[-1])
