"""Cleaning: released nodes are dirty until molteniron-cleaner has run cleaning_command on them.

End to end: the CLI, the real worker (its config names the command) and real
`python -m molteniron.clients.cleaner --once` processes with the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.private import process_gone
from molteniron import errors
from molteniron.clients.cleaner import NODE_ENV
from tests.cleaning import clean_once, cleaner, script
from tests.stack import ROOT, node_args, wait_until


def config(tmp_path: Path, command: str, timeout: float = 30) -> dict:
    """A worker/cleaner config with this cleaning_command: the env that points at it."""
    path = tmp_path / "cleaning.yaml"
    path.write_text(json.dumps({"cleaning_command": command, "cleaning_timeout": timeout}))
    return {"MOLTENIRON_CONFIG": str(path)}


def dirty_node(stack, env: dict) -> None:
    """A worker with env's cleaning_command, and node-1 released by a job: dirty."""
    stack.start_worker(env=env)
    for args in (("add_baremetal", *node_args(1)), ("allocate", "job", "1"), ("release", "job")):
        done = stack.cli(*args)
        assert done.returncode == 0, done
    assert nodes(stack) == [("node-1", "dirty", None)]


def nodes(stack):
    return stack.sql("SELECT name, state, maintenance_reason FROM nodes ORDER BY id")


@pytest.fixture
def cleaning(stack, tmp_path):
    """A stack whose worker cleans released nodes with ./clean.sh (which records its env)."""
    seen = tmp_path / "seen.env"
    command = script(tmp_path, "clean.sh", f'env > "{seen}"\n')
    env = config(tmp_path, f"{command} --full")
    stack.start_worker(env=env)
    stack.cleaning_env, stack.seen = env, seen
    return stack


def test_a_released_node_is_dirty_and_a_waiter_waits_for_its_cleaning(cleaning, tmp_path):
    stack = cleaning
    pwned = tmp_path / "pwned"
    password = f"p$(touch {pwned})w'\"; `touch {pwned}`"
    stack.cli("add_baremetal", "node-1", "10.0.0.1", "admin", password,
              "10.1.0.1,10.1.0.2", "aa:bb:cc:dd:ee:01", "x86_64", "8", "16384", "200")
    assert stack.cli("allocate", "job-1", "1").returncode == 0
    waiter = stack.cli_start("allocate", "job-2", "1", "--wait", "60")
    wait_until(lambda: stack.sql("SELECT owner FROM waiting_requests") == [("job-2",)], 15,
               "job-2 to wait")

    assert stack.cli("release", "job-1").returncode == 0
    assert nodes(stack) == [("node-1", "dirty", None)]
    # Dirty counts in the pool's size: the waiter is not told the pool is too small.
    assert stack.sql("SELECT owner FROM waiting_requests") == [("job-2",)]
    dirty = stack.cli("status", "--state", "dirty", "-t", "json").json["result"]
    assert dirty[0]["name"] == "node-1"

    code, outcome, stderr = clean_once(stack, stack.cleaning_env)
    assert code == 0, stderr
    assert outcome == {"status": 200, "cleaned": "node-1", "ok": True, "state": "ready",
                       "maintenance_reason": None}
    served = waiter.result(timeout=30)
    assert served.returncode == 0 and "node_1" in served.json["nodes"], served

    env = dict(line.split("=", 1) for line in stack.seen.read_text().splitlines() if "=" in line)
    assert env["MOLTENIRON_NODE_NAME"] == "node-1"
    assert env["MOLTENIRON_IPMI_PASSWORD"] == password  # as given: never run by a shell
    assert not pwned.exists()
    assert env["MOLTENIRON_ALLOCATION_POOL"] == "10.1.0.1,10.1.0.2"
    assert (env["MOLTENIRON_CPU_ARCH"], env["MOLTENIRON_CPUS"], env["MOLTENIRON_RAM_MB"],
            env["MOLTENIRON_DISK_GB"]) == ("x86_64", "8", "16384", "200")
    assert (env["MOLTENIRON_IPMI_IP"], env["MOLTENIRON_IPMI_USER"], env["MOLTENIRON_NODE_POOL"],
            env["MOLTENIRON_PORT_HWADDR"]) == ("10.0.0.1", "admin", "default", "aa:bb:cc:dd:ee:01")
    # The claim's reply carried the password; neither the log nor its stored copy does.
    assert "touch" not in stack.worker_log()
    assert all("touch" not in reply for reply, in stack.sql("SELECT reply FROM processed_requests"))


