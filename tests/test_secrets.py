"""IPMI passwords at rest: the key file, the encrypted column, --rotate-secrets, the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select

from molteniron import pool, secrets
from molteniron.errors import ConfigError
from molteniron.models import Node
from molteniron.node_record import NodeRecord
from tests.stack import NODE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_keys_configured():
    """Every test starts, and leaves the process, without a key set."""
    secrets.configure(None)
    yield
    secrets.configure(None)


def key_file(path: Path, *keys: str, mode: int = 0o600) -> Path:
    path.write_text("".join(f"{k}\n" for k in keys))
    path.chmod(mode)
    return path


def token_of(stored: str) -> bytes:
    assert stored.startswith(secrets.PREFIX), stored
    return stored[len(secrets.PREFIX):].encode()


def add(session, name: str, password: str) -> Node:
    return pool.add_baremetal(session, name, ipmi_ip="10.0.0.1", ipmi_user="admin",
                              ipmi_password=password, allocation_pool="10.1.0.1",
                              port_hwaddr="aa:bb", cpu_arch="x86_64", cpus=8, ram_mb=1024,
                              disk_gb=10)


def stored_passwords(session) -> dict[str, str]:
    """What the database holds, read with raw SQL (no decryption)."""
    session.rollback()  # a fresh snapshot: another process may have written
    rows = session.connection().exec_driver_sql("SELECT name, ipmi_password FROM nodes")
    return dict(rows.all())  # not dict(rows): a result has keys(), dict() takes it for a mapping


# --- the helpers ----------------------------------------------------------------

def test_round_trip_stores_a_prefixed_token_not_the_password():
    secrets.configure([Fernet(Fernet.generate_key())])
    stored = secrets.encrypt("hunter2")
    assert stored.startswith(secrets.PREFIX) and "hunter2" not in stored
    assert secrets.encrypt("hunter2") != stored  # a fresh IV every time
    assert secrets.decrypt(stored) == "hunter2"
    assert secrets.decrypt(secrets.encrypt("")) == ""
    assert secrets.decrypt(secrets.encrypt("pässwörd")) == "pässwörd"


def test_without_keys_passwords_are_stored_as_given():
    assert not secrets.configured()
    assert secrets.encrypt("hunter2") == "hunter2"
    assert secrets.decrypt("hunter2") == "hunter2"


def test_plain_text_rows_from_before_read_as_plain_text_with_a_key():
    secrets.configure([Fernet(Fernet.generate_key())])
    assert secrets.decrypt("pw") == "pw"  # e.g. bench/env.py's add_nodes


def test_an_encrypted_value_without_keys_fails_loudly():
    secrets.configure([Fernet(Fernet.generate_key())])
    stored = secrets.encrypt("hunter2")
    secrets.configure(None)
    with pytest.raises(ConfigError, match="encrypted; set secret_key_file") as raised:
        secrets.decrypt(stored)
    assert "hunter2" not in raised.value.message


def test_rotation_old_token_decrypts_after_a_new_key_is_put_first_and_reencrypts_with_it():
    old, new = Fernet.generate_key(), Fernet.generate_key()
    secrets.configure([Fernet(old)])
    stored = secrets.encrypt("hunter2")

    secrets.configure([Fernet(new), Fernet(old)])
    assert secrets.decrypt(stored) == "hunter2"
    rotated = secrets.reencrypt(stored)
    assert Fernet(new).decrypt(token_of(rotated)) == b"hunter2"
    with pytest.raises(InvalidToken):
        Fernet(old).decrypt(token_of(rotated))
    assert Fernet(new).decrypt(token_of(secrets.encrypt("x"))) == b"x"  # the first key writes

    secrets.configure([Fernet(new)])  # the old key removed
    assert secrets.decrypt(rotated) == "hunter2"
    with pytest.raises(ConfigError, match="not decrypted by any key"):
        secrets.decrypt(stored)


def test_reencrypt_encrypts_plain_text_and_needs_keys():
    with pytest.raises(ConfigError, match="secret_key_file"):
        secrets.reencrypt("pw")
    key = Fernet.generate_key()
    secrets.configure([Fernet(key)])
    assert Fernet(key).decrypt(token_of(secrets.reencrypt("pw"))) == b"pw"


# --- the key file -----------------------------------------------------------------

def test_key_file_newest_first_ignoring_blank_lines_and_comments(tmp_path):
    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2024-05\n\n  {new}  # newest\n\n# the old one\n{old}\n")
    keys = secrets.load_keys(path)
    assert len(keys) == 2
    secrets.configure(keys)
    assert Fernet(new.encode()).decrypt(token_of(secrets.encrypt("pw"))) == b"pw"


def test_a_generated_key_loads(tmp_path):
    assert len(secrets.load_keys(key_file(tmp_path / "keys", secrets.generate_key()))) == 1


def test_missing_or_unreadable_key_file_is_a_config_error_naming_it(tmp_path):
    for path in (tmp_path / "absent", tmp_path):  # a directory cannot be read as a file
        with pytest.raises(ConfigError, match="cannot read secret_key_file") as raised:
            secrets.load_keys(path)
        assert str(path) in raised.value.message


def test_a_bad_key_names_file_and_line_and_never_the_key(tmp_path):
    good = Fernet.generate_key().decode()
    for bad in ("not-a-key-but-maybe-a-secret", good[:-4], "é" * 44):
        path = tmp_path / "keys"
        path.write_text(f"# comment\n{good}\n{bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as raised:
            secrets.load_keys(path)
        message = raised.value.message
        assert str(path) in message and "line 3" in message and "not a Fernet key" in message
        assert bad not in message and good not in message


def test_a_file_without_keys_is_a_config_error(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        secrets.load_keys(path)


def test_a_key_file_others_may_read_gets_a_warning(tmp_path):
    key = Fernet.generate_key().decode()
    assert secrets.loose_permissions(key_file(tmp_path / "private", key)) is None
    warning = secrets.loose_permissions(key_file(tmp_path / "loose", key, mode=0o644))
    assert warning and str(tmp_path / "loose") in warning and "chmod 600" in warning
    assert key not in warning


# --- the column, on the real database ---------------------------------------------

def test_the_column_stores_no_plaintext_and_the_orm_reads_the_password(session):
    key = Fernet.generate_key()
    secrets.configure([Fernet(key)])
    node = add(session, "n1", "hunter2")
    session.commit()

    stored = stored_passwords(session)["n1"]
    assert "hunter2" not in stored and Fernet(key).decrypt(token_of(stored)) == b"hunter2"
    session.expire_all()
    assert session.get(Node, node.id).ipmi_password == "hunter2"
    assert session.scalar(select(Node.ipmi_password).where(Node.id == node.id)) == "hunter2"
    assert NodeRecord.from_node(session.get(Node, node.id)).ipmi_password == "hunter2"

    pool.set_field(session, node.id, "ipmi_password", "s3cr3t-two")  # set_field writes too
    session.commit()
    stored = stored_passwords(session)["n1"]
    assert "s3cr3t-two" not in stored and Fernet(key).decrypt(token_of(stored)) == b"s3cr3t-two"


def test_without_a_key_the_column_holds_the_password_as_given(session):
    add(session, "n1", "hunter2")
    session.commit()
    assert stored_passwords(session) == {"n1": "hunter2"}


# --- molteniron-worker --rotate-secrets and the worker's start ---------------------

def worker_command(database_url: str, config: Path, *args: str,
                   timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOLTENIRON_DB_URL": database_url, "MOLTENIRON_CONFIG": str(config),
           "MOLTENIRON_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",  # never reached
           "MOLTENIRON_ADMINS": "off", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "molteniron.workers.main", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def config_file(tmp_path: Path, keys: Path | None) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(f"secret_key_file: {keys}\n" if keys else "{}\n")
    return path


def test_rotate_secrets_reencrypts_with_the_new_key_and_encrypts_plain_text(
        session, database_url, tmp_path):
    old, new = Fernet.generate_key(), Fernet.generate_key()
    secrets.configure([Fernet(old)])
    add(session, "encrypted", "hunter2")
    session.connection().exec_driver_sql(  # the way bench/env.py's add_nodes writes rows
        "INSERT INTO nodes (name, ipmi_ip, ipmi_user, ipmi_password, port_hwaddr, cpu_arch, "
        "cpus, ram_mb, disk_gb, node_pool, state, extra) VALUES ('plain', '10.0.0.2', "
        "'admin', 'pw', 'aa', 'x86_64', 8, 1024, 10, 'default', 'ready', '{}')")
    session.commit()
    assert stored_passwords(session)["plain"] == "pw"

    keys = key_file(tmp_path / "keys", new.decode(), old.decode())  # the new key first
    done = worker_command(database_url, config_file(tmp_path, keys), "--rotate-secrets")
    assert done.returncode == 0, done
    assert "re-encrypted 2 IPMI password(s)" in done.stdout
    assert new.decode() not in done.stdout + done.stderr

    stored = stored_passwords(session)
    assert {name: Fernet(new).decrypt(token_of(value)) for name, value in stored.items()} == {
        "encrypted": b"hunter2", "plain": b"pw"}
    for value in stored.values():
        with pytest.raises(InvalidToken):
            Fernet(old).decrypt(token_of(value))

    secrets.configure([Fernet(new)])  # the old key removed: the ORM still reads everything
    session.expire_all()
    assert dict(session.execute(select(Node.name, Node.ipmi_password)).all()) == {
        "encrypted": "hunter2", "plain": "pw"}


def test_rotate_secrets_refuses_without_a_key_file(session, database_url, tmp_path):
    add(session, "n1", "hunter2")
    session.commit()
    done = worker_command(database_url, config_file(tmp_path, None), "--rotate-secrets")
    assert done.returncode == 2, done
    assert "--rotate-secrets needs secret_key_file" in done.stderr
    assert stored_passwords(session) == {"n1": "hunter2"}


def test_rotate_secrets_changes_nothing_if_one_row_no_key_decrypts(session, database_url,
                                                                    tmp_path):
    secrets.configure([Fernet(Fernet.generate_key())])
    add(session, "lost", "hunter2")
    secrets.configure(None)
    add(session, "plain", "pw")
    session.commit()
    before = stored_passwords(session)
    keys = key_file(tmp_path / "keys", Fernet.generate_key().decode())
    done = worker_command(database_url, config_file(tmp_path, keys), "--rotate-secrets")
    assert done.returncode == 2 and "not decrypted by any key" in done.stderr, done
    assert stored_passwords(session) == before  # one transaction: all or nothing


def test_a_bad_key_file_stops_the_worker_with_exit_2(database_url, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("this-is-no-key\n")
    done = worker_command(database_url, config_file(tmp_path, keys), "--no-migrate")
    assert done.returncode == 2, done
    assert str(keys) in done.stderr and "this-is-no-key" not in done.stderr


def test_the_worker_refuses_to_start_without_a_key_when_passwords_are_encrypted(
        session, database_url, tmp_path):
    secrets.configure([Fernet(Fernet.generate_key())])
    add(session, "n1", "hunter2")
    session.commit()
    done = worker_command(database_url, config_file(tmp_path, None), "--no-migrate")
    assert done.returncode == 2, done
    assert "IPMI passwords in the database are encrypted; set secret_key_file" in done.stderr


def test_generate_secret_key_prints_a_usable_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "molteniron.workers.main",
                           "--generate-secret-key"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    Fernet(done.stdout.strip())  # raises if it is not a key


# --- end to end: CLI -> broker -> worker -> database ------------------------------

def test_a_node_added_through_the_cli_is_stored_encrypted_and_allocated_with_its_password(
        stack, tmp_path):
    key = Fernet.generate_key()
    keys = key_file(tmp_path / "keys", key.decode())
    stack.start_worker(env={"MOLTENIRON_CONFIG": str(config_file(tmp_path, keys))})
    assert "secrets_plain_text" not in stack.worker_log(0)

    added = stack.cli("add_baremetal", *NODE)
    assert added.returncode == 0, added
    [(stored,)] = stack.sql("SELECT ipmi_password FROM nodes")
    assert "secret" not in stored and Fernet(key).decrypt(token_of(stored)) == b"secret"

    granted = stack.cli("allocate", "job-1", "1")
    assert granted.returncode == 0, granted
    [node] = granted.json["nodes"].values()
    assert json.loads(node["blob"])["ipmi_password"] == "secret"


def test_a_worker_without_a_key_file_warns_that_passwords_are_plain_text(stack):
    stack.start_worker()
    assert "secrets_plain_text" in stack.worker_log(0)
    assert stack.cli("add_baremetal", *NODE).returncode == 0
    assert stack.sql("SELECT ipmi_password FROM nodes") == [("secret",)]
