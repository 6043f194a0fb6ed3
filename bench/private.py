"""A MariaDB server and a RabbitMQ node of our own, for tests and benches that break things.

The machine's shared MariaDB (:3306) and RabbitMQ (rabbit@localhost, :5672) serve
other people's work too, so nothing here ever touches them: each instance gets free
ports, its own folder under a temp dir, and is stopped by its own pid.

    with PrivateMariaDB() as mariadb, PrivateRabbitMQ() as rabbit:
        Sandbox("faults", amqp_url=rabbit.url, db_url=mariadb.url, rabbitmqctl=rabbit.ctl)
        mariadb.restart(); rabbit.restart()

Measured here (2 cores, 3 runs): MariaDB installs and starts in 0.7-0.8 s, restarts
in about 0.2 s and stops in 0.1 s (about 115 MB on disk); a RabbitMQ node starts in
3.4-4.3 s, restarts its app (stop_app/start_app) in 1.1-2.0 s or fully in 6.4-7.4 s,
and stops in about 3.5 s.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# rabbitmqctl's own distribution ports (rabbitmq-env's default); a node must not take them.
CTL_DIST_PORTS = range(35672, 35683)
PRIVATE_PORTS_FROM = 20000  # private services' ports: from here to the ephemeral range


def free_port() -> int:
    """A port nothing is bound to right now, below the kernel's ephemeral range.

    A private broker or database keeps its port across a restart; a port from the
    ephemeral range (the kernel's pick for port 0) may meanwhile become the local port
    of any outgoing connection on the machine, and the restart then fails with
    eaddrinuse (seen in a parallel run of the suite)."""
    low = _ephemeral_low()
    while True:
        port = secrets.randbelow(low - PRIVATE_PORTS_FROM) + PRIVATE_PORTS_FROM
        if port in CTL_DIST_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (32768 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(int(f.read().split()[0]), PRIVATE_PORTS_FROM + 1000)
    except (OSError, ValueError, IndexError):
        return 32768


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition()` until it is true; RuntimeError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout}s")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaps yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def end_process(pid: int, grace: float = 60) -> None:
    """SIGTERM `pid`, wait for it to exit, SIGKILL it if it has not within `grace` s."""
    try:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: process_gone(pid), grace, f"process {pid} to exit after SIGTERM")
    except ProcessLookupError:
        return
    except RuntimeError:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid), 10, f"process {pid} to exit after SIGKILL")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Private:
    """A service of a test's own in a folder of its own: a context manager that
    starts it, and stops it and removes the folder whatever happened."""

    dir: Path

    def start(self):
        raise NotImplementedError

    def _stop_service(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the service (by its own pid) and remove everything it had."""
        try:
            self._stop_service()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class PrivateMariaDB(_Private):
    """A mariadbd on a free port with its own datadir; root over TCP, no password."""

    # Server options given to both mariadb-install-db and mariadbd (a subclass's).
    OPTIONS: tuple[str, ...] = ()

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mi-mariadb-"))
        self.datadir = self.dir / "data"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/"

    def start(self) -> PrivateMariaDB:
        # Its temporary tables in a folder of its own, not the machine's /tmp: a bootstrap
        # once found its temporary table's file gone there (1051, install aborted).
        tmpdir = self.dir / "tmp"
        tmpdir.mkdir(exist_ok=True)
        if not self.datadir.exists():
            done = subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                 "--auth-root-authentication-method=normal", f"--tmpdir={tmpdir}", *self.OPTIONS],
                capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"mariadb-install-db: {done.stderr or done.stdout}")
        with open(self.dir / "mariadbd.log", "a") as log:
            self.process = subprocess.Popen(
                ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
                 "--bind-address=127.0.0.1", f"--socket={self.dir / 'sock'}",
                 f"--pid-file={self.dir / 'pid'}", "--user=root", "--skip-log-bin",
                 f"--tmpdir={tmpdir}", *self.OPTIONS],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._accepts_connections, 60,
                 f"private MariaDB on :{self.port} to accept connections")
        return self

    def _accepts_connections(self) -> bool:
        import pymysql
        assert self.process is not None  # start() made it
        if self.process.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {self.process.returncode}:\n"
                               f"{tail(self.dir / 'mariadbd.log')}")
        try:
            pymysql.connect(host="127.0.0.1", port=self.port, user="root",
                            connect_timeout=1).close()
            return True
        except pymysql.err.OperationalError:
            return False

    def _stop_service(self) -> None:
        if self.process is None:
            return
        pid_file = self.dir / "pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else self.process.pid
        end_process(pid)
        self.process.wait(timeout=10)  # reap it: it is our child
        self.process = None

    def restart(self) -> None:
        """SIGTERM the server, wait for it to exit, start it again on the same port and data."""
        self._stop_service()
        self.start()



