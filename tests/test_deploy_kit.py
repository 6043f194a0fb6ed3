"""The deploy kit as shipped: deploy/install.sh into a temporary root, the systemd
units checked against that install, deploy/rabbitmq-definitions.json and
deploy/create-database.sql loaded into a fresh vhost and database of the real
services, and a Jenkins flow served by the installed worker and cleaner, each
logged in as the kit's users with the passwords install.sh generated.

Names are rewritten in copies (vhost, broker users, database, database user) so the
shared broker and database are not touched; everything made is removed afterwards.
What each broker permission is for is measured in tests/test_broker_identity.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pika
import pytest
import yaml
from pika.exceptions import ChannelClosedByBroker
from sqlalchemy import make_url, text

from bench.env import stop_processes
from molteniron import db, flat_yaml, protocol, secrets
from molteniron.config import ENV_OVERRIDES, ENV_PASSWORDS, Config, load_config
from tests import services
from tests.completion import complete, registered
from tests.conftest import TEST_DB_URL
from tests.definitions import DEFINITIONS
from tests.kit import (
    DEPLOY,
    HARDENING,
    copy_checkout,
    first_group,
    install,
    public_python,
    service_settings,
)
from tests.stack import ROOT, TEST_AMQP_URL, node_args, wait_until
from tests.stack import _rabbitmqctl as rabbitmqctl

UNITS = ("molteniron-worker.service", "molteniron-cleaner.service")
PROGRAMS = ("molteniron", "molteniron-worker", "molteniron-cleaner")
SQL = (DEPLOY / "create-database.sql").read_text()
# What install.sh gives /etc/molteniron and its files: owner:group, mode. No secret is
# readable by a group: the group molteniron (the worker's, and the cleaner's by its
# unit's SupplementaryGroups=) reads conf.yaml, which holds no password; systemd (root)
# reads the environment files for the units; only the worker reads the key. Everyone
# (a CI agent) enters the folder and reads client.yaml: no password, nothing of the worker's.
KIT_FILES = {
    "": ("root:root", 0o755),
    "client.yaml": ("root:root", 0o644),
    "conf.yaml": ("root:molteniron", 0o640),
    "environment": ("root:root", 0o600),
    "cleaner.environment": ("root:root", 0o600),
    "secret.keys": ("molteniron:molteniron", 0o600),
}


# --- the install --------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The root that `deploy/install.sh --root ROOT SOURCE` installed this checkout into."""
    work = tmp_path_factory.mktemp("kit")
    source = copy_checkout(work / "source")
    root = work / "root"
    # An operator's install, dependencies and all, from the package index pip is set
    # up with (about 20 s here), on a python the services' users can run.
    done = install(root, source, "--python", public_python())
    if done.returncode != 0:
        pytest.fail(f"deploy/install.sh failed (pip needs its package index):\n"
                    f"{done.stderr[-3000:]}", pytrace=False)
    (work / "install.log").write_text(done.stderr)
    return root


def recorded_owners(log: str) -> dict[str, tuple[str, int]]:
    """What install.sh says it set (or, with --root, would set): path -> (owner:group, mode)."""
    return {path: (owner, int(bits, 8)) for path, owner, bits in re.findall(
        r"^install\.sh: (/\S*) (\S+:\S+) ([0-7]{3})(?: \(not chowned: --root\))?$", log, re.M)}


def environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (as install.sh writes them)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_install_gives_a_venv_the_commands_and_private_config(installed):
    venv, etc = installed / "opt" / "molteniron", installed / "etc" / "molteniron"
    for program in PROGRAMS:
        link = installed / "usr" / "local" / "bin" / program
        assert link.resolve() == venv / "bin" / program
        helped = subprocess.run([str(link), "--help"], capture_output=True, text=True,
                                timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert helped.returncode == 0 and "usage:" in helped.stdout, (program, helped)
    # The venv's own copy runs, not this checkout.
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import molteniron.clients.cli, molteniron.workers.main as m; "
                            "print(m.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    assert Path(where.stdout.strip()).is_relative_to(venv), where
    # The Jenkins examples run the hooks from MOLTENIRON_HOOKS=/opt/molteniron/hooks:
    # the installed package's (a wheel's too), each of them.
    shipped = sorted(path.name for path in (ROOT / "clients" / "hooks").glob("*.sh"))
    assert {"pre_hook.sh", "post_hook.sh", "keep_lease.sh"} <= set(shipped)
    assert sorted(path.name for path in (venv / "hooks").iterdir()) == shipped
    for hook in shipped:
        assert (venv / "hooks" / hook).read_bytes() == (
            ROOT / "clients" / "hooks" / hook).read_bytes()
        assert mode(venv / "hooks" / hook) == 0o755

    # The modes are set under --root too; the owners a real install sets are said.
    recorded = recorded_owners((installed.parent / "install.log").read_text())
    assert recorded == {str(etc / name).rstrip("/"): kept for name, kept in KIT_FILES.items()}
    for name, (_, bits) in KIT_FILES.items():
        assert mode(etc / name) == bits, name  # secret.keys: the worker warns about wider
    assert (etc / "conf.yaml.example").read_text() == (DEPLOY / "conf.yaml.example").read_text()

    # The written config names the kit's users, vhost and database, and the key file.
    config = load_config(str(etc / "conf.yaml"), env={})
    amqp, database = urlsplit(config.amqp_url), make_url(config.db_url)
    assert (amqp.username, amqp.path) == ("molteniron-worker", "/" + KIT_VHOST)
    assert (database.username, database.database) == (KIT_DB_USER, KIT_DATABASE)
    # The cleaner's user reads conf.yaml too: no password in it.
    assert amqp.password is None and database.password is None
    assert config.admins == ("molteniron-admin",)
    assert config.secret_key_file == str(etc / "secret.keys")
    assert len(secrets.load_keys(config.secret_key_file)) == 1
    # The CLI's: the kit's CI user on the same broker, and nothing of the worker's.
    client = load_config(str(etc / "client.yaml"), env={})
    ci = urlsplit(client.amqp_url)
    assert (ci.username, ci.password, ci.path, ci.netloc.rpartition("@")[2]) == (
        "molteniron-ci", None, "/" + KIT_VHOST, amqp.netloc.rpartition("@")[2])
    assert "molteniron-ci" in {user["name"] for user in DEFINITIONS["users"]}
    assert (client.request_timeout, client.allocate_wait) == (30, 3600)
    assert (client.db_url, client.secret_key_file) == (Config().db_url, None)
    # Read at every command: without pyyaml (molteniron/flat_yaml.py), so the CLI starts quick.
    assert flat_yaml.parse((etc / "client.yaml").read_text()) is not None
    cleaner = urlsplit(environment_file(etc / "cleaner.environment")["MOLTENIRON_AMQP_URL"])
    assert (cleaner.username, cleaner.path, cleaner.netloc.rpartition("@")[2]) == (
        "molteniron-admin", "/" + KIT_VHOST, amqp.netloc.rpartition("@")[2])
    passwords = [environment_file(etc / "environment")["MOLTENIRON_DB_PASSWORD"],
                 environment_file(etc / "environment")["MOLTENIRON_AMQP_PASSWORD"],
                 environment_file(etc / "cleaner.environment")["MOLTENIRON_AMQP_PASSWORD"]]
    assert len(set(passwords)) == 3 and all(len(p) >= 32 for p in passwords)

    # Idempotent: a second run (an upgrade) keeps every secret and edit, and sets the
    # modes again (a kit whose worker and cleaner shared a user made them wider).
    written = (etc / "conf.yaml").read_text()
    (etc / "conf.yaml").write_text(written.replace(
        f"://{KIT_DB_USER}@", f"://{KIT_DB_USER}:hunter2@") + "log_level: DEBUG\n")
    agents = (etc / "client.yaml").read_text()
    (etc / "client.yaml").write_text(agents.replace("://molteniron-ci@", "://molteniron-ci:pw@"))
    for name in ("conf.yaml", "environment", "cleaner.environment"):
        (etc / name).chmod(0o644)
    (etc / "client.yaml").chmod(0o600)
    etc.chmod(0o750)  # an older kit's
    kept = {path: path.read_bytes() for path in etc.iterdir() if path.suffix != ".example"}
    again = install(installed, installed.parent / "source")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.read_bytes() for path in kept} == kept
    for name, (_, bits) in KIT_FILES.items():
        assert mode(etc / name) == bits, name
    # A password put in conf.yaml is one the cleaner's user can read, in client.yaml one
    # everyone can: install.sh says so.
    assert re.search(r"WARNING: \S+/conf\.yaml holds a password", again.stderr), again.stderr
    assert re.search(r"WARNING: \S+/client\.yaml holds a password in a URL, and every user",
                     again.stderr), again.stderr
    (etc / "conf.yaml").write_text(written)
    (etc / "client.yaml").write_text(agents)
    assert subprocess.run([str(venv / "bin" / "molteniron"), "--help"], capture_output=True,
                          timeout=60).returncode == 0


