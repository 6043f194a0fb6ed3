"""A running job keeps its nodes; a job that lost them fails.

keep_lease.sh renews the lease while the job step runs; `release` (and the post-hook)
tell an owner that never had nodes (404, exit 1 / hook 0) from one whose nodes were
taken back (410 NodesTakenBack, exit 5), so the build goes red."""

from __future__ import annotations

import subprocess
import sys
from datetime import timezone

from tests.jobs import HOOKS, job_env, run_hook
from tests.stack import node_args, wait_until


def expired(stack, owner: str) -> bool:
    return bool(stack.sql(f"SELECT id FROM allocations WHERE owner = '{owner}' "
                          "AND end_reason = 'expired'"))


def test_release_after_the_lease_expired_says_the_nodes_were_taken_back(running):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "job", "1", "--lease", "1").returncode == 0
    wait_until(lambda: expired(running, "job"), 20, "the lease to expire")

    for command in ("release", "renew"):
        lost = running.cli(command, "job")
        assert lost.returncode == 5, lost
        assert lost.json["status"] == 410 and lost.json["error"] == "NodesTakenBack", lost
        assert [n["node"] for n in lost.json["taken_back"]] == ["node-1"]
        assert lost.json["taken_back"][0]["reason"] == "expired"
        assert "lease expired" in lost.stderr
    never = running.cli("release", "nobody")
    assert never.returncode == 1 and never.json["status"] == 404, never


def test_release_after_an_admin_removed_the_node_says_so(running):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "job", "1").returncode == 0
    assert running.cli("remove", "node-1", "--force").returncode == 0
    lost = running.cli("release", "job")
    assert lost.returncode == 5 and lost.json["taken_back"][0]["reason"] == "removed", lost


def test_a_released_owner_released_again_is_not_taken_back(running):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "job", "1").returncode == 0
    assert running.cli("release", "job").returncode == 0
    again = running.cli("release", "job")
    assert again.returncode == 1 and again.json["status"] == 404, again


def test_the_post_hook_fails_the_build_when_the_nodes_were_taken_back(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    assert run_hook(running, tmp_path, "pre_hook.sh", "1", MOLTENIRON_LEASE="1").returncode == 0
    wait_until(lambda: expired(running, "job"), 20, "the lease to expire")
    done = run_hook(running, tmp_path, "post_hook.sh")
    assert done.returncode == 5, done
    assert "taken back" in done.stderr
    assert run_hook(running, tmp_path, "post_hook.sh", MOLTENIRON_OWNER="never").returncode == 0


def test_keep_lease_keeps_a_running_job_s_nodes_past_its_first_lease(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    assert run_hook(running, tmp_path, "pre_hook.sh", "1", MOLTENIRON_LEASE="3").returncode == 0
    (first_end,) = running.sql("SELECT lease_expires_at FROM nodes")[0]
    # The job step: busy until well past the lease it was first given.
    step = ("import time\n"
            "while time.time() < float(__import__('sys').argv[1]): time.sleep(0.2)\n")
    until = first_end.replace(tzinfo=timezone.utc).timestamp() + 4
    done = run_hook(running, tmp_path, "keep_lease.sh", sys.executable, "-c", step, str(until),
                    MOLTENIRON_LEASE="3", MOLTENIRON_RENEW_EVERY="1")
    assert done.returncode == 0, done
    assert running.sql("SELECT owner FROM nodes") == [("job",)]
    assert not expired(running, "job")
    assert run_hook(running, tmp_path, "post_hook.sh").returncode == 0


def test_keep_lease_stops_the_step_and_fails_when_the_nodes_are_taken(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    assert run_hook(running, tmp_path, "pre_hook.sh", "1").returncode == 0
    job = subprocess.Popen(
        ["bash", str(HOOKS / "keep_lease.sh"), sys.executable, "-c",
         "import time\nwhile True: time.sleep(0.2)\n"],
        cwd=tmp_path, env=job_env(running, tmp_path, MOLTENIRON_RENEW_EVERY="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert running.cli("remove", "node-1", "--force").returncode == 0
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 5, stderr
    assert "taken back" in stderr


def test_an_expired_node_goes_through_cleaning_not_to_the_next_job(stack, tmp_path):
    config = tmp_path / "worker.yaml"
    config.write_text("cleaning_command: /bin/true\n")
    stack.start_worker(env={"MOLTENIRON_CONFIG": str(config)})
    stack.cli("add_baremetal", *node_args(1))
    assert stack.cli("allocate", "job", "1", "--lease", "1").returncode == 0
    waiting = stack.cli_start("allocate", "next", "1", "--wait", "30")
    wait_until(lambda: expired(stack, "job"), 20, "the lease to expire")
    assert stack.sql("SELECT state, owner FROM nodes") == [("dirty", None)]
    assert stack.sql("SELECT owner FROM waiting_requests") == [("next",)]
    waiting.process.terminate()
    waiting.result()
