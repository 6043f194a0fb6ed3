"""Issue 21, Package: the wheel and the sdist, built for real and used as a user uses them.

The wheel holds one package, molteniron (workers and clients inside it; bench and
tests not at all), with its hooks, web pages and migrations and full metadata. Installed
into a venv of its own, away from this checkout, its worker, CLI, cleaner and Jenkins
hooks (found with `molteniron hooks-dir`) serve a pool on this run's services. The sdist
holds what the tests and the deploy kit need, and a wheel built from it is the same wheel.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sqlalchemy import make_url

from bench.env import stop_processes
from molteniron import __version__
from tests import services
from tests.dists import (
    InstalledPool,
    Venv,
    build,
    copy_source,
    drop_database,
    extract_sdist,
    only,
    outside_env,
    reply,
    sdist_members,
    source_files,
    wheel_files,
    wheel_modes,
)
from tests.stack import fresh_vhost

DIST_INFO = f"molteniron-{__version__}.dist-info"
HOOKS = ("pre_hook.sh", "post_hook.sh", "keep_lease.sh")
COMMANDS = {"molteniron": "molteniron.clients.cli:main",
            "molteniron-worker": "molteniron.workers.main:main",
            "molteniron-cleaner": "molteniron.clients.cleaner:main",
            "molteniron-web": "molteniron.clients.web.main:main"}
# What the code imports at run time (the CLI, the worker, molteniron-web).
RUNTIME_REQUIREMENTS = {"sqlalchemy", "pymysql", "pyyaml", "pika", "alembic", "cryptography",
                        "prometheus-client", "flask", "waitress"}
# What the tests, tox and the kit read from a source release, beside the package.
SOURCE_RELEASE = {"LICENSE", "README.md", "pyproject.toml", "tox.ini", "MANIFEST.in", "PKG-INFO",
                  "molteniron", "workers", "clients", "tests", "bench", "deploy", "examples",
                  "docs", ".ci"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The wheel and the sdist, built from a copy of this tree (tests/dists.py says why)."""
    base = tmp_path_factory.mktemp("dists")
    source = copy_source(base / "source")
    build(source, base / "out", "sdist", "wheel")
    return SimpleNamespace(source=source, wheel=only(base / "out", "*.whl"),
                           sdist=only(base / "out", "*.tar.gz"), base=base)


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory):
    """A venv of its own, away from the checkout, with the wheel installed in it."""
    venv = Venv(tmp_path_factory.mktemp("installed") / "venv")
    venv.create()
    venv.install(dists.wheel)
    return venv


# --- the wheel ------------------------------------------------------------------------

def test_the_wheel_holds_the_molteniron_package_and_nothing_beside_it(dists):
    files = wheel_files(dists.wheel)

    assert {name.split("/")[0] for name in files} == {"molteniron", DIST_INFO}
    package = {name for name in files if name.startswith("molteniron/")}
    # Every file of the package as the checkout has it, symlinked folders followed: the
    # modules of workers/ and clients/, the hooks, the web pages, the migrations.
    assert package == source_files(dists.source, "molteniron")
    for name in ("molteniron/workers/keeper.py", "molteniron/clients/cli.py",
                 "molteniron/clients/web/templates/base.html",
                 "molteniron/clients/web/static/style.css",
                 "molteniron/migrations/script.py.mako",
                 "molteniron/migrations/versions/0001_initial_schema.py",
                 *(f"molteniron/clients/hooks/{hook}" for hook in HOOKS)):
        assert name in package, name
    modes = wheel_modes(dists.wheel)
    assert {hook: oct(modes[f"molteniron/clients/hooks/{hook}"] & 0o111) for hook in HOOKS} == \
        dict.fromkeys(HOOKS, oct(0o111))  # run directly by Jenkins jobs


