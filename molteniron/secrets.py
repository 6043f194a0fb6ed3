"""IPMI passwords at rest: Fernet keys from `secret_key_file`, encrypted column values.

The worker calls `configure()` once at start; from then on the `EncryptedString`
column type encrypts what it writes with the newest key and decrypts what it
reads with any of them (MultiFernet: rotation). A stored value that starts
with PREFIX is a Fernet token; anything else is a plain-text password (rows
written before a key was configured, or bulk-inserted by bench/env.py), read
as it is and encrypted by `rotate_stored`. Key material is never printed.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import String
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from molteniron.errors import ConfigError

PREFIX = "fernet:"
NO_KEY = ("IPMI passwords in the database are encrypted; set secret_key_file "
          "to the key file they were encrypted with")
WRONG_KEY = ("an IPMI password in the database is not decrypted by any key in "
             "secret_key_file (was a key removed before molteniron-worker --rotate-secrets?)")

_keys: MultiFernet | None = None  # this process's key set; None: plain text


def generate_key() -> str:
    """A fresh Fernet key, one line of a key file."""
    return Fernet.generate_key().decode("ascii")


def load_keys(path: str | Path) -> list[Fernet]:
    """The keys of a key file, newest first; ConfigError naming the file if it is unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read secret_key_file {path}: {reason}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.split("#", 1)[0].strip()  # '#' is not in the base64url alphabet
        if not key:
            continue
        try:
            keys.append(Fernet(key))
        except ValueError:  # the message would not echo the key, but say it our way
            raise ConfigError(f"secret_key_file {path}: line {number} is not a Fernet key "
                              "(32 url-safe base64-encoded bytes; make one with "
                              "molteniron-worker --generate-secret-key)") from None
    if not keys:
        raise ConfigError(f"secret_key_file {path} holds no key")
    return keys


def loose_permissions(path: str | Path) -> str | None:
    """A warning if group or others may read the key file, else None."""
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"secret_key_file {path} is accessible to group/others "
                f"(mode {stat.filemode(mode)}); chmod 600 it")
    return None


def configure(keys: list[Fernet] | None) -> None:
    """Set this process's key set (newest first); None stores passwords as given."""
    global _keys
    _keys = MultiFernet(keys) if keys else None


def configured() -> bool:
    return _keys is not None


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


def encrypt(password: str) -> str:
    """What to store for password: a prefixed token, or the password itself without keys."""
    if _keys is None:
        return password
    return PREFIX + _keys.encrypt(password.encode("utf-8")).decode("ascii")


def decrypt(stored: str) -> str:
    """The password a stored value holds; ConfigError if it is encrypted and cannot be read."""
    if not is_encrypted(stored):
        return stored
    if _keys is None:
        raise ConfigError(NO_KEY)
    try:
        return _keys.decrypt(stored[len(PREFIX):].encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError):
        raise ConfigError(WRONG_KEY) from None


def reencrypt(stored: str) -> str:
    """The stored value encrypted with the newest key (plain text gets encrypted)."""
    if _keys is None:
        raise ConfigError("re-encrypting needs secret_key_file")
    return encrypt(decrypt(stored))


class EncryptedString(TypeDecorator):
    """A string column encrypted with the configured keys (plain text without them)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else encrypt(value)

    def process_result_value(self, value, dialect):
        return None if value is None else decrypt(value)


# --- the stored passwords as a whole (the worker's start and --rotate-secrets) ---

def unreadable_stored(conn: Connection) -> str | None:
    """Why the stored passwords cannot be read with the configured keys, or None."""
    for (stored,) in conn.exec_driver_sql(
            "SELECT ipmi_password FROM nodes WHERE ipmi_password LIKE %s", (PREFIX + "%",)):
        try:
            decrypt(stored)
        except ConfigError as exc:
            return exc.message
    return None


def rotate_stored(conn: Connection) -> int:
    """Re-encrypt every node's password with the newest key; return how many rows.

    Raw SQL on purpose: the ORM would skip a write whose decrypted value is unchanged.
    """
    rows = conn.exec_driver_sql("SELECT id, ipmi_password FROM nodes ORDER BY id FOR UPDATE").all()
    updates = [(reencrypt(stored), node_id) for node_id, stored in rows]
    if updates:
        conn.exec_driver_sql("UPDATE nodes SET ipmi_password = %s WHERE id = %s", updates)
    return len(updates)