def test_nothing_dirty_nothing_done(cleaning):
    cleaning.cli("add_baremetal", *node_args(1))
    code, outcome, _ = clean_once(cleaning, cleaning.cleaning_env)
    assert (code, outcome) == (0, {"status": 200, "cleaned": None})
    assert not cleaning.seen.exists()


def test_a_failing_command_puts_the_node_in_maintenance_with_why(stack, tmp_path):
    command = script(tmp_path, "fail.sh", 'echo "checking BMC" >&2\necho "BMC unreachable" >&2\n'
                                          "exit 3\n")
    env = config(tmp_path, command)
    dirty_node(stack, env)

    code, outcome, _ = clean_once(stack, env)
    assert code == 0 and outcome["state"] == "maintenance", outcome
    assert nodes(stack) == [("node-1", "maintenance",
                             "cleaning failed: exit code 3: BMC unreachable")]
    # Out of service: the pool is too small for one node now.
    refused = stack.cli("allocate", "job", "1", "--no-wait")
    assert refused.json["error"] == "PoolTooSmall", refused


def test_a_command_past_cleaning_timeout_is_killed(stack, tmp_path):
    child = tmp_path / "child.pid"
    # The shell runs sleep as a child of its own: killing only the shell would leave it.
    command = script(tmp_path, "slow.sh", f'sleep 30 & echo $! > "{child}"; wait\n')
    env = config(tmp_path, command, timeout=2)
    dirty_node(stack, env)

    code, outcome, _ = clean_once(stack, env)
    assert code == 0 and outcome["state"] == "maintenance", outcome
    assert nodes(stack) == [("node-1", "maintenance", "cleaning failed: timed out after 2s")]
    wait_until(lambda: process_gone(int(child.read_text())), 5,
               "the timed-out command's child to be killed with it")


def test_a_cleaner_killed_mid_clean_leaves_a_claim_that_lapses(stack, tmp_path):
    started, pidfile = tmp_path / "started", tmp_path / "pid"
    # The first run hangs (its cleaner is killed meanwhile); any later run is clean.
    command = script(tmp_path, "hang-once.sh",
                     f'if [ -e "{started}" ]; then exit 0; fi\n'
                     f'echo $$ > "{pidfile}"; touch "{started}"; exec sleep 60\n')
    env = config(tmp_path, command, timeout=2)
    dirty_node(stack, env)

    first = cleaner(stack, env, "--once", "--name", "first")
    try:
        wait_until(pidfile.exists, 20, "the first cleaner's command to start")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        token = stack.sql("SELECT clean_claim FROM nodes")[0][0]
        assert token.startswith("first#")
        status = stack.cli("status", "-t", "json").json["result"][0]
        assert (status["status"], status["clean_claimed_by"]) == ("dirty", "first")
        assert status["clean_claim"] == "********"  # the token would let anyone report the node
        assert "dirty (cleaning by first until" in stack.cli(
            "-o", "result", "status", "-t", "csv").stdout

        # The claim outlives the command's kill (cleaning_timeout, 2 s) by a minute, so
        # that no second cleaner starts while the first may still be stopping its command.
        ((left,),) = stack.sql("SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), "
                               "clean_claimed_until) FROM nodes")
        assert 55 <= left <= 63, left  # a claim ends on a whole second, rounded up
        code, outcome, _ = clean_once(stack, env)
        assert (code, outcome["cleaned"]) == (0, None)
        # A minute later (aged here in the table, which a new worker reads: the worker
        # decides claims in its memory), another cleaner takes the node over.
        stack.stop_workers()
        with stack.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE nodes SET clean_claimed_until = "
                                 "UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
        stack.start_worker(env=env)

        def cleaned_by_another():
            code, outcome, stderr = clean_once(stack, env)
            assert code == 0, stderr
            return outcome["cleaned"] == "node-1" and outcome
        assert wait_until(cleaned_by_another, 20, "another cleaner to clean node-1",
                          interval=0.2)["state"] == "ready"
        assert nodes(stack) == [("node-1", "ready", None)]

        # The dead cleaner's token is stale: its report is refused and changes nothing.
        with stack.client() as client, pytest.raises(errors.Conflict, match="stale"):
            client.call("clean_done", {"node_id": 1, "claim": token, "ok": False,
                                       "detail": "late"})
        assert nodes(stack) == [("node-1", "ready", None)]
    finally:
        first.kill()
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_clean_requeues_a_ready_or_maintenance_node_by_hand(cleaning):
    stack = cleaning
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("add_baremetal", *node_args(2))
    stack.cli("maintenance", "node-2", "on", "--reason", "replaced a disk")

    assert stack.cli("clean", "node-1").json == {"status": 200, "node": "node-1",
                                                 "state": "dirty"}
    assert stack.cli("clean", "2").json["state"] == "dirty"
    assert nodes(stack) == [("node-1", "dirty", None), ("node-2", "dirty", None)]
    # Dirty is not ready: nothing to allocate until they are clean.
    assert stack.cli("allocate", "job", "1", "--no-wait").json["error"] == "NotEnoughNodes"

    assert clean_once(stack, stack.cleaning_env)[1]["cleaned"] == "node-1"
    assert clean_once(stack, stack.cleaning_env)[1]["cleaned"] == "node-2"
    assert nodes(stack) == [("node-1", "ready", None), ("node-2", "ready", None)]

    stack.cli("allocate", "job", "1")
    refused = stack.cli("clean", "node-1")
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert stack.cli("clean", "node-9").json["status"] == 404


