"""Short variants of the reliability suites (bench/soak.py, bench/faults.py).

The full runs: python -m bench.soak, python -m bench.faults (see README).
"""

from __future__ import annotations

from bench import faults, soak
from bench.private import shared_service_pids


def test_soak_many_clients_random_operations_keep_every_invariant():
    result = soak.run(clients=30, seconds=8, nodes=12, seed=11)
    assert result["problems"] == []
    assert result["by_outcome"].get("allocate:ok", 0) > 0
    assert result["by_outcome"].get("release:ok", 0) > 0


def test_killed_workers_and_restarted_broker_and_database_lose_nothing():
    shared = shared_service_pids()  # the restarts are of private instances (bench/private.py)
    result = faults.run(kills=3, broker_restarts=1, db_restarts=1, clients=20, nodes=10)
    assert result["problems"] == []
    assert result["recovery_s"]["worker_kill"]["count"] == 3
    assert result["by_outcome"].get("allocate:ok", 0) > 0
    assert shared_service_pids() == shared
