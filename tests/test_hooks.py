"""The Jenkins hooks and the examples that wire them, run as a CI job runs them.

pre_hook.sh writes the nodes' facts into the workspace, post_hook.sh gives the
nodes back on every way out; examples/jenkins/ shows three ways to wire them;
docs/migrating.md's way in for an original database of the first releases.
The outage behaviour of post_hook.sh (no worker) is in test_outage.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from tests.jobs import (
    EXAMPLES,
    HOOKS,
    group_alive,
    job_env,
    kill_group,
    leftovers,
    run_hook,
    start_job_step,
)
from tests.jobs import PRE_HOOK_FILES as FILES
from tests.stack import ROOT, node_args, wait_until

# The bound a signal's effect is held to where it used to wait for the allocate to return
# (MOLTENIRON_WAIT, 600 s in these tests): what is claimed is 2 s, what is measured is printed.
# 5 s was once missed with the suite in 4 processes on 2 loaded cores.
PROMPTLY = 15.0
# Every result a Jenkins build can end with: the post-hook must run on each.
BUILD_RESULTS = {"SUCCESS", "UNSTABLE", "FAILURE", "NOT_BUILT", "ABORTED"}


def held(stack) -> dict[str, str | None]:
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def add_node(stack, name: str, ipmi_ip: str, ips: str, mac: str, arch: str, cpus: int,
             ram_mb: int, disk_gb: int, user: str = "admin", password: str = "pw") -> None:
    added = stack.cli("add_baremetal", name, ipmi_ip, user, password, ips, mac, arch,
                      str(cpus), str(ram_mb), str(disk_gb))
    assert added.returncode == 0, added


# --- pre_hook.sh ---------------------------------------------------------------

def test_pre_hook_writes_the_reply_hardware_info_and_localrc_readable_only_by_its_user(
        running, tmp_path):
    add_node(running, "node-1", "10.0.0.1", "10.1.1.1,10.1.1.2,10.1.1.3", "aa:bb:cc:dd:ee:01",
             "ppc64el", 8, 2048, 32, user="user", password="s3cret")
    for name in FILES:  # left over from an earlier build, readable by all
        (tmp_path / name).write_text("left over\n")
        (tmp_path / name).chmod(0o644)

    result = run_hook(running, tmp_path, "pre_hook.sh", "1")

    assert result.returncode == 0, result
    assert {name: mode(tmp_path / name) for name in FILES} == dict.fromkeys(FILES, 0o600)
    reply = json.loads((tmp_path / "molteniron-nodes.json").read_text())
    assert reply["status"] == 200 and [n["name"] for n in reply["nodes"].values()] == ["node-1"]
    assert (tmp_path / "hardware_info").read_text() == "10.0.0.1 aa:bb:cc:dd:ee:01 user s3cret\n"
    assert (tmp_path / "localrc").read_text() == (
        "IRONIC_HW_ARCH=ppc64el\n"
        "IRONIC_HW_NODE_CPU=8\n"
        "IRONIC_HW_NODE_RAM=2048\n"
        "IRONIC_HW_NODE_DISK=32\n"
        'ALLOCATION_POOL="start=10.1.1.1,end=10.1.1.1 --allocation-pool start=10.1.1.2,'
        'end=10.1.1.2 --allocation-pool start=10.1.1.3,end=10.1.1.3"\n')
    assert held(running) == {"node-1": "job"}
    assert "s3cret" not in result.stdout + result.stderr
    assert leftovers(tmp_path) == sorted(FILES)  # written aside, renamed: nothing else stays


def test_localrc_is_what_devstack_reads_when_it_sources_it(running, tmp_path):
    add_node(running, "node-1", "10.0.0.1", "10.1.1.1,10.1.1.2", "aa:bb:cc:dd:ee:01",
             "x86_64", 4, 8192, 100)
    assert run_hook(running, tmp_path, "pre_hook.sh").returncode == 0

    sourced = subprocess.run(
        ["bash", "-c", '. ./localrc && printf "%s|%s|%s|%s|%s" "$IRONIC_HW_ARCH" '
         '"$IRONIC_HW_NODE_CPU" "$IRONIC_HW_NODE_RAM" "$IRONIC_HW_NODE_DISK" "$ALLOCATION_POOL"'],
        cwd=tmp_path, capture_output=True, text=True, timeout=10)
    assert sourced.stdout == ("x86_64|4|8192|100|start=10.1.1.1,end=10.1.1.1 "
                              "--allocation-pool start=10.1.1.2,end=10.1.1.2")


def test_pre_hook_with_several_nodes_lists_each_and_sizes_localrc_for_the_smallest(
        running, tmp_path):
    add_node(running, "big", "10.0.0.1", "10.1.1.1", "aa:bb:cc:dd:ee:01", "x86_64", 32, 65536, 100,
             password="pw-1")
    add_node(running, "small", "10.0.0.2", "10.1.2.1,10.1.2.2", "aa:bb:cc:dd:ee:02", "x86_64",
             8, 131072, 50, password="pw-2")

    result = run_hook(running, tmp_path, "pre_hook.sh", "2")

    assert result.returncode == 0, result
    assert (tmp_path / "hardware_info").read_text() == (
        "10.0.0.1 aa:bb:cc:dd:ee:01 admin pw-1\n"
        "10.0.0.2 aa:bb:cc:dd:ee:02 admin pw-2\n")
    assert (tmp_path / "localrc").read_text() == (
        "IRONIC_HW_ARCH=x86_64\n"
        "IRONIC_HW_NODE_CPU=8\n"
        "IRONIC_HW_NODE_RAM=65536\n"
        "IRONIC_HW_NODE_DISK=50\n"
        'ALLOCATION_POOL="start=10.1.1.1,end=10.1.1.1 --allocation-pool start=10.1.2.1,'
        'end=10.1.2.1 --allocation-pool start=10.1.2.2,end=10.1.2.2"\n')
    assert held(running) == {"big": "job", "small": "job"}


def test_pre_hook_without_nodes_in_time_fails_and_leaves_no_stale_facts(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "other-job", "1").returncode == 0
    for name in FILES:
        (tmp_path / name).write_text("from the last build\n")

    result = run_hook(running, tmp_path, "pre_hook.sh", "1", MOLTENIRON_WAIT="1")

    assert result.returncode == 3, result  # the deadline passed without nodes
    assert leftovers(tmp_path) == []  # not even the 408 reply
    assert held(running) == {"node-1": "other-job"}
    assert running.sql("SELECT COUNT(*) FROM waiting_requests") == [(0,)]


def test_a_pre_hook_without_a_worker_leaves_none_of_its_files(stack, tmp_path):
    stack.start_worker()  # the queues exist; then nobody consumes them
    stack.stop_workers()
    for name in FILES:
        (tmp_path / name).write_text("from the last build\n")

    result = run_hook(stack, tmp_path, "pre_hook.sh")

    assert result.returncode == 4, result
    assert "no MoltenIron worker is consuming" in result.stderr
    assert leftovers(tmp_path) == []  # the 503 reply went to stderr's message, not to a file


def waiting_owners(stack) -> list[str]:
    return [row[0] for row in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def wait_for_the_step_to_wait(stack, step: subprocess.Popen) -> None:
    def waits() -> bool:
        assert step.poll() is None, step.communicate()
        return waiting_owners(stack) == ["job"]
    wait_until(waits, 60, "the job's allocate to wait", interval=0.1)


def cancelled_within(stack, step: subprocess.Popen, signalled: float) -> float:
    """Seconds from `signalled` until the job's waiting allocate is gone (PROMPTLY at most)."""
    wait_until(lambda: waiting_owners(stack) == [], PROMPTLY,
               "the waiting allocate to be cancelled", interval=0.02)
    return time.monotonic() - signalled