def test_install_writes_bash_completion_for_every_user(installed):
    """bash-completion loads /usr/local/share/bash-completion/completions/molteniron on
    the first TAB after `molteniron`: the installed CLI's own completion, for every user."""
    script = installed / "usr" / "local" / "share" / "bash-completion" / "completions" / (
        "molteniron")
    assert script.is_file(), f"install.sh wrote no bash completion at {script}"
    assert mode(script) == 0o644
    assert registered(str(script)) == "complete -F _molteniron molteniron"
    assert "allocate" in complete(str(script), "molteniron", "al")


def test_install_refuses_a_python_the_service_user_could_not_run():
    """A venv links to its interpreter: one under a folder closed to other users (pyenv's
    under /root, mode 700) would leave the services unable to start. Refused before any
    venv is made, saying how to choose another."""
    base = Path(tempfile.mkdtemp(prefix="molteniron-python-", dir="/tmp"))
    try:
        base.chmod(0o755)
        private = base / "private"
        (private / "bin").mkdir(parents=True)
        private.chmod(0o700)
        python = private / "bin" / "python3"  # runs, with the system's standard library
        shutil.copy2(Path(public_python()).resolve(), python)
        root = base / "root"
        done = install(root, "molteniron==0.0.0", "--python", str(python),
                       pip_options=("--no-index",))
        assert done.returncode == 2, done
        assert re.search(rf"another user cannot run {re.escape(str(python))} "
                         rf"\({re.escape(str(private))} is mode 700\)", done.stderr), done.stderr
        assert "--python /usr/bin/python3" in done.stderr or "--python PY" in done.stderr
        assert not root.exists()
    finally:
        shutil.rmtree(base)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


REAL_INSTALL = r"""
set -euo pipefail
mount --bind "$WORK/etc" /etc
mount --bind "$WORK/opt" /opt
mount --bind "$WORK/bin" /usr/local/bin
# Never let a failed mount send the install to the real /etc.
[ -e /etc/.molteniron-test-copy ] && [ -e /opt/.molteniron-test-copy ]
bash "$INSTALL" "$SOURCE" -- --no-deps --no-index
getent passwd molteniron molteniron-cleaner
echo ---
stat -c '%n %U:%G %a' /etc/molteniron /etc/molteniron/* /opt/molteniron
echo ---
/usr/local/bin/molteniron --help >/dev/null
"$CHECK_PYTHON" -I -c "$ACCESS_CHECK" "$CREDENTIALS"
"""

# Run as root inside the private mount namespace, after the install: each unit's user
# (with the unit's groups, as systemd gives them) opens each file, and a process of the
# worker's user holding a secret in its environment (/proc/PID/environ).
ACCESS_CHECK = r"""
import json, subprocess, sys, time
credentials = json.loads(sys.argv[1])  # unit -> [User=, Group=, SupplementaryGroups=...]
OPEN = ("import sys\ntry:\n    open(sys.argv[1], 'rb').read(1)\n"
        "except PermissionError:\n    print('denied')\nelse:\n    print('read')")

def as_unit(unit, *command):
    user, *groups = credentials[unit]
    return ["setpriv", f"--reuid={user}", f"--regid={groups[0]}",
            f"--groups={','.join(groups)}", *command]

marker = "MOLTENIRON_DB_PASSWORD=worker-secret"
worker = subprocess.Popen(as_unit("molteniron-worker.service", "/usr/bin/env", marker,
                                  "/bin/sleep", "60"))
try:
    deadline = time.monotonic() + 10  # until it runs as the worker's user, with the secret
    while marker.encode() not in open(f"/proc/{worker.pid}/environ", "rb").read():
        assert time.monotonic() < deadline and worker.poll() is None, "no worker process"
        time.sleep(0.01)
    paths = {name: f"/etc/molteniron/{name}" for name in
             ("client.yaml", "conf.yaml", "environment", "cleaner.environment", "secret.keys")}
    paths["the worker's /proc/PID/environ"] = f"/proc/{worker.pid}/environ"
    print(json.dumps({unit: {name: subprocess.run(
        as_unit(unit, "/usr/bin/python3", "-I", "-c", OPEN, path), capture_output=True,
        text=True, check=True).stdout.strip() for name, path in paths.items()}
        for unit in credentials}))
finally:
    worker.kill()
    worker.wait()
"""