def test_the_wheel_says_its_license_classifiers_requirements_and_commands(dists):
    files = wheel_files(dists.wheel)
    metadata = Parser().parsestr(files[f"{DIST_INFO}/METADATA"].decode())

    assert (metadata["Name"], metadata["Version"]) == ("molteniron", __version__)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License-File"] == "LICENSE"
    assert files[f"{DIST_INFO}/licenses/LICENSE"] == (dists.source / "LICENSE").read_bytes()
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["Summary"] and metadata["Description-Content-Type"] == "text/markdown"
    assert str(metadata.get_payload()).startswith("# MoltenIron")  # README.md, the long description
    classifiers = metadata.get_all("Classifier", [])
    for wanted in ("Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux",
                   "Topic :: Software Development :: Testing"):
        assert wanted in classifiers
    requires = metadata.get_all("Requires-Dist", [])
    always = {re.sub(r"[^A-Za-z0-9._-].*", "", req).lower().replace("_", "-")
              for req in requires if ";" not in req}
    assert RUNTIME_REQUIREMENTS <= always, requires
    assert set(metadata.get_all("Provides-Extra", [])) == {"test", "lint", "types"}
    entry_points = configparser.ConfigParser()
    entry_points.read_string(files[f"{DIST_INFO}/entry_points.txt"].decode())
    assert dict(entry_points["console_scripts"]) == COMMANDS


def test_the_installed_wheel_is_imported_from_the_venv_and_names_no_other_top_level_package(
        installed):
    probe = ("import importlib.util, json, molteniron, molteniron.workers.keeper, "
             "molteniron.clients.cli; print(json.dumps({'files': [molteniron.__file__, "
             "molteniron.workers.keeper.__file__, molteniron.clients.cli.__file__], "
             "'others': [n for n in ('workers', 'clients', 'bench', 'tests') "
             "if importlib.util.find_spec(n)]}))")
    seen = json.loads(installed.run(str(installed.python), "-c", probe).stdout)

    site = installed.home.resolve()
    assert all(Path(path).resolve().is_relative_to(site) for path in seen["files"]), seen
    assert seen["others"] == []
    for command in COMMANDS:
        done = installed.run(command, "--version")
        assert __version__ in done.stdout + done.stderr, (command, done)


# --- the sdist ------------------------------------------------------------------------

def test_the_sdist_holds_what_the_tests_and_the_deploy_kit_need(dists):
    members = sdist_members(dists.sdist)
    names = {name for name, member in members.items() if not member.isdir()}

    assert SOURCE_RELEASE <= {name.split("/")[0] for name in members}
    for folder in ("tests", "bench", "deploy", "examples", "docs", ".ci", "workers", "clients",
                   "molteniron"):
        missing = source_files(dists.source, folder) - names
        assert not missing, f"not in the sdist: {sorted(missing)}"
    assert not [name for name in names if "__pycache__" in name or name.startswith("bench/logs")]
    # The symlinked packages are in it as files: a symlink in an archive is not portable.
    assert not [name for name, member in members.items() if member.issym()]
    for hook in HOOKS:
        for path in (f"clients/hooks/{hook}", f"molteniron/clients/hooks/{hook}"):
            assert members[path].mode & 0o111 == 0o111, path


@pytest.fixture(scope="module")
def sdist_tree(dists):
    return extract_sdist(dists.sdist, dists.base / "extracted")


def test_a_wheel_built_from_the_sdist_is_the_same_wheel(dists, sdist_tree):
    build(sdist_tree, dists.base / "from-sdist", "wheel")
    again = wheel_files(only(dists.base / "from-sdist", "*.whl"))
    first = wheel_files(dists.wheel)

    assert sorted(again) == sorted(first)
    assert [name for name in first if again[name] != first[name]
            and name != f"{DIST_INFO}/RECORD"] == []