def interrupt_while_waiting(stack, step: subprocess.Popen, send) -> tuple[float, float, tuple]:
    """Once the step's allocate waits, send(step) a signal: (seconds until the allocate
    was gone, seconds until the step exited, its output). Its process group goes after."""
    try:
        wait_for_the_step_to_wait(stack, step)
        signalled = time.monotonic()
        send(step)
        took = cancelled_within(stack, step, signalled)
        output = step.communicate(timeout=PROMPTLY)
        return took, time.monotonic() - signalled, output
    finally:
        kill_group(step)


@pytest.mark.parametrize("signum, to_whom", [
    (signal.SIGTERM, "the pre-hook alone"),  # a CI system aborting the step, by its pid
    (signal.SIGINT, "its process group"),  # Ctrl-C at a terminal
])
def test_an_interrupted_pre_hook_cancels_its_allocate_and_leaves_none_of_its_files(
        running, tmp_path, signum, to_whom):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "other-job", "1").returncode == 0
    step = start_job_step(running, tmp_path, HOOKS / "pre_hook.sh", MOLTENIRON_WAIT="600")
    took, exited, output = interrupt_while_waiting(
        running, step, (lambda p: p.send_signal(signum)) if to_whom == "the pre-hook alone"
        else (lambda p: os.killpg(p.pid, signum)))
    print(f"\n{signal.Signals(signum).name} to {to_whom}: allocate cancelled after "
          f"{took:.2f}s, pre-hook exited after {exited:.2f}s")
    assert step.returncode == 130, output
    assert leftovers(tmp_path) == [], output  # not even an empty molteniron-nodes.json
    assert not group_alive(step)  # the molteniron process went with it
    assert held(running) == {"node-1": "other-job"}
    assert running.sql("SELECT COUNT(*) FROM allocations WHERE owner='job'") == [(0,)]


