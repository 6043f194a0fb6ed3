"""The inventory file on the client's side: YAML out and in, and an original MoltenIron database.

The worker checks and applies an inventory (molteniron/inventory.py); here it
is only read and written. Imports no SQLAlchemy: reading an original database
imports it (and its driver) inside read_original only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import yaml

from molteniron import errors
from molteniron.compat import HARDWARE_FIELDS

HEADER = ("# MoltenIron inventory: `molteniron import FILE` adds or updates these nodes by name.\n"
          "# ipmi_password ******** keeps the stored password; state applies only ready or\n"
          "# maintenance, and only to nodes that are not allocated.\n")


# --- YAML ----------------------------------------------------------------------

def dump(entries: list[dict]) -> str:
    """The inventory file's text: a header comment, then `nodes:` and one entry per node."""
    return HEADER + yaml.safe_dump({"nodes": entries}, sort_keys=False, allow_unicode=True,
                                   default_flow_style=None, width=100)


def refuse_symlink(path: str) -> None:
    """BadRequest if path is a symbolic link: export writes no file through one."""
    if os.path.islink(path):
        raise errors.BadRequest(
            f"export: {path} is a symbolic link; refusing to write through it (where it "
            f"points may be a file that is not yours to replace): remove it or name "
            f"another file")