def test_the_tests_of_the_sdist_are_collected_from_it(sdist_tree):
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests"],
                          cwd=sdist_tree, env=outside_env(), capture_output=True, text=True,
                          timeout=300)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    assert collected == {f"tests/{path.name}" for path in (sdist_tree / "tests").glob("test_*.py")}
    # ...and they test the sdist's code, not this checkout's.
    where = subprocess.run([sys.executable, "-c", "import molteniron; print(molteniron.__file__)"],
                           cwd=sdist_tree, env=outside_env(), capture_output=True, text=True,
                           timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(sdist_tree), where


# --- the installed commands on a real pool ----------------------------------------------

NODES = [  # an inventory file, as `molteniron export` writes one
    {"name": f"node-{i}", "ipmi_ip": f"10.0.0.{i}", "ipmi_user": "admin",
     "ipmi_password": f"secret-{i}", "allocation_pool": [f"10.1.{i}.1", f"10.1.{i}.2"],
     "port_hwaddr": f"aa:bb:cc:dd:ee:{i:02x}", "cpu_arch": "x86_64", "cpus": 8,
     "ram_mb": 16384, "disk_gb": 200}
    for i in (1, 2)]


@pytest.fixture
def pool(installed, tmp_path):
    chosen = services.current()
    db_url = make_url(chosen.db_url).set(database=services.run_name()) \
        .render_as_string(hide_password=False)
    with fresh_vhost(chosen) as amqp_url:
        pool = InstalledPool(installed, tmp_path, amqp_url, db_url)
        try:
            pool.start_worker()
            yield pool
        finally:
            if pool.worker:
                stop_processes([pool.worker])
            drop_database(db_url)


@pytest.mark.stack
def test_the_installed_worker_cli_and_cleaner_serve_a_pool(pool):
    inventory = pool.workdir / "pool.yaml"
    inventory.write_text(yaml.safe_dump({"nodes": NODES}))
    assert reply(pool.cli("import", str(inventory)))["added"] == 2
    added = reply(pool.cli("add_baremetal", "node-3", "10.0.0.3", "admin", "secret-3", "10.1.3.1",
                           "aa:bb:cc:dd:ee:03", "x86_64", "8", "16384", "200"))
    assert added == {"status": 200}

    granted = reply(pool.cli("allocate", "job-1", "2"))
    assert sorted(node["name"] for node in granted["nodes"].values()) == ["node-1", "node-2"]
    assert pool.nodes() == [("node-1", "allocated", "job-1"), ("node-2", "allocated", "job-1"),
                            ("node-3", "ready", None)]
    assert reply(pool.cli("release", "job-1"))["released"] == 2
    assert pool.nodes() == [("node-1", "dirty", None), ("node-2", "dirty", None),
                            ("node-3", "ready", None)]

    cleaned = reply(pool.run("molteniron-cleaner", "--config", str(pool.config), "--once"))
    assert cleaned["ok"] is True and cleaned["state"] == "ready", cleaned
    assert pool.cleaned.read_text() == f"{cleaned['cleaned']}\n"
    assert sorted(state for _, state, _ in pool.nodes()) == ["dirty", "ready", "ready"]


@pytest.mark.stack
def test_the_installed_hooks_found_with_hooks_dir_allocate_and_release(pool):
    where = pool.cli("hooks-dir")
    assert where.returncode == 0, where
    hooks = Path(where.stdout.strip())
    assert hooks.resolve().is_relative_to(pool.venv.home.resolve()), hooks
    reply(pool.cli("add_baremetal", "node-1", "10.0.0.1", "admin", "secret-1", "10.1.1.1",
                   "aa:bb:cc:dd:ee:01", "x86_64", "8", "16384", "200"))
    workspace = pool.workdir / "workspace"
    workspace.mkdir()
    job = {"WORKSPACE": str(workspace), "MOLTENIRON_OWNER": "build-7", "MOLTENIRON_WAIT": "30"}

    pre = pool.run(str(hooks / "pre_hook.sh"), "1", **job)  # run as Jenkins runs it: directly
    assert pre.returncode == 0, pre
    written = json.loads((workspace / "molteniron-nodes.json").read_text())
    assert [node["name"] for node in written["nodes"].values()] == ["node-1"]
    assert (workspace / "hardware_info").read_text() == \
        "10.0.0.1 aa:bb:cc:dd:ee:01 admin secret-1\n"
    assert pool.nodes() == [("node-1", "allocated", "build-7")]

    post = pool.run(str(hooks / "post_hook.sh"), **job)
    assert post.returncode == 0, post
    assert pool.nodes() == [("node-1", "dirty", None)]  # released; cleaning comes next