def test_install_as_root_makes_the_user_and_sets_owners(installed, tmp_path):
    """The run for real (no --root), in a private mount namespace over copies of /etc and
    /opt, so the machine's own are never touched."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"],
            capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m): a real install would "
                    "touch this machine's /etc")
    shutil.copytree("/etc", tmp_path / "etc", symlinks=True)
    (tmp_path / "opt").mkdir()
    (tmp_path / "bin").mkdir()
    for copy in ("etc", "opt"):
        (tmp_path / copy / ".molteniron-test-copy").touch()
    # The venv install.sh made under the temporary root, reused: given the requirement
    # `molteniron` with --no-index, its pip finds it installed and fetches nothing.
    shutil.copytree(installed / "opt" / "molteniron", tmp_path / "opt" / "molteniron",
                    symlinks=True)
    credentials = {**{unit: run_as(unit) for unit in UNITS},
                   "nobody": ["nobody", "nogroup"]}
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", REAL_INSTALL],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "WORK": str(tmp_path),
             "INSTALL": str(DEPLOY / "install.sh"), "SOURCE": "molteniron",
             "CHECK_PYTHON": sys.executable, "ACCESS_CHECK": ACCESS_CHECK,
             "CREDENTIALS": json.dumps(credentials)},
        capture_output=True, text=True, timeout=300, cwd=tmp_path / "bin")
    assert done.returncode == 0, done.stderr[-3000:]
    users, stats, access = done.stdout.split("---\n")
    # Two system users: the worker's and the cleaner's (so cleaning_command runs as the
    # latter), the ones the units name.
    for line, unit in zip(users.splitlines(), UNITS, strict=True):
        name, _, uid, *_, home, shell = line.split(":")
        assert (name, home, shell) == (credentials[unit][0], "/nonexistent", "/usr/sbin/nologin")
        assert int(uid) < 1000  # a system user
    owners = {path: f"{owner} {bits}" for path, owner, bits in
              (line.split(" ") for line in stats.splitlines())}
    assert owners == {
        **{f"/etc/molteniron/{name}".rstrip("/"): f"{owner} {bits:o}"
           for name, (owner, bits) in KIT_FILES.items()},
        "/etc/molteniron/conf.yaml.example": "root:root 644",
        "/opt/molteniron": "root:root 755",
    }, done.stdout
    # Neither unit's user reads the other's secrets: the environment files are systemd's
    # to read, the key the worker's alone, and the worker's processes are not the
    # cleaner's to look into. Both read conf.yaml.
    assert json.loads(access) == {
        "molteniron-worker.service": {
            "client.yaml": "read",
            "conf.yaml": "read", "environment": "denied", "cleaner.environment": "denied",
            "secret.keys": "read", "the worker's /proc/PID/environ": "read"},
        "molteniron-cleaner.service": {
            "client.yaml": "read",
            "conf.yaml": "read", "environment": "denied", "cleaner.environment": "denied",
            "secret.keys": "denied", "the worker's /proc/PID/environ": "denied"},
        # Anyone else (a Jenkins agent's user): the client config and nothing more.
        "nobody": {
            "client.yaml": "read",
            "conf.yaml": "denied", "environment": "denied", "cleaner.environment": "denied",
            "secret.keys": "denied", "the worker's /proc/PID/environ": "denied"},
    }
    # What the units name, where the install put it.
    assert "secret_key_file: /etc/molteniron/secret.keys" in (
        tmp_path / "etc" / "molteniron" / "conf.yaml").read_text()
    for unit in UNITS:
        assert (tmp_path / "etc" / "systemd" / "system" / unit).read_text() == (
            DEPLOY / unit).read_text()


# --- the units --------------------------------------------------------------------


def run_as(unit: str) -> list[str]:
    """Who a shipped unit's processes run as: User=, Group=, then SupplementaryGroups=."""
    settings = service_settings(unit)
    return [*settings["User"], *settings["Group"],
            *" ".join(settings.get("SupplementaryGroups", [])).split()]


