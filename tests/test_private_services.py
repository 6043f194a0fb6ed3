"""bench/private.py: private MariaDB and RabbitMQ instances that tests may restart,
and the fault suite's restarts touch only them, never the machine's shared services."""

from __future__ import annotations

import subprocess
import time

import pika
import pymysql
import pytest

from bench import faults
from bench.private import PrivateMariaDB, PrivateRabbitMQ, process_gone, shared_service_pids


def connect_amqp(url: str, timeout: float = 30) -> pika.BlockingConnection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_private_mariadb_restart_keeps_a_committed_row():
    with PrivateMariaDB() as mariadb:
        assert mariadb.port != 3306
        assert mariadb.url == f"mysql+pymysql://root@127.0.0.1:{mariadb.port}/"
        conn = pymysql.connect(host="127.0.0.1", port=mariadb.port, user="root", autocommit=False)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE t")
            cur.execute("CREATE TABLE t.rows (id INT PRIMARY KEY, what VARCHAR(20)) ENGINE=InnoDB")
            cur.execute("INSERT INTO t.rows VALUES (1, 'kept')")
        conn.commit()
        conn.close()
        old_pid = mariadb.process.pid

        mariadb.restart()

        assert process_gone(old_pid)
        assert mariadb.process.pid != old_pid
        conn = pymysql.connect(host="127.0.0.1", port=mariadb.port, user="root")
        with conn.cursor() as cur:
            cur.execute("SELECT id, what FROM t.rows")
            assert cur.fetchall() == ((1, "kept"),)
        conn.close()
        directory = mariadb.dir
    assert process_gone(old_pid) and not directory.exists()


def test_private_rabbitmq_restarts_keep_a_durable_queue_and_persistent_messages():
    with PrivateRabbitMQ() as rabbit:
        assert rabbit.port != 5672 and rabbit.node != "rabbit@localhost"
        assert "/" in rabbit.ctl("list_vhosts", "--silent").split()
        conn = connect_amqp(rabbit.url)
        channel = conn.channel()
        channel.confirm_delivery()
        channel.queue_declare("kept", durable=True)
        for body in (b"one", b"two"):
            channel.basic_publish("", "kept", body,
                                  pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))

        rabbit.restart()  # stop_app/start_app, what the fault suite does

        with pytest.raises(pika.exceptions.AMQPError):  # the restart dropped the connection
            conn.process_data_events(time_limit=0)
        conn = connect_amqp(rabbit.url)
        method, _, body = conn.channel().basic_get("kept", auto_ack=True)
        assert body == b"one"
        conn.close()
        old_pid = rabbit.pid

        rabbit.restart(full=True)  # the node's process too

        assert process_gone(old_pid) and rabbit.pid != old_pid
        conn = connect_amqp(rabbit.url)
        channel = conn.channel()
        assert channel.queue_declare("kept", durable=True, passive=True).method.message_count == 1
        assert channel.basic_get("kept", auto_ack=True)[2] == b"two"
        conn.close()
        pid, directory = rabbit.pid, rabbit.dir
    assert process_gone(pid) and not directory.exists()


def test_the_fault_suites_restarts_leave_the_shared_services_alone():
    """The broker and database restarts of tests/test_reliability.py hit private instances only."""
    before = shared_service_pids()  # the servers on :3306 and :5672
    assert {pid for pid in before.values() if pid} <= servers_running()
    with PrivateMariaDB() as mariadb, PrivateRabbitMQ() as rabbit:
        mine = {mariadb.process.pid, rabbit.pid}
        assert not mine & set(before.values())
        faults.restart_database(mariadb)
        faults.restart_broker(rabbit)
        faults.restart_broker(rabbit)  # twice: the second must work on a node started by start_app
        mine.add(mariadb.process.pid)
    assert all(process_gone(pid) for pid in mine)
    assert shared_service_pids() == before
    assert {pid for pid in before.values() if pid} <= servers_running()


def servers_running() -> set[int]:
    """pgrep -x mariadbd / beam.smp: read only."""
    out = subprocess.run(["pgrep", "-x", "mariadbd|beam.smp"], capture_output=True,
                         text=True).stdout
    return {int(pid) for pid in out.split()}
