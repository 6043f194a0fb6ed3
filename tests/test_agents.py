"""A Jenkins agent that is not root (issue 21): with the kit installed (deploy/install.sh
--root, on a python every user may run), an unprivileged user reads the client config
the kit wrote (/etc/molteniron/client.yaml), cannot read any of the services' files,
and with only its CI password in the environment checks nodes out and back in through
the installed CLI and hooks, served by a real worker.

The agent runs in a private mount namespace in which the install's etc/ lies over /etc
(a read-only overlay), as user nobody: the CLI looks where it looks on a real agent,
and this machine's /etc is never touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.definitions import permissions_of
from tests.kit import copy_checkout, install, public_python
from tests.stack import _rabbitmqctl as rabbitmqctl
from tests.stack import node_args

AGENT = "nobody"  # a user of no group of the kit's: any Jenkins agent's
SERVICE_FILES = ("conf.yaml", "environment", "cleaner.environment", "secret.keys")

# As root: lay the install's etc/ over /etc, then become the agent with only what a
# Jenkins job gives it (its PATH, the CI user's password credential, its workspace).
AS_AGENT = r"""
set -euo pipefail
mount -t overlay overlay -o "lowerdir=$KIT_ROOT/etc:/etc" /etc
[ -f /etc/molteniron/conf.yaml ]  # else the agent would run against this machine's /etc
cd "$WORKSPACE"
exec setpriv --reuid="$AGENT" --regid="$(id -g "$AGENT")" --clear-groups \
  env -i PATH="$KIT_ROOT/usr/local/bin:/usr/bin:/bin" HOME=/nonexistent \
  MOLTENIRON_AMQP_PASSWORD="$CI_PASSWORD" MOLTENIRON_OWNER="$OWNER" WORKSPACE="$WORKSPACE" \
  MOLTENIRON_HOOKS="$KIT_ROOT/opt/molteniron/hooks" \
  ${CI_AMQP_URL:+MOLTENIRON_AMQP_URL="$CI_AMQP_URL"} "$@"
"""


@pytest.fixture(scope="module")
def kit_root():
    """The kit installed under a folder every user may enter (pytest's tmp is root's
    alone), with a venv the agent can run: --python, as an operator must give it here."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"],
            capture_output=True).returncode != 0:
        pytest.fail("no private mount namespace here (unshare -m): the agent's /etc "
                    "cannot be the kit's without touching this machine's", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="molteniron-agents-", dir="/tmp"))
    try:
        base.chmod(0o755)
        root = base / "root"
        done = install(root, copy_checkout(base / "source"), "--python", public_python())
        if done.returncode != 0:
            pytest.fail(f"deploy/install.sh failed (pip needs its package index):\n"
                        f"{done.stderr[-3000:]}", pytrace=False)
        workspace = base / "workspace"  # the job's, written by the agent
        workspace.mkdir()
        shutil.chown(workspace, AGENT)
        yield root
    finally:
        shutil.rmtree(base)


@pytest.fixture
def ci_user(running, amqp_url):
    """A broker user with the rights deploy/rabbitmq-definitions.json gives molteniron-ci,
    in the test run's vhost: name, password."""
    name, password = f"molteniron-ci-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    vhost = unquote(amqp_url.rsplit("/", 1)[1])
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, name, *permissions_of("molteniron-ci"))
        yield name, password
    finally:
        rabbitmqctl("delete_user", name)


def as_agent(kit_root: Path, password: str, *command: str,
             amqp_url: str = "") -> subprocess.CompletedProcess:
    """command run as the agent, over the kit's /etc; amqp_url: a job's MOLTENIRON_AMQP_URL."""
    try:
        return subprocess.run(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", AS_AGENT, "agent",
             *command],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KIT_ROOT": str(kit_root),
                 "AGENT": AGENT, "CI_PASSWORD": password, "CI_AMQP_URL": amqp_url,
                 "OWNER": "agent-job-1", "WORKSPACE": str(kit_root.parent / "workspace")},
            capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"as the agent, {' '.join(command)} did not end in 180 s;\n"
                    f"stdout: {hung.stdout!r}\nstderr: {hung.stderr!r}", pytrace=False)