class PrivateRabbitMQ(_Private):
    """A RabbitMQ node (mi-test-<random>@localhost) beside the machine's, on free ports.

    The scripts in /usr/lib/rabbitmq/bin are called directly: the /usr/sbin wrappers
    switch to the rabbitmq user and the system node's cookie, env file and log.
    """

    def __init__(self, name: str | None = None, directory: Path | None = None,
                 cookie: str | None = None):
        """name: the node's name before @localhost; directory: its folder (made if
        missing); cookie: its Erlang cookie (the nodes of one cluster share theirs)."""
        self.dir = Path(tempfile.mkdtemp(prefix="mi-rabbitmq-")) if directory is None else directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = f"{name or 'mi-test-' + secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid_file = self.dir / "pid"
        home = self.dir / "home"
        home.mkdir()
        cookie_file = home / ".erlang.cookie"
        cookie_file.write_text(cookie or secrets.token_hex(16).upper())
        cookie_file.chmod(0o400)  # Erlang refuses a cookie others can read
        (self.dir / "rabbitmq-env.conf").touch()  # empty: the system one sets NODENAME
        (self.dir / "conf.d").mkdir()
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(home),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILES": str(self.dir / "conf.d"),
            # No such file: without this the node reads /etc/rabbitmq/rabbitmq.conf,
            # whose listener is the shared node's 5672.
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            # Like the system node: Erlang distribution on loopback only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.pid: int | None = None

    @property
    def url(self) -> str:
        # guest may log in from localhost only, which is where we are.
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """rabbitmqctl on this node only; RuntimeError if it fails (as bench.env.rabbitmqctl)."""
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.node} {' '.join(args)}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def start(self) -> PrivateRabbitMQ:
        self.pid_file.unlink(missing_ok=True)
        with open(self.dir / "server.out", "a") as out:
            subprocess.run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"], env=self.env,
                           stdout=out, stderr=subprocess.STDOUT, check=True, timeout=60)
        # `wait` rather than await_startup: the latter fails before the node has registered.
        try:
            self.ctl("wait", str(self.pid_file), "--timeout", "120", timeout=150)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{tail(self.dir / 'server.out')}") from None
        self.pid = int(self.pid_file.read_text())
        return self

    def restart(self, full: bool = False) -> None:
        """stop_app/start_app (connections drop, durable data stays); `full`: stop the
        node's process too and start it again on the same ports and data."""
        if full:
            self._stop_service()
            self.start()
        else:
            self.ctl("stop_app")
            self.ctl("start_app")

    def kill(self) -> None:
        """kill -9 the node's Erlang VM (what a crash does); start() brings it back on the
        same ports and data."""
        self._adopt_pid()
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid = self.pid
        wait_for(lambda: process_gone(pid), 10, f"rabbitmq node {self.node} to die")
        self.pid_file.unlink(missing_ok=True)  # so stopping it later does not look for it
        self.pid = None

    def _adopt_pid(self) -> None:
        if self.pid is None and self.pid_file.exists():  # a start that failed half way
            self.pid = int(self.pid_file.read_text())

    def _stop_service(self) -> None:
        self._adopt_pid()
        if self.pid is None:
            return
        try:
            # with the pid file it returns once the node is gone
            self.ctl("stop", str(self.pid_file))
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # whatever the CLI says, make sure below
        end_process(self.pid)
        self.pid = None



def shared_service_pids(ports: tuple[int, ...] = (3306, 5672)) -> dict[int, int | None]:
    """Read only: the pid listening on each of the machine's shared service ports."""
    pids: dict[int, int | None] = {}
    for port in ports:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=30).stdout
        found = re.search(r"pid=(\d+)", out)
        pids[port] = int(found.group(1)) if found else None
    return pids