def test_without_a_cleaning_command_nodes_go_straight_to_ready_and_clean_is_refused(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "job", "1")
    running.cli("release", "job")
    assert nodes(running) == [("node-1", "ready", None)]
    refused = running.cli("clean", "node-1")
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert "no cleaning_command" in refused.stderr
    assert nodes(running) == [("node-1", "ready", None)]


def test_only_admins_may_claim_nodes_to_clean(stack, users, tmp_path):
    env = config(tmp_path, script(tmp_path, "clean.sh", "exit 0\n"))
    stack.start_worker(env={**env, "MOLTENIRON_ADMINS": users["admin"]["name"]})
    admin, alice = users["admin"]["env"], users["alice"]["env"]
    stack.cli("add_baremetal", *node_args(1), env=admin)
    stack.cli("clean", "node-1", env=admin)

    code, outcome, stderr = clean_once(stack, {**env, **alice})
    assert code == 1 and outcome["status"] == 403, (outcome, stderr)
    assert stack.sql("SELECT state, clean_claim FROM nodes") == [("dirty", None)]
    refused = stack.cli("clean", "node-1", env=alice)
    assert refused.json["status"] == 403, refused

    code, outcome, _ = clean_once(stack, {**env, **admin})
    assert (code, outcome["state"]) == (0, "ready")


