"""Constraints: only nodes matching everything a job asks for, all or nothing, in a fair order."""

from __future__ import annotations

from tests.stack import wait_until


def add(stack, i, arch="x86_64", cpus=8, ram=16384, disk=200, tags=None, pool="default"):
    args = [f"node-{i}", f"10.0.0.{i}", "admin", f"secret-{i}", f"10.1.{i}.1",
            f"aa:bb:cc:dd:ee:{i:02x}", arch, str(cpus), str(ram), str(disk), pool]
    if tags:
        args += ["--tags", tags]
    result = stack.cli("add_baremetal", *args)
    assert result.returncode == 0, result


def names(result):
    return sorted(n["name"] for n in result.json["nodes"].values())


def waiting_owners(stack):
    return [r[0] for r in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def test_only_nodes_that_match_every_constraint_are_given(running):
    add(running, 1, tags="gpu")
    add(running, 2, arch="aarch64", cpus=16)
    add(running, 3, cpus=32, ram=65536, disk=1000, tags="gpu,fast")

    assert names(running.cli("allocate", "a", "1", "--arch", "aarch64")) == ["node-2"]
    assert names(running.cli("allocate", "b", "1", "--min-cpus", "16", "--arch", "x86_64",
                             "--min-ram-mb", "32768", "--min-disk-gb", "500")) == ["node-3"]
    running.cli("release", "b")
    assert names(running.cli("allocate", "c", "1", "--tag", "gpu", "--tag", "fast")) == [
        "node-3"]
    assert names(running.cli("allocate", "d", "1", "--tag", "gpu")) == ["node-1"]
    assert running.sql("SELECT tags FROM nodes WHERE name = 'node-3'") == [('["fast", "gpu"]',)]


def test_all_or_nothing_and_a_request_no_node_could_ever_meet_is_409_at_once(running):
    add(running, 1, tags="gpu")
    add(running, 2)

    never = running.cli("allocate", "a", "1", "--arch", "riscv64", "--wait", "600")
    assert never.returncode == 1 and never.json["error"] == "PoolTooSmall", never
    assert "arch riscv64" in never.json["message"]
    too_many = running.cli("allocate", "a", "2", "--tag", "gpu", "--wait", "600")
    assert too_many.returncode == 1 and too_many.json["status"] == 409, too_many
    not_now = running.cli("allocate", "a", "2", "--no-wait")
    assert not_now.returncode == 0  # both nodes: no constraint
    assert running.sql("SELECT COUNT(*) FROM waiting_requests") == [(0,)]


def test_a_waiter_blocks_only_the_nodes_it_could_use(running):
    """gpu-job waits for 2 gpu nodes (1 is ready): it keeps that one from later jobs,
    but a later job that needs any node gets the plain one at once, and a later job
    that also needs a gpu node waits behind gpu-job (FIFO among competitors)."""
    add(running, 1, tags="gpu")
    add(running, 2, tags="gpu")
    add(running, 3)
    add(running, 4)
    assert running.cli("allocate", "holder", "1", "--tag", "gpu").returncode == 0  # node-1
    gpu_job = running.cli_start("allocate", "gpu-job", "2", "--tag", "gpu", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["gpu-job"], 15, "gpu-job to wait")

    later_any = running.cli("allocate", "later-any", "1", "--no-wait")
    assert later_any.returncode == 0, later_any
    assert names(later_any) == ["node-3"]  # not node-2, the lowest: gpu-job could use it
    later_gpu = running.cli_start("allocate", "later-gpu", "1", "--tag", "gpu", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["gpu-job", "later-gpu"], 15,
               "later-gpu to wait behind gpu-job")

    running.cli("release", "holder")  # node-1 back: gpu-job now gets both gpu nodes

    served = gpu_job.result(timeout=30)
    assert served.returncode == 0 and names(served) == ["node-1", "node-2"], served
    assert waiting_owners(running) == ["later-gpu"]
    running.cli("release", "gpu-job")
    assert later_gpu.result(timeout=30).returncode == 0
