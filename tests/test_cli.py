"""The original CLI's commands, end to end: CLI process -> RabbitMQ -> worker -> MariaDB."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

from tests.stack import NODE, ROOT, node_args, wait_until


def test_original_sequence_prints_the_original_json(running):
    assert running.cli("add_baremetal", *NODE).json["status"] == 200

    allocated = running.cli("allocate", "job-1", "1")
    assert allocated.returncode == 0, allocated
    nodes = allocated.json["nodes"]
    (key, node), = nodes.items()
    assert key == f"node_{node['id']}"
    assert set(node) == {"id", "name", "ipmi_ip", "blob", "allocation_pool", "status",
                         "provisioned", "timestamp", "node_pool", "lease_expires_at"}
    assert isinstance(node["blob"], str)
    assert json.loads(node["blob"]) == {
        "ipmi_user": "admin", "ipmi_password": "secret", "port_hwaddr": "aa:bb:cc:dd:ee:01",
        "cpu_arch": "x86_64", "cpus": 8, "ram_mb": 16384, "disk_gb": 200}
    assert node["allocation_pool"] == "10.1.0.1,10.1.0.2"
    assert node["provisioned"] == "job-1"
    assert node["node_pool"] == "default"
    assert node["timestamp"]

    field = running.cli("get_field", "job-1", "port_hwaddr")
    assert field.json == {"status": 200,
                          "result": [{"id": node["id"], "field": "aa:bb:cc:dd:ee:01"}]}

    released = running.cli("release", "job-1")
    assert released.returncode == 0 and released.json["status"] == 200
    assert running.sql("SELECT state, owner FROM nodes") == [("ready", None)]


def test_refusals_exit_1_with_the_reply_on_stdout(running):
    unknown_owner = running.cli("release", "nobody")
    assert unknown_owner.returncode == 1
    assert unknown_owner.json == {"status": 404, "message": "No nodes are owned by nobody",
                                  "error": "OwnerNotFound"}
    assert "No nodes are owned by nobody" in unknown_owner.stderr

    running.cli("add_baremetal", *NODE)
    duplicate = running.cli("add_baremetal", *NODE)
    assert duplicate.returncode == 1 and duplicate.json["status"] == 409

    running.cli("allocate", "job-1", "1")
    unknown_field = running.cli("get_field", "job-1", "candy")
    assert unknown_field.returncode == 1
    assert unknown_field.json["message"] == "field candy does not exist"
    assert "Traceback" not in unknown_field.stderr


def test_add_keyvalue_pairs_and_json_blob_and_set_field(running):
    added = running.cli("add_keyvalue_pairs", "kv-1", "10.0.0.5", "10.2.0.1",
                        'ipmi_user="user"', "ipmi_password=pw", "port_hwaddr=aa:00",
                        "cpu_arch=ppc64el", "cpus=20", "ram_mb=51000", "disk_gb=500", "rack=7")
    assert added.json["status"] == 200, added
    blob = json.dumps({"ipmi_user": "u", "ipmi_password": "p", "port_hwaddr": "bb:00",
                       "cpu_arch": "x86_64", "cpus": 4, "ram_mb": 8192, "disk_gb": 100})
    blob_added = running.cli("add_json_blob", "blob-1", "10.0.0.6", "10.2.0.2", blob, "big")
    assert blob_added.json["status"] == 200

    kv_id = running.sql("SELECT id FROM nodes WHERE name='kv-1'")[0][0]
    assert running.cli("set_field", str(kv_id), "cpus", "24", "int").json == {"status": 200}
    assert running.sql(f"SELECT cpus, ipmi_user FROM nodes WHERE id={kv_id}") == [(24, "user")]
    bad_type = running.cli("set_field", str(kv_id), "cpus", "x", "int")
    assert bad_type.returncode == 1 and bad_type.json["status"] == 400
    missing = running.cli("set_field", "9999", "cpus", "1", "int")
    assert missing.returncode == 1 and missing.json["status"] == 404

    running.cli("allocate", "job-kv", "1")
    rack = running.cli("get_field", "job-kv", "rack")
    assert rack.json["result"] == [{"id": kv_id, "field": "7"}]
    assert running.cli("allocate", "job-big", "1", "big").json["nodes"]


def test_status_tables_hide_passwords_unless_asked(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("add_baremetal", *node_args(2, "gpu"))

    human = running.cli("status")
    assert human.returncode == 0
    table = human.json["result"]
    assert "node-1" in table and "node-2" in table and "secret-1" not in table

    bare = running.cli("status_baremetal", "--show-secrets").json["result"]
    assert "secret-1" in bare and "ipmi_password" in bare

    csv = running.cli("-o", "result", "status", "-t", "csv", "--pool", "gpu")
    assert csv.stdout.splitlines()[0].startswith("id,name,ipmi_ip,")  # a header row, then the rows
    assert csv.stdout.splitlines()[1].startswith("2,node-2,") and "node-1" not in csv.stdout

    records = running.cli("status", "-t", "json").json["result"]
    assert [r["name"] for r in records] == ["node-1", "node-2"]


def test_delete_db_empties_the_pool(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "job-1", "1")
    assert running.cli("delete_db").json["status"] == 200
    assert running.sql("SELECT COUNT(*) FROM nodes") == [(0,)]
    assert running.sql("SELECT end_reason FROM allocations") == [("removed",)]


def test_output_result_prints_only_the_result(running):
    running.cli("add_baremetal", *NODE)
    running.cli("allocate", "job-1", "1")
    out = running.cli("-o", "result", "get_field", "job-1", "ipmi_ip")
    assert json.loads(out.stdout) == [{"id": 1, "field": "10.0.0.1"}]


def test_usage_errors_exit_2_without_traceback(running):
    for args in (["allocate", "job"], ["allocate", "job", "zero"], ["allocate", "job", "0"],
                 ["frobnicate"], ["add_baremetal", "n", "ip"],
                 ["allocate", "j", "1", "--wait", "-3"]):
        result = running.cli(*args)
        assert result.returncode == 2, (args, result)
        assert "Traceback" not in result.stderr
    assert running.sql("SELECT COUNT(*) FROM nodes") == [(0,)]


def test_bad_config_file_exits_2_naming_the_key(running, tmp_path):
    config = tmp_path / "conf.yaml"
    config.write_text("amqp_url: amqp://x\nsqlUser: root\n")
    result = running.cli("--config", str(config), "status")
    assert result.returncode == 2
    assert "sqlUser" in result.stderr and "Traceback" not in result.stderr
    config.write_text("request_timeout: soon\n")
    result = running.cli("-c", str(tmp_path), "status")
    assert result.returncode == 2 and "request_timeout" in result.stderr


def test_unreachable_broker_exits_4(stack):
    """A refused connection is tried again until --timeout (a broker restarting comes
    back within it); then exit 4 naming where and why."""
    stack.env["MOLTENIRON_AMQP_URL"] = "amqp://guest:guest@127.0.0.1:1/%2F"
    result = stack.cli("status", "--timeout", "2")
    assert result.returncode == 4
    assert "cannot reach RabbitMQ at 127.0.0.1:1: connection refused" in result.stderr, result
    assert "Traceback" not in result.stderr


def silent_listener(sockets: ExitStack) -> int:
    """A port that accepts TCP connections and never says a word: no AMQP handshake."""
    listener = sockets.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes the connections; nobody reads them
    return listener.getsockname()[1]


def full_listener(sockets: ExitStack) -> int:
    """A port whose accept queue is full: a new TCP connection is never completed (the
    kernel drops its SYNs), as with a firewall that drops packets."""
    listener = sockets.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]

    def full() -> bool:
        filler = sockets.enter_context(socket.socket())
        filler.settimeout(0.2)
        try:
            filler.connect(("127.0.0.1", port))
        except TimeoutError:
            return True
        return False  # that one got in, and fills the queue a bit more
    wait_until(full, 10, "the listener's accept queue to be full")
    return port


def test_a_connect_timeout_says_so_naming_host_port_and_seconds(stack):
    for listener, words in ((silent_listener, "connected, but no AMQP handshake within 2s"),
                            (full_listener, "no TCP connection within 2s")):
        with ExitStack() as sockets:
            port = listener(sockets)
            stack.env["MOLTENIRON_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
            started = time.monotonic()
            result = stack.cli("--timeout", "2", "status")
            took = time.monotonic() - started
        assert result.returncode == 4, (listener.__name__, result)
        assert f"cannot reach RabbitMQ at 127.0.0.1:{port}: {words}" in result.stderr, result
        assert "Traceback" not in result.stderr
        assert took < 10, took  # the 2 s asked for, not a connect timeout of its own


def test_no_worker_answering_exits_4(running):
    running.stop_workers()
    result = running.cli("--timeout", "1", "status")
    assert result.returncode == 4
    assert "no MoltenIron worker answered" in result.stderr


def test_arguments_refused_before_sending_exit_2(running):
    for args in (["cancel", "not-a-uuid"], ["allocate", "", "1"], ["release", ""]):
        result = running.cli(*args)
        assert result.returncode == 2, (args, result)
        assert "Traceback" not in result.stderr


def test_a_bad_amqp_url_is_a_clear_error(stack):
    stack.env["MOLTENIRON_AMQP_URL"] = "amqp://guest:guest@127.0.0.1:notaport/%2F"
    result = stack.cli("status")
    assert result.returncode == 2
    assert "amqp_url" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_client_loads_pika_without_asyncio_and_asyncio_still_works_after():
    # About 20 ms of every `molteniron allocate` (molteniron/broker.py).
    done = subprocess.run([sys.executable, "-c",
                           "import sys, molteniron.clients.client; print('asyncio' in sys.modules);"
                           "import pika.adapters.asyncio_connection as a;"
                           "print(a.AsyncioConnection.__name__)"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split() == ["False", "AsyncioConnection"]


def test_help_is_wrapped_to_columns_else_to_80():
    for columns in ("50", "120", None):  # None: no COLUMNS, stdout not a terminal
        env = {"PATH": ""} if columns is None else {"COLUMNS": columns, "PATH": ""}
        done = subprocess.run([sys.executable, "-m", "molteniron.clients.cli", "import", "--help"],
                              env=env, capture_output=True, text=True, cwd=ROOT, check=True)
        widest = max(len(line) for line in done.stdout.splitlines())
        assert int(columns or 80) - 20 < widest <= int(columns or 80), (columns, done.stdout)


def test_a_command_leaves_out_the_modules_that_would_slow_its_start(tmp_path):
    """About 25 ms of the 100 ms `molteniron allocate` may take (README, Performance)."""
    conf = tmp_path / "conf.yaml"
    conf.write_text("amqp_url: amqp://ci@mq.example:5672/molteniron\nrequest_timeout: 5\n")
    probe = ("import sys; from molteniron.clients import cli; "
             "cli.build_parser().parse_args(['allocate', 'job', '1']); "
             f"c = cli.load_config({str(conf)!r}); import molteniron.clients.client; "
             "print(c.request_timeout, sorted({'yaml', 'dataclasses', 'inspect', 'shutil', "
             "'sqlalchemy', 'pymysql', 'asyncio'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.strip() == "5.0 []"  # the file was read, without PyYAML
