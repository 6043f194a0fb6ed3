"""A database that answers but refuses writes, made on a private MariaDB only
(bench/private.py; never the machine's shared server, whose globals are not ours).

- Read-only: `SET GLOBAL read_only=1` stops every user without SUPER (1290) and
  still answers every SELECT. The workers must log in as such a user
  (add_worker_user): root has SUPER and writes on.
- Full: InnoDB says "The table ... is full" (1114) when a data file cannot grow.
  SmallDiskMariaDB keeps every table in one system data file with a maximum size;
  fill_disk fills it, free_disk gives the room back. No mount, no root.

Measured here (MariaDB 10.11): a 32 MB data file fills for good in about 3 s (three
passes, purge in between); a dropped table's room is usable again within about 0.5 s.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pymysql

from bench.private import PrivateMariaDB, wait_for

WORKER_USER = "mi_worker"
FILLER_DATABASE = "mi_filler"
DATA_FILE_MAX_MB = 32
TABLE_FULL = 1114  # InnoDB: "The table ... is full"


def root(mariadb: PrivateMariaDB, database: str | None = None) -> pymysql.Connection:
    """root on the private server (autocommit)."""
    if not isinstance(mariadb, PrivateMariaDB) or mariadb.port == 3306:
        raise ValueError("only a private MariaDB (bench/private.py) may be broken")
    return pymysql.connect(host="127.0.0.1", port=mariadb.port, user="root", autocommit=True,
                           database=database)


@contextmanager
def root_cursor(mariadb: PrivateMariaDB, database: str | None = None) -> Iterator:
    """A cursor of root on the private server (autocommit), closed with its connection."""
    conn = root(mariadb, database)
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def add_worker_user(mariadb: PrivateMariaDB, database: str) -> str:
    """A user with every right on `database` and none beyond (no SUPER, so read_only
    stops it); returns its SQLAlchemy URL. The anonymous users mariadb-install-db makes
    would win over 'user'@'%' for a TCP login from 127.0.0.1 (1045): they go."""
    password = secrets.token_hex(12)
    with root_cursor(mariadb) as cur:
        cur.execute("DELETE FROM mysql.global_priv WHERE User = ''")
        cur.execute("FLUSH PRIVILEGES")
        for host in ("%", "localhost"):
            # No parameters: the host '%' would be taken for one (the password is hex).
            cur.execute(f"CREATE OR REPLACE USER '{WORKER_USER}'@'{host}' "
                        f"IDENTIFIED BY '{password}'")
            cur.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{WORKER_USER}'@'{host}'")
    return f"mysql+pymysql://{WORKER_USER}:{password}@127.0.0.1:{mariadb.port}/{database}"


def set_read_only(mariadb: PrivateMariaDB, on: bool) -> None:
    """read_only on or off (as root) on the private server."""
    with root_cursor(mariadb) as cur:
        cur.execute(f"SET GLOBAL read_only = {1 if on else 0}")


class SmallDiskMariaDB(PrivateMariaDB):
    """A private MariaDB whose tables all live in one data file that cannot grow past
    DATA_FILE_MAX_MB: what a full disk is to InnoDB, without a disk of that size."""

    # Given to the install (which makes the data file) and to every start (which reads
    # its limit).
    OPTIONS = ("--innodb-file-per-table=0",
               f"--innodb-data-file-path=ibdata1:12M:autoextend:max:{DATA_FILE_MAX_MB}M")


def fill_disk(mariadb: SmallDiskMariaDB, *also: Callable[[], int]) -> int:
    """Fill the data file until not one more row fits, and it stays so; returns the rows
    that went in. InnoDB's purge frees the undo pages of the filler's own transactions a
    moment later, so filling goes on, pass after pass, until a pass after purge has
    caught up finds no room at all. `also`: more filling (fill_table_pages, say) done in
    every pass, each returning the rows it got in.

    A full data file still takes rows into pages that have room: a test that needs a
    given write refused must fill the pages it writes to as well."""
    total = 0
    while True:
        taken = _fill_filler(mariadb) + sum(step() for step in also)
        if not taken:
            return total
        total += taken
        wait_for(lambda: _purged(mariadb), 60, "InnoDB's purge to catch up")


def _fill_filler(mariadb: SmallDiskMariaDB) -> int:
    conn = root(mariadb)
    rows = 0
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {FILLER_DATABASE}")
            cur.execute(f"USE {FILLER_DATABASE}")  # seq_1_to_N: the sequence engine's rows
            cur.execute("CREATE TABLE IF NOT EXISTS filler "
                        "(id INT AUTO_INCREMENT PRIMARY KEY, pad CHAR(255) NOT NULL)")
            for step in (1000, 10, 1):
                while True:
                    try:
                        cur.execute("INSERT INTO filler (pad) "
                                    f"SELECT REPEAT('x', 255) FROM seq_1_to_{step}")
                    except pymysql.err.OperationalError as exc:
                        if exc.args[0] != TABLE_FULL:
                            raise
                        break
                    rows += step
    finally:
        conn.close()
    return rows


def _purged(mariadb: SmallDiskMariaDB) -> bool:
    """No committed transaction's undo log is left for InnoDB's purge to free."""
    with root_cursor(mariadb) as cur:
        cur.execute("SELECT `COUNT` FROM information_schema.INNODB_METRICS "
                    "WHERE NAME = 'trx_rseg_history_len'")
        return cur.fetchone()[0] == 0


def fill_table_pages(mariadb: SmallDiskMariaDB, database: str, insert_row: str,
                     row_params: Callable[[], tuple], misses: int = 50) -> int:
    """Insert rows (`insert_row` with row_params()) until `misses` in a row find no
    room; returns how many found room. With the data file full, the pages that
    `insert_row`'s rows go to are then full too."""
    conn = root(mariadb, database)
    taken, missed = 0, 0
    try:
        with conn.cursor() as cur:
            while missed < misses:
                try:
                    cur.execute(insert_row, row_params())
                    taken, missed = taken + 1, 0
                except pymysql.err.OperationalError as exc:
                    if exc.args[0] != TABLE_FULL:
                        raise
                    missed += 1
    finally:
        conn.close()
    return taken


def refused(mariadb: SmallDiskMariaDB, database: str, statement: str, params) -> bool:
    """The statement fails for want of room (1114); whatever happens, nothing changes."""
    conn = root(mariadb, database)
    try:
        with conn.cursor() as cur:
            conn.begin()
            try:
                cur.execute(statement, params)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != TABLE_FULL:
                    raise
                return True
            finally:
                conn.rollback()
        return False
    finally:
        conn.close()


def free_disk(mariadb: SmallDiskMariaDB) -> None:
    """Give the filler's room back (its pages are free again within about 0.5 s).

    The DROP itself writes to the full data file, and was refused once (1114) with a
    worker retrying its writes meanwhile: it is tried again until InnoDB's purge has
    freed the undo pages those writes left."""
    wait_for(lambda: _dropped_filler(mariadb), 60, "room to drop the filler database",
             interval=0.2)


def _dropped_filler(mariadb: SmallDiskMariaDB) -> bool:
    with root_cursor(mariadb) as cur:
        try:
            cur.execute(f"DROP DATABASE IF EXISTS {FILLER_DATABASE}")
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != TABLE_FULL:
                raise
            return False
    return True