def test_pre_hook_says_when_each_lease_ends(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    result = run_hook(running, tmp_path, "pre_hook.sh", "1")
    assert result.returncode == 0, result
    leased = r"node-1 is leased to job until \d{4}-\d\d-\d\dT\d\d:\d\d"
    assert re.search(leased, result.stderr), result


def test_the_hooks_name_the_owner_after_the_jenkins_build(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    env = job_env(running, tmp_path, BUILD_TAG="jenkins-ironic-tempest-42")
    del env["MOLTENIRON_OWNER"]

    def hook(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(HOOKS / name)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    assert hook("pre_hook.sh").returncode == 0
    assert held(running) == {"node-1": "jenkins-ironic-tempest-42"}
    assert hook("post_hook.sh").returncode == 0
    assert held(running) == {"node-1": None}

    del env["BUILD_TAG"]  # neither Jenkins nor an owner: nothing to go by
    for name in ("pre_hook.sh", "post_hook.sh"):
        outside = hook(name)
        assert outside.returncode != 0 and "set MOLTENIRON_OWNER" in outside.stderr, outside


# --- post_hook.sh --------------------------------------------------------------

def test_post_hook_releases_and_a_second_run_passes_with_nothing_held(running, tmp_path):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    assert run_hook(running, tmp_path, "pre_hook.sh", "2").returncode == 0
    assert held(running) == {"node-1": "job", "node-2": "job"}

    first = run_hook(running, tmp_path, "post_hook.sh")
    assert first.returncode == 0, first
    assert held(running) == {"node-1": None, "node-2": None}

    again = run_hook(running, tmp_path, "post_hook.sh")
    assert again.returncode == 0, again
    assert held(running) == {"node-1": None, "node-2": None}


def test_post_hook_passes_for_a_build_that_never_got_nodes(running, tmp_path):
    result = run_hook(running, tmp_path, "post_hook.sh", MOLTENIRON_OWNER="never-allocated")
    assert result.returncode == 0, result


def test_post_hook_fails_when_the_release_is_refused(running, tmp_path):
    result = run_hook(running, tmp_path, "post_hook.sh", MOLTENIRON_OWNER="x" * 300)
    assert result.returncode == 2, result  # an owner name longer than any column


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def test_post_hook_does_not_retry_a_login_the_broker_refused(running, tmp_path):
    """A wrong password stays wrong: retrying it for MOLTENIRON_RELEASE_RETRY helps nobody."""
    running.cli("add_baremetal", *node_args(1))
    assert run_hook(running, tmp_path, "pre_hook.sh").returncode == 0

    started = time.monotonic()
    result = run_hook(running, tmp_path, "post_hook.sh", MOLTENIRON_RELEASE_RETRY="60",
                      MOLTENIRON_AMQP_URL=with_password(running.amqp_url, "not-the-password"))
    took = time.monotonic() - started

    assert result.returncode == 2, result
    assert "refused the login of user 'guest'" in result.stderr, result
    assert took < PROMPTLY, took  # one try (about 0.1 s), where it used to retry for 60 s
    assert held(running) == {"node-1": "job"}  # nothing was released, nothing is queued
    assert run_hook(running, tmp_path, "post_hook.sh").returncode == 0
    assert held(running) == {"node-1": None}


# --- examples/jenkins ----------------------------------------------------------

def hook_paths(text: str) -> set[str]:
    """The hook scripts a job definition runs, by file name."""
    return set(re.findall(r"\b(pre_hook\.sh|post_hook\.sh)\b", text))


def test_the_jjb_job_allocates_first_and_releases_on_every_result():
    (entry,) = yaml.safe_load((EXAMPLES / "jjb-job.yaml").read_text())
    job = entry["job"]
    shells = [step["shell"] for step in job["builders"]]
    assert hook_paths(shells[0]) == {"pre_hook.sh"}  # before the job's own work
    assert all("post_hook.sh" not in shell for shell in shells)

    (publisher,) = [p["postbuildscript"] for p in job["publishers"] if "postbuildscript" in p]
    (post,) = publisher["builders"]
    assert set(post["build-on"]) == BUILD_RESULTS
    assert [hook_paths(step["shell"]) for step in post["build-steps"]] == [{"post_hook.sh"}]
    for name in ("pre_hook.sh", "post_hook.sh"):
        assert os.access(HOOKS / name, os.X_OK), name


def test_jenkins_job_builder_renders_the_jjb_job(tmp_path):
    # jenkins-job-builder is in the test extra: installed beside this python.
    jenkins_jobs = Path(sys.executable).parent / "jenkins-jobs"
    assert jenkins_jobs.exists(), "pip install -e '.[test]' installs jenkins-job-builder"
    done = subprocess.run([str(jenkins_jobs), "test", "-o", str(tmp_path),
                           str(EXAMPLES / "jjb-job.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    xml = (tmp_path / "ironic-baremetal-tempest").read_text()
    assert "org.jenkinsci.plugins.postbuildscript.PostBuildScript" in xml
    assert "<string>ABORTED</string>" in xml and "post_hook.sh" in xml


def block(text: str, opening: str) -> str:
    """The body of the first `opening {` block in Groovy-like text, braces matched."""
    start = re.search(opening + r"\s*\{", text)
    assert start, f"no `{opening} {{` block"
    depth, i = 1, start.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start.end():i - 1]


def test_the_jenkinsfile_allocates_in_a_stage_and_releases_in_post_always():
    text = (EXAMPLES / "Jenkinsfile").read_text()
    pipeline = block(text, r"(?m)^pipeline")
    assert hook_paths(block(pipeline, r"\bstages")) == {"pre_hook.sh"}
    post = block(pipeline, r"\bpost")
    assert hook_paths(block(post, r"\balways")) == {"post_hook.sh"}
    assert "credentials('" in block(pipeline, r"\benvironment")  # the password: not in the file


# --- examples/jenkins/pipeline.sh, run for real ----------------------------------------

def run_pipeline(stack, workspace: Path, *job: str, **env: str) -> subprocess.Popen:
    return start_job_step(stack, workspace, EXAMPLES / "pipeline.sh", *job,
                          **{"MOLTENIRON_COUNT": "2", **env})


# The fake job: proves it ran between the hooks, with the nodes' facts in its workspace.
JOB = ("bash", "-c", 'grep -c . hardware_info > lines-seen && grep -q ^ALLOCATION_POOL= localrc '
                     '&& exit "${JOB_EXIT:-0}"')


@pytest.mark.parametrize("job_exit", [0, 3])
def test_the_shell_pipeline_gives_the_nodes_back_whether_the_job_passes_or_fails(
        running, tmp_path, job_exit):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    process = run_pipeline(running, tmp_path, *JOB, JOB_EXIT=str(job_exit))
    output = process.communicate(timeout=120)
    assert process.returncode == job_exit, output  # the job step's own exit code
    assert (tmp_path / "lines-seen").read_text() == "2\n", output  # it saw both nodes
    assert held(running) == {"node-1": None, "node-2": None}, output
    assert running.sql("SELECT COUNT(*) FROM allocations WHERE ended_at IS NULL") == [(0,)]


def test_the_shell_pipeline_gives_the_nodes_back_when_the_build_is_aborted(running, tmp_path):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    process = run_pipeline(running, tmp_path, "bash", "-c", "touch started; sleep 600")
    try:
        wait_until(lambda: (tmp_path / "started").exists(), 60, "the job step to start",
                   interval=0.1)
        assert held(running) == {"node-1": "job", "node-2": "job"}
        os.killpg(process.pid, signal.SIGTERM)  # what a CI system does to abort a build
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143
    assert held(running) == {"node-1": None, "node-2": None}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_pipeline_alone_cancels_its_waiting_allocate_at_once(
        running, tmp_path, signum, code):
    """Not to its process group: `kill PID` of the script, as a supervisor that knows only
    the pid does. The waiting allocate is cancelled, then the post-hook runs, nothing stays."""
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "other-job", "1").returncode == 0
    step = start_job_step(running, tmp_path, EXAMPLES / "pipeline.sh", "touch", "ran",
                          MOLTENIRON_WAIT="600")
    took, exited, output = interrupt_while_waiting(running, step,
                                                   lambda p: p.send_signal(signum))
    print(f"\n{signal.Signals(signum).name} to pipeline.sh alone: allocate cancelled after "
          f"{took:.2f}s, pipeline exited (post-hook included) after {exited:.2f}s")
    assert step.returncode == code, output
    assert not (tmp_path / "ran").exists()
    assert leftovers(tmp_path) == [], output
    assert not group_alive(step)  # no pre-hook, no molteniron process left behind
    assert held(running) == {"node-1": "other-job"}
    assert running.sql("SELECT COUNT(*) FROM allocations WHERE owner='job'") == [(0,)]


def test_the_shell_pipeline_releases_nothing_it_did_not_get(running, tmp_path):
    """No nodes in time: the job step never runs, the pipeline fails, the other job keeps its
    node."""
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "other-job", "1").returncode == 0
    process = run_pipeline(running, tmp_path, "touch", "ran", MOLTENIRON_COUNT="1",
                           MOLTENIRON_WAIT="1")
    process.communicate(timeout=120)
    assert process.returncode == 3
    assert not (tmp_path / "ran").exists()
    assert held(running) == {"node-1": "other-job"}


# --- docs/migrating.md: an original database of the first releases ---------------

def test_the_documented_view_imports_an_original_database_without_a_blob_column(running):
    """The first releases kept hardware fields in columns: the guide's view makes them
    importable."""
    from sqlalchemy import create_engine, make_url, text

    from tests.conftest import TEST_DB_URL
    guide = (ROOT / "docs" / "migrating.md").read_text()
    (view_sql,) = re.findall(r"<<'SQL'\n(.*?)\nSQL\n", guide, re.S)
    suffix = uuid.uuid4().hex[:8]
    old, blob = f"molteniron_old_{suffix}", f"molteniron_blob_{suffix}"
    server = create_engine(make_url(TEST_DB_URL).set(database=""))
    try:
        with server.begin() as conn:
            conn.execute(text(f"CREATE DATABASE `{old}`"))
            conn.execute(text(
                f"CREATE TABLE `{old}`.Nodes (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(50), "
                "ipmi_ip VARCHAR(50), ipmi_user VARCHAR(50), ipmi_password VARCHAR(50), "
                "port_hwaddr VARCHAR(50), cpu_arch VARCHAR(50), cpus INT, ram_mb INT, disk_gb INT, "
                "status VARCHAR(20), provisioned VARCHAR(50), timestamp TIMESTAMP NULL)"))
            conn.execute(text(f"CREATE TABLE `{old}`.IPs (id INT AUTO_INCREMENT PRIMARY KEY, "
                              "node_id INT, ip VARCHAR(50))"))
            conn.execute(text(
                f"INSERT INTO `{old}`.Nodes VALUES (7, 'old-1', '10.228.0.41', 'ADMIN', 'pw-41', "
                "'52:54:00:00:00:41', 'ppc64el', 16, 32000, 300, 'dirty', 'old-job', NOW())"))
            conn.execute(text(f"INSERT INTO `{old}`.IPs (node_id, ip) VALUES (7, '10.228.1.41'), "
                              "(7, '10.228.1.42')"))
            for statement in view_sql.replace("MoltenIronOld", old).replace(
                    "MoltenIronBlob", blob).split(";"):
                if statement.strip():
                    conn.execute(text(statement))

        def url(database: str) -> str:
            return make_url(TEST_DB_URL).set(database=database).render_as_string(
                hide_password=False)

        refused = running.cli("import", "--from-original", url(old))
        assert refused.returncode == 2 and "Unknown column 'blob'" in refused.stderr, refused
        imported = running.cli("import", "--from-original", url(blob))
        assert imported.returncode == 0, imported
        (node,) = running.cli("status", "-t", "json", "--show-secrets").json["result"]
        assert {k: node[k] for k in ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "port_hwaddr",
                                     "cpu_arch", "cpus", "ram_mb", "disk_gb", "allocation_pool",
                                     "node_pool", "status", "provisioned")} == {
            "name": "old-1", "ipmi_ip": "10.228.0.41", "ipmi_user": "ADMIN",
            "ipmi_password": "pw-41", "port_hwaddr": "52:54:00:00:00:41", "cpu_arch": "ppc64el",
            "cpus": 16, "ram_mb": 32000, "disk_gb": 300,
            "allocation_pool": ["10.228.1.41", "10.228.1.42"], "node_pool": "default",
            "status": "ready", "provisioned": None}
    finally:
        with server.begin() as conn:
            for database in (blob, old):
                conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
        server.dispose()