# systemd's default PATH for services: what the command gets from a cleaner without one.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.mark.parametrize("cleaner_path", ["/opt/tools/bin:/usr/bin:/bin", None])
def test_the_command_gets_path_locale_and_its_node_never_the_cleaners_login(
        stack, users, tmp_path, cleaner_path):
    """`cleaning_command: /usr/bin/env` printed the cleaner's admin password to the journal."""
    seen = tmp_path / "seen.env"
    # What execve gave the command (/proc/$$/environ), not what the shell adds (PWD).
    env = config(tmp_path, script(tmp_path, "dump-env.sh", f'cat /proc/$$/environ > "{seen}"\n'))
    admin = users["admin"]
    stack.start_worker(env={**env, "MOLTENIRON_ADMINS": admin["name"]})
    assert stack.cli("add_baremetal", *node_args(1), env=admin["env"]).returncode == 0
    assert stack.cli("clean", "node-1", env=admin["env"]).json["state"] == "dirty"

    # The cleaner as systemd starts it: its login from its EnvironmentFile=, and more.
    login = urlsplit(admin["env"]["MOLTENIRON_AMQP_URL"])
    db_password, token = uuid.uuid4().hex, uuid.uuid4().hex
    secrets = {login.password, db_password, token}
    own = {"MOLTENIRON_CONFIG": env["MOLTENIRON_CONFIG"],
           "MOLTENIRON_AMQP_URL": login._replace(
               netloc=f"{login.username}@{login.hostname}:{login.port}").geturl(),
           "MOLTENIRON_AMQP_PASSWORD": login.password,
           "MOLTENIRON_DB_URL": f"mysql+pymysql://molteniron:{db_password}@127.0.0.1/molteniron",
           "MOLTENIRON_DB_PASSWORD": db_password,
           "MOLTENIRON_NODE_NAME": "not-the-node", "MOLTENIRON_ADMINS": admin["name"],
           "CI_DEPLOY_TOKEN": token, "HOME": str(tmp_path), "USER": "molteniron-cleaner",
           "PYTHONPATH": str(ROOT), "TZ": "UTC", "PWD": str(ROOT),
           "LANG": "C.UTF-8", "LANGUAGE": "en", "LC_TIME": "C", "LC_ALL": "C.UTF-8"}
    if cleaner_path is not None:
        own["PATH"] = cleaner_path
    done = subprocess.run([sys.executable, "-m", "molteniron.clients.cleaner", "--once"],
                          env=own, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["state"] == "ready", done

    dumped = seen.read_bytes().decode()
    got = dict(entry.split("=", 1) for entry in dumped.split("\0") if entry)
    assert set(got) == {"PATH", "LANG", "LANGUAGE", "LC_TIME", "LC_ALL", *NODE_ENV}
    assert got["PATH"] == (cleaner_path or SYSTEMD_PATH)
    assert (got["LANG"], got["LANGUAGE"], got["LC_TIME"], got["LC_ALL"]) == (
        "C.UTF-8", "en", "C", "C.UTF-8")
    assert (got["MOLTENIRON_NODE_NAME"], got["MOLTENIRON_IPMI_PASSWORD"]) == ("node-1", "secret-1")
    # Neither in what the command saw nor in what goes to the journal.
    for secret in secrets:
        assert secret not in dumped and secret not in done.stderr + done.stdout


# --- a cleaning claim is respected -------------------------------------------------

@pytest.fixture
def mid_cleaning(stack, tmp_path):
    """node-1 dirty, and a cleaner (--once) whose command runs until `finish` exists."""
    started, finish = tmp_path / "started", tmp_path / "finish"
    command = script(tmp_path, "wipe.sh",
                     f'touch "{started}"\n'
                     f'for i in $(seq 600); do [ -e "{finish}" ] && exit 0; sleep 0.1; done\n'
                     'exit 1\n')
    env = config(tmp_path, command)
    dirty_node(stack, env)
    running = cleaner(stack, env, "--once", "--name", "wiper")
    wait_until(started.exists, 20, "the cleaning command to start")
    stack.finish, stack.running_cleaner = finish, running
    yield stack
    finish.touch()
    running.kill()
    running.communicate()


def test_a_node_being_cleaned_is_not_made_ready_unless_forced(mid_cleaning, tmp_path):
    stack = mid_cleaning
    refused = stack.cli("set_field", "1", "status", "ready")
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert "being cleaned by wiper" in refused.json["message"]

    export = tmp_path / "pool.yaml"
    assert stack.cli("export", "-o", str(export)).returncode == 0
    export.write_text(export.read_text().replace("state: dirty", "state: ready"))
    assert "state: ready" in export.read_text()
    assert stack.cli("import", str(export)).returncode == 0
    assert nodes(stack) == [("node-1", "dirty", None)]  # import leaves a dirty node dirty

    assert stack.cli("maintenance", "node-1", "on", "--reason", "look").returncode == 0
    refused = stack.cli("maintenance", "node-1", "off")
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert nodes(stack) == [("node-1", "maintenance", "look")]
    assert stack.cli("maintenance", "node-1", "off", "--force").returncode == 0
    assert stack.sql("SELECT state, clean_claim FROM nodes") == [("ready", None)]

    # The cleaner's report is stale now: refused, logged, and the cleaner carries on.
    stack.finish.touch()
    stdout, stderr = stack.running_cleaner.communicate(timeout=60)
    assert stack.running_cleaner.returncode == 0, stderr
    outcome = json.loads(stdout.strip().splitlines()[-1])
    assert outcome["status"] == 409 and outcome["stale"] is True, outcome
    assert "event=stale_claim" in stderr
    assert stack.sql("SELECT state FROM nodes") == [("ready",)]


def test_set_field_forced_drops_the_claim(mid_cleaning):
    stack = mid_cleaning
    assert stack.cli("set_field", "1", "status", "ready", "--force").returncode == 0
    assert stack.sql("SELECT state, clean_claim FROM nodes") == [("ready", None)]


def test_a_cleaner_stopped_with_sigterm_gives_its_claim_back(mid_cleaning, tmp_path):
    stack = mid_cleaning
    assert stack.sql("SELECT clean_claim IS NOT NULL FROM nodes") == [(1,)]
    stack.running_cleaner.send_signal(signal.SIGTERM)
    _, stderr = stack.running_cleaner.communicate(timeout=30)
    assert stack.running_cleaner.returncode == 130, stderr
    assert stack.sql("SELECT state, clean_claim FROM nodes") == [("dirty", None)]
    assert "event=claim_given_back" in stderr
