"""A MariaDB Galera cluster of our own (3 nodes by default), for tests that kill database nodes.

Started beside the machine's MariaDB as DESIGN.md ("Private services for tests that break
things") describes: each node has its own my.cnf, port and folder under one temp dir, and
is started and killed by its own pid, never touching the shared server on :3306.

    with PrivateGaleraCluster() as cluster:
        db_url = cluster.url_for("molteniron")   # the 3 nodes' URLs, comma-joined
        cluster.kill(cluster.writer_of("molteniron"))

Measured here (2 cores): three nodes Synced in about 11 s, about 0.25 GB on disk; a node
killed and started again at once rejoins in about 18 s with Galera's default timeouts
(its old incarnation must be evicted first), 5 s with fast_failure_detection.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pymysql

from bench.private import _Private, free_port, tail, wait_for

GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"
# Galera's base port B, then B+1 (IST) and B+2 (rsync SST) per node. Picked below the
# kernel's ephemeral range (32768+) so an outgoing connection cannot take one meanwhile.
GALERA_PORT_RANGE = (20000, 32000)
INNODB_LOG = "16M"       # instead of 96M: less for each state transfer to copy
START_TIMEOUT = 120.0   # a joiner copies the donor's data (rsync SST) before it answers
# Failure detection shortened at run time once Synced (set at start, it made joins drop
# the cluster out of primary): a killed peer is suspected after 2 s instead of 5 s.
FAST_FAILURE_DETECTION = ("evs.keepalive_period=PT0.5S;evs.inactive_check_period=PT0.5S;"
                          "evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;"
                          "evs.install_timeout=PT4S")


def free_port_block(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on now."""
    for _ in range(1000):
        first = random.randrange(*GALERA_PORT_RANGE)
        if all(_bindable(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports in {GALERA_PORT_RANGE}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class GaleraNode:
    """One mariadbd of the cluster: its folder, ports, config file and process."""

    def __init__(self, cluster_dir: Path, index: int):
        self.index = index
        self.dir = cluster_dir / f"node{index}"
        self.datadir = self.dir / "data"
        self.port = free_port()
        self.base_port = free_port_block(3)
        self.cnf = self.dir / "my.cnf"
        self.process: subprocess.Popen | None = None

    @property
    def gcomm_address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    def write_config(self, cluster_name: str, cluster_address: str) -> None:
        b = self.base_port
        provider_options = ";".join([f"base_port={b}", f"gmcast.listen_addr=tcp://127.0.0.1:{b}",
                                     f"ist.recv_addr=127.0.0.1:{b + 1}", "gcache.size=32M"])
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.cnf.write_text(f"""\
[mysqld]
datadir={self.datadir}
port={self.port}
bind-address=127.0.0.1
socket={self.dir / 'sock'}
pid-file={self.dir / 'pid'}
user=mysql
skip-log-bin
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
innodb_buffer_pool_size=64M
innodb_log_file_size={INNODB_LOG}
wsrep_on=ON
wsrep_provider={GALERA_PROVIDER}
wsrep_cluster_name={cluster_name}
wsrep_cluster_address={cluster_address}
wsrep_node_name=node{self.index}
wsrep_node_address={self.gcomm_address}
wsrep_provider_options="{provider_options}"
wsrep_sst_receive_address=127.0.0.1:{b + 2}
wsrep_sst_method=rsync
""")

    def start(self, new_cluster: bool = False) -> None:
        with open(self.dir / "mariadbd.log", "a") as log:
            # A session of its own: cleanup kills the node's SST helpers (rsync) with it.
            self.process = subprocess.Popen(
                ["mariadbd", f"--defaults-file={self.cnf}",
                 *(["--wsrep-new-cluster"] if new_cluster else [])],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def connect(self, **kwargs) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=2,
                               read_timeout=10, autocommit=True, **kwargs)

    def status(self, name: str) -> str | None:
        """A global status variable (e.g. wsrep_cluster_status); None if the node is unreachable."""
        try:
            conn = self.connect()
        except pymysql.err.OperationalError:
            return None
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE %s", (name,))
                row = cur.fetchone()
                return row[1] if row else None
        finally:
            conn.close()

    def synced(self) -> bool:
        if not self.alive:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"galera node{self.index} (:{self.port}) exited with "
                               f"{code}:\n{tail(self.dir / 'mariadbd.log')}")
        return self.status("wsrep_local_state_comment") == "Synced"

    def execute(self, sql: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def kill(self) -> None:
        """kill -9 the server only (what a crash does); its children, if any, stay."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)  # reap it: it is our child

    def kill_everything(self) -> None:
        """kill -9 the server and whatever it started (SST scripts, rsync daemons)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


class PrivateGaleraCluster(_Private):
    """`size` MariaDB Galera nodes on free ports; root over TCP, no password.

    fast_failure_detection: once all are Synced, set FAST_FAILURE_DETECTION on every node
    (False keeps Galera's defaults: a killed peer is noticed after about 5-6 s).
    """

    def __init__(self, size: int = 3, fast_failure_detection: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix="mi-galera-"))
        self.name = f"mi-galera-{uuid.uuid4().hex[:8]}"
        self.fast_failure_detection = fast_failure_detection
        self.isolated: set[int] = set()
        self.nodes = [GaleraNode(self.dir, i) for i in range(size)]
        address = "gcomm://" + ",".join(node.gcomm_address for node in self.nodes)
        for node in self.nodes:
            node.write_config(self.name, address)

    # --- addresses -------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """One URL per node, without a database."""
        return [f"mysql+pymysql://root@127.0.0.1:{node.port}/" for node in self.nodes]

    def urls_for(self, database: str) -> list[str]:
        return [url + database for url in self.urls]

    def url_for(self, database: str) -> str:
        """Every node's URL with `database`, comma-joined: a db_url with failover."""
        return ",".join(self.urls_for(database))

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> PrivateGaleraCluster:
        first = self.nodes[0]
        self._chown()  # mariadb-install-db --user=mysql writes into it
        done = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={first.datadir}", "--user=mysql",
             "--auth-root-authentication-method=normal", f"--innodb-log-file-size={INNODB_LOG}"],
            capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db: {done.stderr or done.stdout}")
        # All of it: an rsync SST run as root drops to nobody and cannot write otherwise.
        self._chown()
        first.start(new_cluster=True)
        wait_for(first.synced, START_TIMEOUT, f"galera node0 (:{first.port}) to bootstrap", 0.1)
        for node in self.nodes[1:]:  # one at a time: each joins through a state transfer
            self.start_node(node.index)
        if self.fast_failure_detection:
            for node in self.nodes:
                node.execute(f"SET GLOBAL wsrep_provider_options='{FAST_FAILURE_DETECTION}'")
        return self

    def _chown(self) -> None:
        shutil.chown(self.dir, "mysql", "mysql")
        for path in self.dir.rglob("*"):
            shutil.chown(path, "mysql", "mysql")

    def _stop_service(self) -> None:
        for node in self.nodes:
            node.kill_everything()

    # --- faults and repairs ------------------------------------------------------

    def kill(self, index: int) -> None:
        """kill -9 node `index`."""
        self.nodes[index].kill()

    def start_node(self, index: int) -> None:
        """Start node `index` (again) and wait until it has joined and is Synced."""
        node = self.nodes[index]
        node.start()
        wait_for(node.synced, START_TIMEOUT, f"galera node{index} (:{node.port}) to join", 0.1)
        if self.fast_failure_detection:
            node.execute(f"SET GLOBAL wsrep_provider_options='{FAST_FAILURE_DETECTION}'")

    def bootstrap(self, index: int) -> None:
        """Make node `index`'s component primary again: an operator's move after quorum is lost."""
        self.nodes[index].execute("SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'")

    def isolate(self, index: int) -> None:
        """Cut node `index` off from its peers (it stays up, answering clients)."""
        self.nodes[index].execute("SET GLOBAL wsrep_provider_options='gmcast.isolate=1'")
        self.isolated.add(index)

    def heal(self) -> None:
        """Every node back in one primary component and Synced, whatever happened before:
        survivors without quorum bootstrapped, isolated nodes reconnected, killed ones
        started again."""
        alive = self.alive()
        if not alive:
            raise RuntimeError("every galera node is down: nothing to heal from")
        if not self.primary():
            self.bootstrap(next(i for i in alive if i not in self.isolated))
        for index in sorted(self.isolated):
            if self.nodes[index].alive:
                self.nodes[index].execute("SET GLOBAL wsrep_provider_options='gmcast.isolate=0'")
        for index in sorted(self.isolated):
            if self.nodes[index].alive:
                node = self.nodes[index]
                wait_for(lambda node=node: (node.synced()
                                            and node.status("wsrep_cluster_status") == "Primary"),
                         START_TIMEOUT, f"galera node{index} to rejoin after isolation", 0.1)
        self.isolated.clear()
        for node in self.nodes:
            if not node.alive:
                self.start_node(node.index)
        size = str(len(self.nodes))
        wait_for(lambda: all(self.status(i, "wsrep_cluster_size") == size for i in self.alive()),
                 START_TIMEOUT, f"all {size} galera nodes in one cluster", 0.1)

    # --- what the cluster looks like ------------------------------------------------

    def alive(self) -> list[int]:
        return [node.index for node in self.nodes if node.alive]

    def status(self, index: int, name: str) -> str | None:
        """Global status `name` of node `index` (None if it does not answer)."""
        return self.nodes[index].status(name)

    def primary(self) -> list[int]:
        """The live nodes that are in the primary component and ready for clients."""
        return [i for i in self.alive() if self.status(i, "wsrep_cluster_status") == "Primary"
                and self.status(i, "wsrep_ready") == "ON"]

    def connections_by_node(self, database: str | None = None,
                            user: str | None = None) -> dict[int, int]:
        """Live node -> client connections on it using `database` (and/or logged in as `user`)."""
        where, params = ["ID <> CONNECTION_ID()", "COMMAND <> 'Daemon'"], []
        if database is not None:
            where.append("DB = %s")
            params.append(database)
        if user is not None:
            where.append("USER = %s")
            params.append(user)
        counts = {}
        for index in self.alive():
            try:
                # Dirty reads: a node out of the primary component refuses reads otherwise.
                conn = self.nodes[index].connect(init_command="SET SESSION wsrep_dirty_reads=1")
            except pymysql.err.OperationalError:
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE "
                                + " AND ".join(where), params)
                    counts[index] = cur.fetchone()[0]
            finally:
                conn.close()
        return {index: count for index, count in counts.items() if count}

    def writer_of(self, database: str | None = None, user: str | None = None) -> int:
        """The one live node holding the connections of `database`'s (or `user`'s) client.

        LookupError when none or several do (the client is moving between nodes)."""
        counts = self.connections_by_node(database, user)
        if len(counts) != 1:
            raise LookupError(f"connections of database={database!r} user={user!r} "
                              f"by node: {counts}")
        return next(iter(counts))