def point_client_config_at(kit_root: Path, amqp_url: str, user: str) -> str:
    """client.yaml's amqp_url moved to the test's broker and vhost, as an operator edits
    it; the rest (and no password) as install.sh wrote it."""
    client = kit_root / "etc" / "molteniron" / "client.yaml"
    written = client.read_text()
    (line,) = [line for line in written.splitlines() if line.startswith("amqp_url:")]
    assert urlsplit(line.split(None, 1)[1]).username == "molteniron-ci", line
    host = urlsplit(amqp_url).netloc.rpartition("@")[2]
    url = f"amqp://{quote(user, safe='')}@{host}/{amqp_url.rsplit('/', 1)[1]}"
    client.write_text(written.replace(line, f"amqp_url: {url}"))
    return written


def test_a_non_root_agent_reads_client_yaml_alone_and_allocates_and_releases(
        kit_root, running, ci_user, amqp_url):
    user, password = ci_user
    for i in (1, 2):
        assert running.cli("add_baremetal", *node_args(i)).returncode == 0
    written = point_client_config_at(kit_root, amqp_url, user)
    workspace = kit_root.parent / "workspace"
    hooks = kit_root / "opt" / "molteniron" / "hooks"

    def agent(*command: str) -> subprocess.CompletedProcess:
        return as_agent(kit_root, password, *command)

    try:
        # What the agent may read of the kit: the client config, nothing of the services'.
        opened = agent("bash", "-c", 'for name in client.yaml "$@"; do '
                       'if head -c1 "/etc/molteniron/$name" >/dev/null 2>&1; '
                       'then echo "$name read"; else echo "$name denied"; fi; done',
                       "check", *SERVICE_FILES)
        assert opened.returncode == 0, opened
        assert dict(line.split() for line in opened.stdout.splitlines()) == {
            "client.yaml": "read", **dict.fromkeys(SERVICE_FILES, "denied")}

        # The URL comes from client.yaml alone (the agent's environment has no
        # MOLTENIRON_AMQP_URL nor MOLTENIRON_CONFIG), the password from the job.
        assert agent("molteniron", "status").returncode == 0

        pre = agent(str(hooks / "pre_hook.sh"), "2")
        assert pre.returncode == 0, pre
        held = json.loads((workspace / "molteniron-nodes.json").read_text())["nodes"]
        assert len(held) == 2
        assert len((workspace / "hardware_info").read_text().splitlines()) == 2
        assert running.sql("SELECT owner, holder_user FROM nodes") == [
            ("agent-job-1", user)] * 2

        kept = agent(str(hooks / "keep_lease.sh"), "true")
        assert kept.returncode == 0, kept

        post = agent(str(hooks / "post_hook.sh"))
        assert post.returncode == 0, post
        assert running.sql("SELECT owner FROM nodes") == [(None,)] * 2
        assert running.cli("allocate", "another-job", "2", "--no-wait").returncode == 0
    finally:
        (kit_root / "etc" / "molteniron" / "client.yaml").write_text(written)


def test_an_agent_of_an_older_kit_runs_from_its_environment_alone(
        kit_root, running, ci_user, amqp_url):
    """No client.yaml and /etc/molteniron 750 root:molteniron (a kit before issue 21): the
    job's MOLTENIRON_AMQP_URL and _PASSWORD are all the CLI needs, so the configuration
    it found but may not read does not stop it; it says what it skipped."""
    user, password = ci_user
    etc = kit_root / "etc" / "molteniron"
    client = etc / "client.yaml"
    kept = client.read_bytes() if client.exists() else None
    client.unlink(missing_ok=True)
    etc.chmod(0o750)
    host = urlsplit(amqp_url).netloc.rpartition("@")[2]
    url = f"amqp://{quote(user, safe='')}@{host}/{amqp_url.rsplit('/', 1)[1]}"
    try:
        done = as_agent(kit_root, password, "molteniron", "status", amqp_url=url)
        assert done.returncode == 0, done
        assert "not reading /etc/molteniron/" in done.stderr, done.stderr
        # Without the broker in its environment it stops, saying what to give it.
        refused = as_agent(kit_root, password, "molteniron", "status")
        assert refused.returncode == 2, refused
        assert "cannot read configuration /etc/molteniron/" in refused.stderr
        assert "MOLTENIRON_AMQP_URL" in refused.stderr, refused.stderr
    finally:
        etc.chmod(0o755)
        if kept is not None:
            client.write_bytes(kept)
