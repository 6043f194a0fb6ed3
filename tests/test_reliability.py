"""Short variants of the reliability suites (bench/soak.py, bench/faults.py).

The full runs: python -m bench.soak, python -m bench.faults (see README).
"""

from __future__ import annotations

from bench import faults, soak
from bench.private import shared_service_pids
from tests.keeper import add_node, allocate, commit, commit_from, sql


def test_soak_many_clients_random_operations_keep_every_invariant():
    result = soak.run(clients=30, seconds=8, nodes=12, seed=11)
    assert result["problems"] == [], "\n".join(result["problems"])  # all of them in the log
    assert result["by_outcome"].get("allocate:ok", 0) > 0
    assert result["by_outcome"].get("release:ok", 0) > 0


def test_killed_workers_and_restarted_broker_and_database_lose_nothing():
    shared = shared_service_pids()  # the restarts are of private instances (bench/private.py)
    result = faults.run(kills=3, broker_restarts=1, db_restarts=1, clients=20, nodes=10,
                        db_read_only=1, clock_jumps=1)
    assert result["problems"] == [], "\n".join(result["problems"])
    assert result["recovery_s"]["worker_kill"]["count"] == 3
    assert result["recovery_s"]["clock_jump"]["count"] == 1
    assert result["recovery_s"]["db_read_only"]["count"] == 1
    assert result["by_outcome"].get("allocate:ok", 0) > 0
    assert shared_service_pids() == shared


def test_the_clients_check_accepts_a_grant_served_again_after_its_first_bounced(keeper):
    """A broker restart cut an allocate's reply queue: its grant came back and was undone
    (client_gone), and the copy the client sent from its new queue was served afresh. The
    client saw only that second grant; the fault suite must not call it a problem."""
    class History:  # what check_clients reads: the keeper's database
        def sql(self, query):
            return sql(keeper, query)
    add_node(keeper, "n1")
    first, _ = allocate(keeper, "job", 1)
    commit(keeper, settled={first.id: "undo"})  # its reply queue died with the broker
    other, _ = allocate(keeper, "other", 1)  # n1 went to another job meanwhile
    add_node(keeper, "n2")
    (again,) = commit_from(keeper, first, "new-queue").replies
    assert [n["name"] for n in again.reply["nodes"].values()] == ["n2"]

    def saw(nodes):
        return [soak.Outcome("job", "allocate", first.id, 0, 0, "ok", nodes),
                soak.Outcome("other", "allocate", other.id, 0, 0, "ok", ["n1"])]

    assert soak.check_clients(History(), saw(["n2"])) == []
    # Had the client got the grant that bounced, that would be a problem.
    assert soak.check_clients(History(), saw(["n1"])) != []