def test_the_cleaner_runs_as_a_user_of_its_own_and_both_units_stay_hardened():
    worker, cleaner = (service_settings(unit) for unit in UNITS)
    assert (worker["User"], worker["Group"]) == (["molteniron"], ["molteniron"])
    assert "SupplementaryGroups" not in worker
    # Not the worker's user: cleaning_command runs as this one. The worker's group only
    # to read conf.yaml (KIT_FILES: no secret is readable by a group).
    assert cleaner["User"] == cleaner["Group"] == ["molteniron-cleaner"]
    assert cleaner["SupplementaryGroups"] == ["molteniron"]
    assert cleaner["InaccessiblePaths"] == [
        "-/etc/molteniron/environment -/etc/molteniron/secret.keys"]
    assert worker["EnvironmentFile"] == ["/etc/molteniron/environment"]
    assert cleaner["EnvironmentFile"] == ["/etc/molteniron/cleaner.environment"]
    for unit, settings in zip(UNITS, (worker, cleaner)):
        for key, value in HARDENING.items():
            assert settings.get(key) == [value], (unit, key)
        assert "@system-service" in settings["SystemCallFilter"], unit
        assert not {"DynamicUser", "PermissionsStartOnly"} & set(settings), unit


def unit_for(installed: Path, unit: str) -> str:
    """The unit's text with its paths pointing into the temporary install."""
    return ((DEPLOY / unit).read_text()
            .replace("/opt/molteniron/", f"{installed}/opt/molteniron/")
            .replace("/etc/molteniron/", f"{installed}/etc/molteniron/"))


