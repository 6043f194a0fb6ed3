"""Optional HTTP basic auth from a password file.

The file holds `user:hash` lines (blank lines and `# comments` ignored), the
hash made by Werkzeug's generate_password_hash: scrypt (N=2^15, r=8, p=1) with a
random salt, e.g. `ops:scrypt:32768:8:1$<salt>$<hex>`. `molteniron-web
--hash-password USER` prints such a line (the password read from the terminal
or stdin). A pbkdf2 hash (`pbkdf2:sha256:...`) is accepted too; plain or
unsalted hashes are refused at start.

A scrypt check costs about 50 ms of CPU, and a browser sends the header with
every request (and every live update): a check that passed is remembered, as an
HMAC of user and password under a key made at start, until the file changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading

from werkzeug.security import check_password_hash, generate_password_hash

from molteniron.errors import ConfigError

STRONG = ("scrypt:", "pbkdf2:")
# Checked against for an unknown user, so that a wrong user name takes as long as a
# wrong password.
_DUMMY = generate_password_hash("not a password of anyone's")


def hash_line(user: str, password: str) -> str:
    if not user or ":" in user:
        raise ConfigError("a user name must not be empty or hold ':'")
    return f"{user}:{generate_password_hash(password)}"


class PasswordFile:
    def __init__(self, path: str):
        self.path = path
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._users: dict[str, str] = {}
        self._passed: set[bytes] = set()
        self._load()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the web password file {self.path}: "
                              f"{exc.strerror}") from None
        users = {}
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not user or not hashed.startswith(STRONG):
                raise ConfigError(f"{self.path} line {number}: not user:hash with a scrypt "
                                  "or pbkdf2 hash (make one with molteniron-web "
                                  "--hash-password USER)")
            users[user] = hashed
        if not users:
            raise ConfigError(f"{self.path} names no user: nobody could log in")
        self._users, self._stamp, self._passed = users, stamp, set()

    def check(self, header: str | None) -> str | None:
        """The user an `Authorization: Basic ...` header proves, else None."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, sep, password = base64.b64decode(header[6:], validate=True).decode(
                "utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if not sep:
            return None
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            try:
                self._load()  # a changed file: every check starts again
            except ConfigError:
                return None  # unreadable now: nobody gets in until it is fixed
            if token in self._passed:
                return user
            hashed = self._users.get(user)
        if not check_password_hash(hashed or _DUMMY, password) or hashed is None:
            return None
        with self._lock:
            self._passed.add(token)
        return user