def write(path: str, text: str, secret: bool) -> None:
    """Write the file whole or not at all; readable by its owner only when it holds passwords.

    The text goes to a new file in the same directory, which then replaces path:
    a reader never sees half a file, and nothing is written through a link at path
    (a symbolic link is refused; a hard link keeps the old content)."""
    refuse_symlink(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        # mkstemp makes the file with mode 600 and O_EXCL: no one else opened it first.
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".molteniron-export-",
                                         suffix=".tmp")
    except OSError as exc:
        raise errors.BadRequest(f"export: cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if not secret:  # the mode an ordinary new file would get
                os.fchmod(out.fileno(), 0o666 & ~_umask())
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        refuse_symlink(path)  # made one meanwhile? (os.replace would replace the link)
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise errors.BadRequest(f"export: cannot write {path}: {exc.strerror}") from None
        raise
    _sync_directory(directory)


def _umask() -> int:
    mask = os.umask(0o077)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def _sync_directory(directory: str) -> None:
    """The rename on disk too. Best effort: the file is complete and in place already,
    and some file systems refuse to open or sync a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that 52:54:00:12:34:56 stays a string.

    YAML 1.1 reads digits separated by colons as a base-60 number, which would
    turn an unquoted MAC address into an integer.
    """


def _number_or_text(kind: str):
    construct = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

    def constructor(loader, node):
        if ":" in node.value:
            return loader.construct_scalar(node)
        return construct(loader, node)
    return constructor


_Loader.add_constructor("tag:yaml.org,2002:int", _number_or_text("int"))
_Loader.add_constructor("tag:yaml.org,2002:float", _number_or_text("float"))


def load(text: str) -> dict:
    """The inventory in a file's text, as the import request carries it ({"nodes": [...]}).

    A bare list of entries is accepted too. Values YAML reads as dates or times
    become their ISO text: the request is JSON.
    """
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise errors.BadRequest(f"the inventory is not valid YAML: {exc}") from None
    if isinstance(data, list):
        data = {"nodes": data}
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise errors.BadRequest("the inventory must be a list of nodes, or a mapping whose "
                                "key nodes holds that list")
    return json.loads(json.dumps(data, default=_iso))


def read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as source:
            return load(source.read())
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.BadRequest(f"cannot read {path}: {exc}") from None


def _iso(value: Any) -> str:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


# --- the original MoltenIron's database -------------------------------------------

# The password of an original database, so that it need not be in the URL on the
# command line (where ps shows it to every user of the machine).
ORIGINAL_DB_PASSWORD_ENV = "MOLTENIRON_ORIGINAL_DB_PASSWORD"
ORIGINAL_DB_URL_FORM = "mysql+pymysql://USER@HOST:PORT/DATABASE"
# The backends the original ran on, and the one driver the CLI brings (PyMySQL).
_ORIGINAL_BACKENDS = ("mysql", "mariadb")
_ORIGINAL_DRIVER = "pymysql"


def original_url(db_url: str, password: str | None = None):
    """The SQLAlchemy URL to read an original database at: mysql:// (and mariadb://)
    read with PyMySQL, `password` (if given) replacing the URL's."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(db_url)
    except (ArgumentError, ValueError):  # its text may hold a password: not echoed
        raise errors.BadRequest(f"--from-original: not a database URL; expected "
                                f"{ORIGINAL_DB_URL_FORM}") from None
    backend, _, driver = url.drivername.partition("+")
    if backend not in _ORIGINAL_BACKENDS or driver not in ("", _ORIGINAL_DRIVER):
        raise errors.BadRequest(
            f"--from-original: unsupported database URL {url.drivername}://...: the original "
            f"MoltenIron's MySQL/MariaDB database is read with PyMySQL: "
            f"{ORIGINAL_DB_URL_FORM} (mysql:// means the same)")
    url = url.set(drivername=f"{backend}+{_ORIGINAL_DRIVER}")
    return url.set(password=password) if password else url


def read_original(db_url: str, password: str | None = None) -> tuple[dict, list[str]]:
    """(inventory, notes) read from an original MoltenIron database (tables Nodes and IPs).

    password, if given, replaces the one in db_url."""
    from sqlalchemy import create_engine, text  # only this command needs a database
    from sqlalchemy.exc import DBAPIError

    url = original_url(db_url, password)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            nodes = [dict(row) for row in conn.execute(text(
                "SELECT id, name, ipmi_ip, `blob`, status, provisioned, node_pool "
                "FROM Nodes ORDER BY id")).mappings()]
            ips = [tuple(row) for row in conn.execute(text(
                "SELECT node_id, ip FROM IPs ORDER BY id"))]
    except DBAPIError as exc:
        where = url.render_as_string(hide_password=True)
        raise errors.BadRequest(f"--from-original: cannot read Nodes and IPs at {where}: "
                                f"{exc.orig}") from None
    finally:
        engine.dispose()
    return from_original(nodes, ips)


def from_original(nodes: list[dict], ips: list[tuple]) -> tuple[dict, list[str]]:
    """The original's rows as an inventory, plus notes for the operator.

    Every node comes in ready: nodes the original had provisioned belong to
    jobs of the old system, which will never release them here.
    """
    pools: dict[Any, list[str]] = {}
    for node_id, ip in ips:
        pools.setdefault(node_id, []).append(ip)
    entries, provisioned = [], []
    for row in nodes:
        try:
            blob = json.loads(row["blob"] or "{}")
        except ValueError as exc:
            raise errors.BadRequest(f"--from-original: Nodes id {row['id']} ({row['name']}): "
                                    f"blob is not JSON: {exc}") from None
        if not isinstance(blob, dict):
            raise errors.BadRequest(f"--from-original: Nodes id {row['id']} ({row['name']}): "
                                    "blob is not a JSON object")
        entry = {"name": row["name"], "ipmi_ip": row["ipmi_ip"],
                 **{key: blob[key] for key in HARDWARE_FIELDS if key in blob},
                 "allocation_pool": pools.get(row["id"], []),
                 "node_pool": row["node_pool"] or "default",
                 "extra": {k: v for k, v in blob.items() if k not in HARDWARE_FIELDS},
                 "state": "ready"}
        entry.setdefault("ipmi_password", "")
        entries.append(entry)
        if row["provisioned"] or row["status"] not in ("ready", None):
            provisioned.append(f"{row['name']} ({row['status']}"
                               + (f", provisioned by {row['provisioned']})" if row["provisioned"]
                                  else ")"))
    notes = []
    if provisioned:
        notes.append(f"{len(provisioned)} node(s) not ready in the original are imported as "
                     f"ready: {', '.join(provisioned)}")
    return {"nodes": entries}, notes
