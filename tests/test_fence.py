"""The fence's signal is checked before it is relied on (workers/fence.py).

The fence in the write trip stops a batch by writing NULL into worker_meta.epoch, a
NOT NULL column: only a strict session refuses that. On a session that is not strict
the write passes (epoch 0, a warning), so the worker checks at start, and the keeper
before its first batch, that the fence really trips; a worker refuses to start if not.
Sessions that are not strict are made here against the test run's own MariaDB database.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event

from molteniron import errors
from molteniron.workers.keeper import PoolKeeper
from tests.test_keeper import add_node, commit, keeper, owners, request, sql  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def lax_sessions(engine) -> None:
    """Every new session of engine ends up with sql_mode '' (after the keeper's own
    connect hooks): a NULL written to a NOT NULL column becomes 0 with a warning."""
    @event.listens_for(engine, "connect")
    def lax(dbapi_connection, connection_record):
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION sql_mode = ''")
        cursor.close()


def fence_row(pool_keeper: PoolKeeper) -> list[tuple]:
    return sql(pool_keeper, "SELECT id, epoch, holder, taken_at FROM worker_meta")


def test_the_start_check_passes_on_the_keepers_sessions_and_changes_nothing(keeper):  # noqa: F811
    before = fence_row(keeper)
    keeper.refuse_broken_fence()
    assert keeper.fence_trips is True
    assert fence_row(keeper) == before


def test_the_start_check_refuses_a_session_that_is_not_strict(keeper):  # noqa: F811
    lax_sessions(keeper.engine)
    before = fence_row(keeper)
    with pytest.raises(errors.FenceSignalBroken, match="sql_mode ''"):
        keeper.refuse_broken_fence()
    assert fence_row(keeper) == before  # the check tripped nothing it did not roll back


def test_a_keeper_on_sessions_that_are_not_strict_is_still_fenced_off(keeper, caplog):  # noqa: F811
    """Without the check, the fence in the write trip wrote epoch 0 and committed the
    batch of a worker that another had fenced off."""
    lax_sessions(keeper.engine)
    with caplog.at_level(logging.ERROR, logger="molteniron.workers.keeper"):
        node = add_node(keeper, "n1")  # the keeper takes the pool
    assert "event=fence_broken" in caplog.text
    with keeper.engine.begin() as conn:  # another worker takes over
        conn.exec_driver_sql("UPDATE worker_meta SET epoch = epoch + 1")
    (taken,) = sql(keeper, "SELECT epoch FROM worker_meta")
    with pytest.raises(errors.NotActiveWorker):
        commit(keeper, request("allocate", owner="job", count=1, node_pool="p"))
    assert sql(keeper, "SELECT epoch FROM worker_meta") == [taken]
    assert owners(keeper) == {node: None}


LAX_WORKER = """
import sys
from molteniron.workers import fence

def lax(dbapi_connection, connection_record):
    cursor = dbapi_connection.cursor()
    cursor.execute("SET SESSION sql_mode = ''")
    cursor.close()

fence.strict_writes = lax  # as if the session could not be made strict
from molteniron.workers.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_worker_refuses_to_start_when_the_fence_would_not_trip(engine, database_url,
                                                                    tmp_path):
    config = tmp_path / "conf.yaml"
    config.write_text("{}\n")
    env = {**os.environ, "MOLTENIRON_DB_URL": database_url,
           "MOLTENIRON_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",  # never reached
           "MOLTENIRON_ADMINS": "off", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LAX_WORKER, "--config", str(config),
                           "--no-migrate"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "the fence in the write trip does not trip" in done.stderr
    assert "sql_mode ''" in done.stderr
