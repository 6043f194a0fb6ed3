"""Inventory as YAML: export, import (from a file or an original MoltenIron database).

End to end through the CLI process, RabbitMQ, the worker and MariaDB; the
checking of entries also on its own (molteniron/inventory.py).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid

import pytest
import yaml
from sqlalchemy import create_engine, make_url, text

from molteniron import errors, inventory
from molteniron.clients import inventory_file
from molteniron.protocol import Request
from molteniron.workers.authz import Authorizer
from tests.conftest import TEST_DB_URL
from tests.stack import ROOT, node_args


def add_pool(stack) -> None:
    """Three nodes: tags, another pool, extra keys, one in maintenance with a reason."""
    assert stack.cli("add_baremetal", *node_args(1)).returncode == 0
    assert stack.cli("add_baremetal", *node_args(2, "other")).returncode == 0
    assert stack.cli("add_keyvalue_pairs", "kv-3", "10.0.0.3", "10.1.3.1", "ipmi_user=u",
                     "ipmi_password=pw-3", "port_hwaddr=52:54:00:12:34:56", "cpu_arch=aarch64",
                     "cpus=4", "ram_mb=8192", "disk_gb=100", "rack=7").returncode == 0
    (node_1,), (node_2,) = stack.sql(
        "SELECT id FROM nodes WHERE name IN ('node-1', 'node-2') ORDER BY name")
    assert stack.cli("set_field", str(node_1), "tags", "gpu,fast").returncode == 0
    assert stack.cli("set_field", str(node_2), "status", "maintenance").returncode == 0


def nodes(stack, *options: str) -> dict[str, dict]:
    shown = stack.cli("status", "-t", "json", *options)
    assert shown.returncode == 0, shown
    return {record["name"]: record for record in shown.json["result"]}


def write_inventory(path, entries: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"nodes": entries}, sort_keys=False))
    return str(path)


# --- end to end --------------------------------------------------------------------

def test_export_delete_import_round_trips(running, tmp_path):
    add_pool(running)
    first = tmp_path / "first.yaml"
    exported = running.cli("export", "-o", str(first), "--show-secrets")
    assert exported.returncode == 0, exported
    assert exported.json == {"status": 200, "exported": 3, "file": str(first)}
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o600  # it holds passwords
    entries = {e["name"]: e for e in yaml.safe_load(first.read_text())["nodes"]}
    assert entries["node-1"] == {
        "name": "node-1", "ipmi_ip": "10.0.0.1", "ipmi_user": "admin", "ipmi_password": "secret-1",
        "allocation_pool": ["10.1.1.1", "10.1.1.2"], "port_hwaddr": "aa:bb:cc:dd:ee:01",
        "cpu_arch": "x86_64", "cpus": 8, "ram_mb": 16384, "disk_gb": 200, "node_pool": "default",
        "tags": ["fast", "gpu"], "extra": {}, "state": "ready", "maintenance_reason": None}
    assert entries["node-2"]["state"] == "maintenance"
    assert entries["node-2"]["maintenance_reason"] == "set_field status maintenance"
    assert entries["kv-3"]["extra"] == {"rack": "7"}
    assert entries["kv-3"]["port_hwaddr"] == "52:54:00:12:34:56"

    assert running.cli("delete_db").returncode == 0
    imported = running.cli("import", str(first))
    assert imported.returncode == 0, imported
    assert imported.json["added"] == 3 and imported.json["changed"] == 0
    assert "3 added, 0 changed, 0 unchanged" in imported.stderr

    second = tmp_path / "second.yaml"
    assert running.cli("export", "-o", str(second), "--show-secrets").returncode == 0
    assert second.read_text() == first.read_text()
    assert nodes(running, "--show-secrets")["kv-3"]["ipmi_password"] == "pw-3"


def test_export_without_secrets_hides_passwords(running):
    add_pool(running)
    shown = running.cli("export")
    assert shown.returncode == 0, shown
    assert shown.stdout.startswith("# MoltenIron inventory")
    entries = yaml.safe_load(shown.stdout)["nodes"]
    assert {e["ipmi_password"] for e in entries} == {"********"}
    assert "secret-1" not in shown.stdout


def test_importing_the_same_file_twice_changes_nothing(running, tmp_path):
    add_pool(running)
    path = tmp_path / "pool.yaml"
    assert running.cli("export", "-o", str(path)).returncode == 0
    again = running.cli("import", str(path))
    assert again.returncode == 0, again
    assert (again.json["added"], again.json["changed"], again.json["unchanged"]) == (0, 0, 3)

    data = yaml.safe_load(path.read_text())
    data["nodes"][0]["cpus"] = 64
    data["nodes"][0]["extra"] = {"rack": "9"}
    path.write_text(yaml.safe_dump(data))
    edited = running.cli("import", str(path))
    assert edited.json["changed"] == 1, edited
    assert edited.json["changed_fields"] == {data["nodes"][0]["name"]: ["cpus", "extra"]}
    assert running.cli("import", str(path)).json["changed"] == 0


@pytest.mark.parametrize("bad, index, words", [
    ({"name": "node-9", "ipmi_ip": "10.0.0.9", "ipmi_password": "p", "cpus": "many"},
     2, ["node-9", "cpus", "many"]),
    ({"name": "node-1", "ipmi_ip": "10.0.0.9", "ipmi_password": "p"},
     2, ["node-1", "name", "entry 1"]),
    ({"ipmi_ip": "10.0.0.9", "ipmi_password": "p"}, 2, ["no name", "name is required"]),
])
def test_one_bad_entry_imports_nothing_and_names_entry_and_field(running, tmp_path, bad, index,
                                                                 words):
    good = {"name": "node-1", "ipmi_ip": "10.0.0.1", "ipmi_password": "p", "cpus": 2}
    path = write_inventory(tmp_path / "bad.yaml", [good, bad])
    refused = running.cli("import", path)
    assert refused.returncode == 1, refused
    assert refused.json["status"] == 400
    message = refused.json["message"]
    assert "nothing was imported" in message and f"entry {index} (" in message
    for word in words:
        assert word in message
    assert running.sql("SELECT COUNT(*) FROM nodes") == [(0,)]


def test_hidden_password_keeps_the_stored_one(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    path = tmp_path / "pool.yaml"
    assert running.cli("export", "-o", str(path)).returncode == 0
    data = yaml.safe_load(path.read_text())
    assert data["nodes"][0]["ipmi_password"] == "********"
    data["nodes"][0]["ipmi_user"] = "root"
    path.write_text(yaml.safe_dump(data))
    changed = running.cli("import", str(path))
    assert changed.json["changed_fields"] == {"node-1": ["ipmi_user"]}, changed
    node = nodes(running, "--show-secrets")["node-1"]
    assert (node["ipmi_user"], node["ipmi_password"]) == ("root", "secret-1")

    # A new node has no stored password to keep.
    data["nodes"][0]["name"] = "node-new"
    path.write_text(yaml.safe_dump(data))
    refused = running.cli("import", str(path))
    assert refused.returncode == 1
    assert "entry 1 (node-new): ipmi_password" in refused.json["message"]


def test_allocated_node_keeps_its_owner_and_pool(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "job-1", "1").returncode == 0
    path = tmp_path / "pool.yaml"
    running.cli("export", "-o", str(path))
    data = yaml.safe_load(path.read_text())
    entry = data["nodes"][0]
    assert entry["state"] == "allocated"
    entry.update(state="maintenance", maintenance_reason="x", cpus=32)
    path.write_text(yaml.safe_dump(data))
    changed = running.cli("import", str(path))
    assert changed.json["changed_fields"] == {"node-1": ["cpus"]}, changed
    node = nodes(running)["node-1"]
    assert (node["status"], node["provisioned"], node["cpus"]) == ("allocated", "job-1", 32)

    entry["node_pool"] = "other"
    path.write_text(yaml.safe_dump(data))
    refused = running.cli("import", str(path))
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert "entry 1 (node-1): node_pool" in refused.json["message"]
    assert nodes(running)["node-1"]["node_pool"] == "default"
    assert running.cli("release", "job-1").returncode == 0


def test_state_in_the_file_moves_nodes_in_and_out_of_maintenance(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    path = tmp_path / "pool.yaml"
    running.cli("export", "-o", str(path))
    data = yaml.safe_load(path.read_text())
    data["nodes"][0].update(state="maintenance", maintenance_reason="disk swap")
    path.write_text(yaml.safe_dump(data))
    assert running.cli("import", str(path)).json["changed_fields"] == {"node-1": ["state"]}
    node = nodes(running)["node-1"]
    assert (node["status"], node["maintenance_reason"]) == ("maintenance", "disk swap")
    data["nodes"][0].update(state="ready", maintenance_reason=None)
    path.write_text(yaml.safe_dump(data))
    assert running.cli("import", str(path)).json["changed"] == 1
    assert nodes(running)["node-1"]["status"] == "ready"


@pytest.fixture
def original_db():
    """An original MoltenIron database (tables Nodes and IPs) on the local MariaDB."""
    name = f"molteniron_orig_{uuid.uuid4().hex[:10]}"
    server = create_engine(make_url(TEST_DB_URL).set(database=""))
    with server.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    url = make_url(TEST_DB_URL).set(database=name)
    engine = create_engine(url)
    blob_1 = {"ipmi_user": "ADMIN", "ipmi_password": "old-pw-1", "port_hwaddr": "52:54:00:00:00:01",
              "cpu_arch": "ppc64el", "cpus": 20, "ram_mb": 51000, "disk_gb": 500, "rack": "r7"}
    blob_2 = {"ipmi_user": "ADMIN", "ipmi_password": "old-pw-2", "port_hwaddr": "52:54:00:00:00:02",
              "cpu_arch": "ppc64el", "cpus": "8", "ram_mb": 16000, "disk_gb": 250}
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE Nodes (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(50), "
            "ipmi_ip VARCHAR(50), `blob` VARCHAR(2000), status VARCHAR(20), "
            "provisioned VARCHAR(50), timestamp TIMESTAMP NULL, node_pool VARCHAR(20))"))
        conn.execute(text("CREATE TABLE IPs (id INT AUTO_INCREMENT PRIMARY KEY, node_id INT, "
                          "ip VARCHAR(50))"))
        conn.execute(text(
            "INSERT INTO Nodes (id, name, ipmi_ip, `blob`, status, provisioned, timestamp, "
            "node_pool) VALUES (1, 'orig-1', '10.9.0.1', :b1, 'ready', '', NULL, 'default'), "
            "(2, 'orig-2', '10.9.0.2', :b2, 'dirty', 'old-job', NOW(), 'power')"),
            {"b1": json.dumps(blob_1), "b2": json.dumps(blob_2)})
        conn.execute(text("INSERT INTO IPs (node_id, ip) VALUES (1, '10.9.1.1'), "
                          "(2, '10.9.2.1'), (1, '10.9.1.2')"))
    engine.dispose()
    yield url.render_as_string(hide_password=False)
    with server.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    server.dispose()


def test_import_from_an_original_database(running, original_db):
    imported = running.cli("import", "--from-original", original_db)
    assert imported.returncode == 0, imported
    assert imported.json["added"] == 2
    assert "orig-2 (dirty, provisioned by old-job)" in imported.stderr
    pool = nodes(running, "--show-secrets")
    assert pool["orig-1"] | {"id": None, "lease_ends": None} == {
        "id": None, "name": "orig-1", "ipmi_ip": "10.9.0.1", "ipmi_user": "ADMIN",
        "ipmi_password": "old-pw-1", "port_hwaddr": "52:54:00:00:00:01", "cpu_arch": "ppc64el",
        "cpus": 20, "ram_mb": 51000, "disk_gb": 500, "allocation_pool": ["10.9.1.1", "10.9.1.2"],
        "status": "ready", "provisioned": None, "holder_user": None, "allocated_at": None,
        "lease_ends": None, "node_pool": "default", "extra": {"rack": "r7"}, "tags": [],
        "maintenance_reason": None, "clean_claim": None, "clean_claimed_by": None,
        "clean_claimed_until": None}
    assert (pool["orig-2"]["status"], pool["orig-2"]["provisioned"]) == ("ready", None)
    assert (pool["orig-2"]["node_pool"], pool["orig-2"]["cpus"]) == ("power", 8)
    assert pool["orig-2"]["allocation_pool"] == ["10.9.2.1"]
    again = running.cli("import", "--from-original", original_db)
    assert (again.json["added"], again.json["changed"]) == (0, 0), again


def test_unreadable_original_database_is_a_usage_error(running):
    url = make_url(TEST_DB_URL).set(database="molteniron_orig_absent").render_as_string(
        hide_password=False)
    refused = running.cli("import", "--from-original", url)
    assert refused.returncode == 2, refused
    assert "--from-original: cannot read Nodes and IPs" in refused.json["message"]


# Where `import --from-original` reads the original database's password (documented).
PASSWORD_ENV = "MOLTENIRON_ORIGINAL_DB_PASSWORD"


@pytest.fixture
def original_db_user(original_db):
    """A MariaDB user with a password that may read the original database: (URL without
    the password, the password)."""
    url = make_url(original_db)
    name, password = f"mi_orig_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    server = create_engine(url.set(database=""))
    hosts = ("%", "localhost")  # 'localhost': an anonymous ''@'localhost' would win over '%'
    with server.begin() as conn:
        for host in hosts:
            conn.execute(text(f"CREATE USER '{name}'@'{host}' IDENTIFIED BY '{password}'"))
            conn.execute(text(f"GRANT SELECT ON `{url.database}`.* TO '{name}'@'{host}'"))
    yield url.set(username=name, password=None).render_as_string(hide_password=False), password
    with server.begin() as conn:
        for host in hosts:
            conn.execute(text(f"DROP USER IF EXISTS '{name}'@'{host}'"))
    server.dispose()


def test_the_original_databases_password_may_come_from_the_environment(running,
                                                                        original_db_user):
    """Not on the command line, where ps shows it to every user of the machine."""
    url, password = original_db_user
    assert password not in url
    refused = running.cli("import", "--from-original", url)
    assert refused.returncode == 2 and "Access denied" in refused.json["message"], refused
    imported = running.cli("import", "--from-original", url,
                           env={PASSWORD_ENV: password})
    assert imported.returncode == 0, imported
    assert imported.json["added"] == 2
    # It replaces a password written in the URL, as MOLTENIRON_DB_PASSWORD does.
    wrong = make_url(url).set(password="wrong").render_as_string(hide_password=False)
    again = running.cli("import", "--from-original", wrong,
                        env={PASSWORD_ENV: password})
    assert again.returncode == 0 and again.json["unchanged"] == 2, again


def test_import_help_says_a_password_in_the_url_shows_in_the_process_list():
    done = subprocess.run([sys.executable, "-m", "molteniron.clients.cli", "import", "--help"],
                          capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert "process list" in done.stdout
    assert PASSWORD_ENV in done.stdout


def test_a_mysql_url_reads_the_original_with_pymysql(running, original_db):
    """mysql:// alone would mean the MySQLdb driver, which is not installed."""
    url = make_url(original_db)
    assert url.drivername == "mysql+pymysql"
    plain = url.set(drivername="mysql").render_as_string(hide_password=False)
    imported = running.cli("import", "--from-original", plain)
    assert imported.returncode == 0, imported
    assert imported.json["added"] == 2
    mariadb = url.set(drivername="mariadb").render_as_string(hide_password=False)
    again = running.cli("import", "--from-original", mariadb)
    assert again.returncode == 0 and again.json["unchanged"] == 2, again