def exec_start(installed: Path, unit: str) -> list[str]:
    (line,) = [line for line in unit_for(installed, unit).splitlines()
               if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_units_verify_against_the_install(installed, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here: the units cannot be verified")
    for unit in UNITS:
        copy = tmp_path / unit
        copy.write_text(unit_for(installed, unit))
        assert (installed / "etc" / "systemd" / "system" / unit).read_text() == (
            DEPLOY / unit).read_text()
        # verify checks ExecStart's program exists; it only warns (exit 0) on a
        # misspelt key or a bad value, so any output is a failure.
        verified = subprocess.run(["systemd-analyze", "verify", str(copy)],
                                  capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0 and not verified.stderr.strip(), (unit, verified)
        for line in unit_for(installed, unit).splitlines():
            if line.startswith("EnvironmentFile="):
                assert Path(line.split("=", 1)[1].lstrip("-")).is_file(), line
        # systemd's own rating of the hardening: 0 (locked down) .. 10 (none at all).
        rated = subprocess.run(["systemd-analyze", "security", "--offline=true", str(copy)],
                               capture_output=True, text=True, timeout=60)
        exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", rated.stdout)
        assert exposure and float(exposure.group(1)) <= 2.0, (unit, rated.stdout[-2000:])


# --- the broker definitions and the SQL, loaded as shipped ------------------------------

KIT_VHOST = DEFINITIONS["vhosts"][0]["name"]
_STATEMENTS = re.sub(r"^--.*\n", "", SQL, flags=re.M)

KIT_DATABASE = first_group(r"^CREATE DATABASE IF NOT EXISTS (\w+)", _STATEMENTS, re.M)
KIT_DB_USER = first_group(r"^CREATE USER IF NOT EXISTS '([^']+)'", _STATEMENTS, re.M)
KIT_GRANTS = [grant.strip() for grant in first_group(
    r"^GRANT (.+?)\s+ON", _STATEMENTS, re.M | re.S).split(",")]


@dataclass
class Kit:
    vhost: str
    users: dict[str, str]   # the definitions' user name -> its name in this test
    database: str
    db_user: str

    def amqp_url(self, user: str) -> str:
        host = urlsplit(TEST_AMQP_URL).netloc.rpartition("@")[2]
        return f"amqp://{quote(self.users[user], safe='')}@{host}/{quote(self.vhost, safe='')}"

    def db_url(self) -> str:
        return make_url(TEST_DB_URL).set(username=self.db_user, password=None,
                                         database=self.database).render_as_string()


def mariadb(statements: str) -> None:
    """Run SQL as the test database's administrator, as `mariadb < FILE` would."""
    if shutil.which("mariadb") is None:
        pytest.fail("the mariadb client is not on PATH (apt-get install mariadb-client)",
                    pytrace=False)
    url = make_url(TEST_DB_URL)
    command = ["mariadb", f"--host={url.host or '127.0.0.1'}", f"--port={url.port or 3306}",
               f"--user={url.username or 'root'}"]
    if url.password:
        command.append(f"--password={url.password}")
    done = subprocess.run(command, input=statements, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def kit(amqp_url, database_url):
    """The definitions in a fresh vhost and the SQL in a fresh database, renamed.

    (amqp_url and database_url: they fail the test, saying how to start them, when
    RabbitMQ or MariaDB do not answer.)"""
    if services.current().kind != services.LOCAL:
        pytest.skip("rabbitmqctl import_definitions reads its file on the broker's host: "
                    "the kit is loaded only into the local services")
    tag = uuid.uuid4().hex[:8]
    made = Kit(vhost=f"molteniron_kit_{tag}",
               users={u["name"]: f"{u['name']}-{tag}" for u in DEFINITIONS["users"]},
               database=f"molteniron_kit_{tag}", db_user=f"mi_kit_{tag}")
    definitions = {
        **DEFINITIONS,
        "vhosts": [{"name": made.vhost}],
        "users": [{**u, "name": made.users[u["name"]]} for u in DEFINITIONS["users"]],
        "permissions": [{**p, "user": made.users[p["user"]], "vhost": made.vhost}
                        for p in DEFINITIONS["permissions"]],
        **{section: [{**entry, "vhost": made.vhost} for entry in DEFINITIONS[section]]
           for section in ("exchanges", "queues", "bindings", "policies")}}
    # rabbitmqctl runs as the rabbitmq user: the file must be readable by it (not pytest's
    # tmp), and named by an absolute path.
    path = Path(f"/tmp/molteniron-kit-{tag}.json")
    path.write_text(json.dumps(definitions))
    path.chmod(0o644)
    sql = (SQL.replace(f"'{KIT_DB_USER}'@", f"'{made.db_user}'@")
           .replace(f" {KIT_DATABASE} ", f" {made.database} ")
           .replace(f" {KIT_DATABASE}.*", f" {made.database}.*"))
    assert sql.count(made.database) == 2 and sql.count(made.db_user) >= 2, sql
    try:
        rabbitmqctl("import_definitions", str(path))
        # It imports asynchronously: wait for the last objects it makes.
        def imported() -> bool:
            queues = set(rabbitmqctl("list_queues", "-s", "-p", made.vhost, "name").split())
            users = {line.split("\t")[0] for line in rabbitmqctl(
                "list_permissions", "-s", "-p", made.vhost).splitlines()}
            return {q["name"] for q in DEFINITIONS["queues"]} <= queues and users == set(
                made.users.values())
        wait_until(imported, 30, "the import of the definitions", interval=0.5)
        mariadb(sql)
        yield made
    finally:
        path.unlink()
        for undo in (["delete_vhost", made.vhost],
                     *(["delete_user", user] for user in made.users.values())):
            try:
                services.current().rabbitmqctl(*undo)
            except services.BrokerAdminError:
                pass  # never made (the import failed): nothing to remove
        mariadb(f"DROP DATABASE IF EXISTS {made.database}; "
                f"DROP USER IF EXISTS '{made.db_user}'@'%';")


def set_passwords(kit: Kit, installed: Path) -> str:
    """Give the kit's users install.sh's passwords, as README says; the CI user's password."""
    etc = installed / "etc" / "molteniron"
    worker, cleaner = environment_file(etc / "environment"), \
        environment_file(etc / "cleaner.environment")
    rabbitmqctl("change_password", kit.users["molteniron-worker"],
                worker["MOLTENIRON_AMQP_PASSWORD"])
    rabbitmqctl("change_password", kit.users["molteniron-admin"],
                cleaner["MOLTENIRON_AMQP_PASSWORD"])
    ci_password = uuid.uuid4().hex
    rabbitmqctl("change_password", kit.users["molteniron-ci"], ci_password)
    mariadb(f"ALTER USER '{kit.db_user}'@'%' IDENTIFIED BY "
            f"'{worker['MOLTENIRON_DB_PASSWORD']}' ACCOUNT UNLOCK;")
    return ci_password


def test_the_kit_serves_a_jenkins_flow_as_its_own_users(installed, kit, tmp_path):
    etc = installed / "etc" / "molteniron"
    ci_password = set_passwords(kit, installed)
    # What systemd gives the units: their EnvironmentFile= and a bare PATH; the URLs
    # point at this test's renamed vhost, users and database.
    base = {"PATH": "/usr/bin:/bin", "MOLTENIRON_CONFIG": str(tmp_path / "none.yaml")}
    (tmp_path / "none.yaml").write_text("{}\n")
    worker_env = {**base, **environment_file(etc / "environment"),
                  "MOLTENIRON_AMQP_URL": kit.amqp_url("molteniron-worker"),
                  "MOLTENIRON_DB_URL": kit.db_url(),
                  "MOLTENIRON_ADMINS": kit.users["molteniron-admin"]}
    cleaner_env = {**base, **environment_file(etc / "cleaner.environment"),
                   "MOLTENIRON_AMQP_URL": kit.amqp_url("molteniron-admin")}
    admin_env = {**cleaner_env}  # a person with the admin's login
    ci_env = {**base, "MOLTENIRON_AMQP_URL": kit.amqp_url("molteniron-ci"),
              "MOLTENIRON_AMQP_PASSWORD": ci_password}
    # The installed conf.yaml, with a cleaning command so the cleaner has work.
    conf = tmp_path / "conf.yaml"
    conf.write_text((etc / "conf.yaml").read_text()
                    + f"cleaning_command: {shutil.which('true')}\ncleaning_timeout: 60\n")

    def command(unit: str) -> list[str]:
        return [str(conf) if arg == f"{etc}/conf.yaml" else arg
                for arg in exec_start(installed, unit)]

    cli_path = installed / "usr" / "local" / "bin" / "molteniron"

    def cli(env: dict, *args: str) -> dict:
        done = subprocess.run([str(cli_path), *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout)

    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        # Migrates as the kit's database user (only the grants of create-database.sql),
        # declares its queues over the imported ones (a different argument: 406), serves.
        worker = subprocess.Popen(command("molteniron-worker.service"), env=worker_env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        def answers() -> bool:
            assert worker.poll() is None, log_path.read_text()
            return subprocess.run([str(cli_path), "--timeout", "2", "status"], env=ci_env,
                                  capture_output=True, timeout=60).returncode == 0
        try:
            wait_until(answers, 60, "the installed worker to answer the CI user", interval=0.5)
        except AssertionError as exc:  # e.g. its declare refused: 406 PRECONDITION_FAILED
            raise AssertionError(f"{exc}; its log:\n{log_path.read_text()[-3000:]}") from None

        for i in (1, 2):
            cli(admin_env, "add_baremetal", *node_args(i))
        allocated = cli(ci_env, "allocate", "job-1", "2", "--wait", "30")
        nodes = allocated["nodes"].values()
        assert {json.loads(node["blob"])["ipmi_password"] for node in nodes} == {
            "secret-1", "secret-2"}
        assert {f["id"] for f in cli(ci_env, "get_field", "job-1", "port_hwaddr")["result"]} == {
            node["id"] for node in nodes}
        assert cli(ci_env, "release", "job-1")["status"] == 200

        # Released nodes are dirty until the installed cleaner, as the admin, cleans them.
        for _ in nodes:
            cleaned = subprocess.run(command("molteniron-cleaner.service") + ["--once"],
                                     env=cleaner_env, capture_output=True, text=True,
                                     timeout=120, cwd="/")
            assert cleaned.returncode == 0, cleaned
            assert json.loads(cleaned.stdout.splitlines()[-1])["state"] == "ready", cleaned
        assert {row[1] for row in root_sql(kit, "SELECT name, state FROM nodes")} == {"ready"}
        # install.sh's key file encrypts the IPMI passwords at rest.
        stored = {row[0] for row in root_sql(kit, "SELECT ipmi_password FROM nodes")}
        assert stored and not stored & {"secret-1", "secret-2"}

        ci_cannot_take_requests_or_forge_replies(kit, ci_password)
    finally:
        stop_processes([worker])
    logged = log_path.read_text()
    assert "accessible to group/others" not in logged and "Traceback" not in logged, logged


def ci_cannot_take_requests_or_forge_replies(kit: Kit, ci_password: str) -> None:
    url = urlsplit(kit.amqp_url("molteniron-ci"))
    url = url._replace(netloc=f"{url.username}:{ci_password}@{url.netloc.rpartition('@')[2]}")
    connection = pika.BlockingConnection(pika.URLParameters(url.geturl()))
    try:
        attempts = {
            "consume the request queue": lambda ch: ch.basic_consume(
                protocol.REQUEST_QUEUE, lambda *a: None),
            "publish to the default exchange": lambda ch: ch.basic_publish(
                "", protocol.REQUEST_QUEUE, b"{}"),
        }
        for what, attempt in attempts.items():
            channel = connection.channel()
            channel.confirm_delivery()
            with pytest.raises(ChannelClosedByBroker) as refused:
                attempt(channel)
            assert refused.value.reply_code == 403, what
    finally:
        connection.close()


def root_sql(kit: Kit, query: str) -> list[tuple]:
    engine = db.make_engine(make_url(TEST_DB_URL).set(database=kit.database)
                            .render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


@pytest.mark.parametrize("missing", ["CREATE", "ALTER", "INDEX"])
def test_the_migrations_need_each_schema_grant(database_url, missing):
    """Each grant the SQL gives for the migrations is needed (MariaDB does not check REFERENCES)."""
    assert missing in KIT_GRANTS
    tag = uuid.uuid4().hex[:8]
    database, user, password = f"molteniron_grant_{tag}", f"mi_grant_{tag}", uuid.uuid4().hex
    fewer = ", ".join(grant for grant in KIT_GRANTS if grant != missing)
    engine = db.make_engine(make_url(TEST_DB_URL).set(
        username=user, password=password, database=database).render_as_string(
            hide_password=False))
    try:
        mariadb(f"CREATE DATABASE {database}; CREATE USER '{user}'@'%' IDENTIFIED BY "
                f"'{password}'; GRANT {fewer} ON {database}.* TO '{user}'@'%';")
        with pytest.raises(db.OperationalError) as refused:
            db.migrate(engine)
        orig = refused.value.orig
        assert orig is not None and orig.args[0] == 1142, refused.value  # command denied
    finally:
        engine.dispose()
        mariadb(f"DROP DATABASE IF EXISTS {database}; DROP USER IF EXISTS '{user}'@'%';")


# --- the example config and the compose file ------------------------------------------


def test_the_example_config_lists_every_key_with_its_default():
    example = DEPLOY / "conf.yaml.example"
    assert load_config(str(example), env={}) == Config()
    written = set(re.findall(r"^#? ?([a-z_]+):", example.read_text(), re.M))
    assert set(Config._fields) <= written


def test_compose_runs_the_commands_and_settings_the_code_has():
    from molteniron.workers.main import parse_args as worker_args
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    built = {name: s for name, s in services.items() if "build" in s}
    assert set(built) == {"migrate", "worker"}
    for name, service in built.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile")
        env = service["environment"]
        assert set(env) <= set(ENV_OVERRIDES) | set(ENV_PASSWORDS), name
        config = load_config(None, None, env={**env, "MOLTENIRON_CONFIG": "/dev/null"})
        amqp, database = urlsplit(config.amqp_url), make_url(config.db_url)
        assert amqp.hostname in services and database.host in services, name
        assert database.database == services[database.host]["environment"]["MARIADB_DATABASE"]
        program, *args = service["command"]
        assert program == "molteniron-worker", name
        worker_args(args)  # argparse exits 2 on an option the worker does not have
        for needed, condition in service["depends_on"].items():
            assert condition["condition"] in ("service_healthy",
                                              "service_completed_successfully"), name
            if condition["condition"] == "service_healthy":
                assert services[needed]["healthcheck"]["test"], needed
    # Two workers must not migrate at once: only `migrate` does, before them.
    assert "--no-migrate" in services["worker"]["command"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(first_group(r"^CMD (.+)$", dockerfile, re.M))
    assert cmd == ["molteniron-worker"]
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
    assert not {"setup.py", "README.md", "molteniron", "workers", "clients"} & set(ignored)