@pytest.mark.parametrize("url", [
    "postgresql://u:hunter2@127.0.0.1/MoltenIron",
    "mysql+mysqldb://u:hunter2@127.0.0.1/MoltenIron",
    "sqlite:///MoltenIron.db",
    "not a url: u:hunter2@",
    "",
])
def test_an_unsupported_original_url_is_a_usage_error_naming_the_form(stack, url):
    refused = stack.cli("import", "--from-original", url)
    assert refused.returncode == 2, refused
    assert "Traceback" not in refused.stderr
    assert "mysql+pymysql://USER@HOST:PORT/DATABASE" in refused.json["message"]
    assert "hunter2" not in refused.stdout + refused.stderr


def test_original_url_maps_mysql_to_pymysql_and_takes_the_password():
    url = inventory_file.original_url("mysql://root:old@db.example:3306/MoltenIron", "n@w:pw")
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "mysql+pymysql", "root", "n@w:pw", "db.example", 3306, "MoltenIron")
    kept = inventory_file.original_url("mysql+pymysql://root:old@db/MoltenIron?charset=utf8mb4")
    assert (kept.password, dict(kept.query)) == ("old", {"charset": "utf8mb4"})


# --- export -o FILE ---------------------------------------------------------------

def test_export_refuses_to_write_through_a_symlink(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    tmp_path = tmp_path / "out"  # the stack's own files are in tmp_path
    tmp_path.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "not-yours.conf"
    target.write_text("keep me\n")
    link, dangling = tmp_path / "pool.yaml", tmp_path / "dangling.yaml"
    link.symlink_to(target)
    dangling.symlink_to(elsewhere / "absent.yaml")
    for path in (link, dangling):
        refused = running.cli("export", "-o", str(path), "--show-secrets")
        assert refused.returncode == 2, refused
        assert "symbolic link" in refused.json["message"] and str(path) in refused.stderr
        assert "Traceback" not in refused.stderr
    assert target.read_text() == "keep me\n"
    assert link.is_symlink() and dangling.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.yaml", "elsewhere",
                                                          "pool.yaml"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["not-yours.conf"]


def test_export_replaces_the_file_whole_with_a_new_one(running, tmp_path):
    """A new file renamed over FILE: a hard link to the old file keeps the old text, and
    no temporary file is left behind."""
    running.cli("add_baremetal", *node_args(1))
    tmp_path = tmp_path / "out"  # the stack's own files are in tmp_path
    tmp_path.mkdir()
    path, other_name = tmp_path / "pool.yaml", tmp_path / "old-pool.yaml"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    os.link(path, other_name)
    exported = running.cli("export", "-o", str(path), "--show-secrets")
    assert exported.returncode == 0, exported
    assert path.read_text().startswith(inventory_file.HEADER) and "secret-1" in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert other_name.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-pool.yaml", "pool.yaml"]

    plain = tmp_path / "plain.yaml"
    assert running.cli("export", "-o", str(plain)).returncode == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~umask


def test_export_to_a_directory_that_does_not_exist_is_a_clear_usage_error(running, tmp_path):
    running.cli("add_baremetal", *node_args(1))
    refused = running.cli("export", "-o", str(tmp_path / "absent" / "pool.yaml"))
    assert refused.returncode == 2, refused
    assert "cannot write" in refused.json["message"] and "Traceback" not in refused.stderr


def test_the_cli_imports_no_sqlalchemy():
    done = subprocess.run([sys.executable, "-c",
                           "import sys, molteniron.clients.cli, molteniron.clients.inventory_file;"
                           "molteniron.clients.cli.build_parser();"
                           "print([m for m in sys.modules if m.split('.')[0] in "
                           "('sqlalchemy', 'pymysql')])"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


# --- the parts on their own ---------------------------------------------------------

def entry(**fields) -> dict:
    return {"name": "n-1", "ipmi_ip": "10.0.0.1", "ipmi_password": "p", **fields}


@pytest.mark.parametrize("entries, words", [
    ([entry(), entry(name="n-2", cpus="many")], ["entry 2 (n-2)", "cpus must be an integer"]),
    ([entry(), entry()], ["entry 2 (n-1)", "name n-1 is also entry 1"]),
    ([entry(), {"ipmi_ip": "10.0.0.2"}], ["entry 2 (no name)", "name is required"]),
    ([entry(ram_mb=-1)], ["entry 1 (n-1)", "ram_mb must be between"]),
    ([entry(cpu=8)], ["entry 1 (n-1)", "unknown field(s) cpu"]),
    ([entry(extra={"cpus": 3})], ["entry 1 (n-1)", "extra must not repeat the field(s) cpus"]),
    ([entry(extra=[1])], ["extra must be a mapping"]),
    ([entry(state="broken")], ["state must be one of"]),
    ([entry(ipmi_ip="")], ["ipmi_ip must not be empty"]),
    ([entry(tags=7)], ["tags must be a comma-separated list"]),
    (["just a name"], ["entry 1 (no name)", "an entry must be a mapping"]),
])
def test_check_inventory_names_entry_and_field(entries, words):
    with pytest.raises(errors.BadRequest) as refused:
        inventory.check_inventory({"nodes": entries})
    for word in words:
        assert word in refused.value.message


def test_check_inventory_lists_every_bad_entry():
    with pytest.raises(errors.BadRequest) as refused:
        inventory.check_inventory({"nodes": [entry(cpus="x"), entry(name="n-2", disk_gb="y")]})
    assert "entry 1 (n-1): cpus" in refused.value.message
    assert "entry 2 (n-2): disk_gb" in refused.value.message


def test_check_inventory_normalizes_what_it_keeps():
    (checked,) = inventory.check_inventory({"nodes": [entry(
        ipmi_password="********", allocation_pool="10.1.0.1, 10.1.0.2", tags=["b", "a", "a"],
        state="allocated", cpus="8")]})
    assert checked.ipmi_password is None  # keep the stored one
    assert checked.allocation_pool == ["10.1.0.1", "10.1.0.2"]
    assert checked.tags == ["a", "b"]
    assert checked.state is None  # allocated/dirty in a file are not applied
    assert checked.hardware["cpus"] == 8 and checked.node_pool == "default"


def test_the_inventory_must_hold_a_list_of_nodes():
    with pytest.raises(errors.BadRequest):
        inventory.check_inventory({"nodes": {"name": "n-1"}})
    with pytest.raises(errors.BadRequest):
        inventory.check_inventory({"nodes": [], "more": 1})


def test_yaml_keeps_unquoted_mac_addresses_as_text():
    loaded = inventory_file.load("- name: n\n  port_hwaddr: 52:54:00:12:34:56\n  cpus: 8\n"
                                 "  extra: {since: 2024-01-02}\n")
    assert loaded == {"nodes": [{"name": "n", "port_hwaddr": "52:54:00:12:34:56", "cpus": 8,
                                 "extra": {"since": "2024-01-02"}}]}
    with pytest.raises(errors.BadRequest):
        inventory_file.load("nodes: {a: 1}")
    with pytest.raises(errors.BadRequest):
        inventory_file.load("nodes: [a\n")


def test_original_rows_become_entries():
    found, notes = inventory_file.from_original(
        [{"id": 5, "name": "o", "ipmi_ip": "1.2.3.4", "blob": '{"cpus": 2, "vendor": "x"}',
          "status": "dirty", "provisioned": "job", "node_pool": None}],
        [(5, "10.0.0.1"), (5, "10.0.0.2")])
    assert found == {"nodes": [{"name": "o", "ipmi_ip": "1.2.3.4", "cpus": 2,
                                "allocation_pool": ["10.0.0.1", "10.0.0.2"], "node_pool": "default",
                                "extra": {"vendor": "x"}, "state": "ready", "ipmi_password": ""}]}
    assert "o (dirty, provisioned by job)" in notes[0]
    with pytest.raises(errors.BadRequest, match="Nodes id 5"):
        inventory_file.from_original([{"id": 5, "name": "o", "ipmi_ip": "i", "blob": "{",
                                       "status": "ready", "provisioned": "", "node_pool": "p"}], [])


def test_only_admins_import_or_export_secrets():
    authz = Authorizer(("admin",))
    allowed = lambda _: None  # noqa: E731 - nobody holds anything
    for op, args in (("import", {"inventory": {"nodes": []}}), ("export", {"show_secrets": True})):
        with pytest.raises(errors.Forbidden):
            authz.check(Request(id="x", op=op, args=args, user="bob"), allowed, allowed)
        authz.check(Request(id="x", op=op, args=args, user="admin"), allowed, allowed)
    authz.check(Request(id="x", op="export", args={"show_secrets": False}, user="bob"),
                allowed, allowed)
