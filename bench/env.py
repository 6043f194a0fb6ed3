"""An isolated place on the local services: its own vhost and database, its own workers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from sqlalchemy import make_url, text

from molteniron import db

if TYPE_CHECKING:
    from molteniron.clients.client import MoltenIronClient

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("MOLTENIRON_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
DB_URL = os.environ.get("MOLTENIRON_TEST_DB_URL", "mysql+pymysql://root@127.0.0.1:3306/")


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {said}")
    return done.stdout


default_rabbitmqctl = rabbitmqctl  # Sandbox's parameter of the same name shadows it


def vhost_url(amqp_url: str, vhost: str) -> str:
    """amqp_url with its vhost replaced by `vhost` (quoted: "/" is %2F)."""
    return f"{amqp_url.rsplit('/', 1)[0]}/{quote(vhost, safe='')}"


class Sandbox:
    """A vhost + database made for one run and removed by close().

    By default on the machine's services (AMQP_URL, DB_URL, plain rabbitmqctl); give
    `amqp_url`, `db_url` and a `rabbitmqctl(*args) -> str` to run elsewhere, e.g. on
    the private instances of bench/private.py.
    """

    def __init__(self, label: str, amqp_url: str | None = None, db_url: str | None = None,
                 rabbitmqctl: Callable[..., str] | None = None):
        self.name = f"molteniron_{label}_{uuid.uuid4().hex[:8]}"
        amqp_url = amqp_url or AMQP_URL
        self.rabbitmqctl = rabbitmqctl or default_rabbitmqctl
        self.rabbitmqctl("add_vhost", self.name)
        user = make_url_user(amqp_url)
        self.rabbitmqctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        self.amqp_url = vhost_url(amqp_url, self.name)
        self.db_url = make_url(db_url or DB_URL).set(database=self.name).render_as_string(
            hide_password=False)
        try:
            db.create_database(self.db_url)
            self.engine = db.make_engine(self.db_url)
            db.migrate(self.engine)
        except Exception:  # whatever failed, the vhost made above must not stay behind
            self.rabbitmqctl("delete_vhost", self.name)
            raise
        self.workers: list[subprocess.Popen] = []
        self.logdir = ROOT / "bench" / "logs"
        self.logdir.mkdir(exist_ok=True)

    @property
    def env(self) -> dict:
        return {**os.environ, "MOLTENIRON_AMQP_URL": self.amqp_url,
                "MOLTENIRON_DB_URL": self.db_url, "MOLTENIRON_CONFIG": os.devnull,
                "PYTHONPATH": str(ROOT),
                "MOLTENIRON_ADMINS": os.environ.get("MOLTENIRON_ADMINS", "off")}

    def start_worker(self, *extra: str, env: dict | None = None,
                     module: str = "molteniron.workers.main") -> subprocess.Popen:
        log = open(self.logdir / f"{self.name}-{len(self.workers)}.log", "w")
        args = [sys.executable, "-m", module, *extra]
        if module == "molteniron.workers.main":
            args += ["--no-migrate", "--worker-id", f"bench-{len(self.workers)}"]
        worker = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
        self.workers.append(worker)
        return worker

    def wait_answering(self, timeout: float = 30) -> None:
        from molteniron.clients.client import MoltenIronClient
        deadline = time.monotonic() + timeout
        while True:
            try:
                with MoltenIronClient(self.amqp_url, timeout=2) as client:
                    # Any answer will do (the echo worker's has no nodes); filtered to
                    # nothing, so that it is quick whatever the pool's size.
                    client.call("status", {"owner": "(probe)"})
                return
            except Exception as err:  # not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not answer within {timeout}s") from err
                time.sleep(0.1)

    def worker_rss_mb(self, index: int = 0) -> float:
        """Resident memory of worker `index`, in MB."""
        status = Path(f"/proc/{self.workers[index].pid}/status").read_text()
        kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        return round(kb / 1024, 1)

    def stop_workers(self) -> None:
        stop_processes(self.workers)
        self.workers.clear()

    def sql(self, query: str, **params) -> list[tuple]:
        with self.engine.begin() as conn:
            result = conn.execute(text(query), params)
            return [tuple(r) for r in result] if result.returns_rows else []

    def close(self) -> None:
        self.stop_workers()
        self.engine.dispose()
        server = db.make_engine(make_url(self.db_url).set(database="").render_as_string(
            hide_password=False))
        with server.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{self.name}`"))
        server.dispose()
        self.rabbitmqctl("delete_vhost", self.name)


def pump(client: MoltenIronClient, seconds: float) -> None:
    """Let a connected client's connection take in what arrives for up to `seconds`."""
    connection = client.connection
    assert connection is not None, "the client is not connected"
    connection.process_data_events(time_limit=seconds)


def stop_processes(processes: list[subprocess.Popen], grace: float = 20) -> None:
    """SIGTERM every process, wait for it, SIGKILL what does not stop within `grace`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_url_user(amqp_url: str) -> str:
    import pika
    return pika.URLParameters(amqp_url).credentials.username


def add_nodes(sandbox: Sandbox, count: int, node_pool: str = "default", prefix: str = "n") -> None:
    """Bulk-insert ready nodes straight into the database (before the worker starts)."""
    rows = [{"name": f"{prefix}{i}", "ipmi_ip": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
             "pool": node_pool} for i in range(count)]
    with sandbox.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (name, ipmi_ip, ipmi_user, ipmi_password, port_hwaddr, cpu_arch,"
            " cpus, ram_mb, disk_gb, node_pool, state, extra) VALUES (:name, :ipmi_ip, 'admin',"
            " 'pw', '52:54:00:00:00:00', 'x86_64', 8, 16384, 200, :pool, 'ready', '{}')"), rows)
        conn.execute(text("INSERT INTO node_ips (node_id, position, ip) "
                          "SELECT id, 0, CONCAT('192.168.0.', id % 250) FROM nodes "
                          "WHERE id NOT IN (SELECT node_id FROM node_ips)"))


RESULTS = ROOT / "bench" / "results"


def save_results(run: dict, name: str) -> Path:
    """Write a run to bench/results/<today>-<name>.json; return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{date.today().isoformat()}-{name}.json"
    path.write_text(json.dumps(run, indent=2) + "\n")
    return path


def machine() -> dict:
    """What the figures were measured on."""
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "host": platform.node(), "cores": os.cpu_count(), "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "mariadb": version(["mariadb", "-uroot", "-N", "-e", "SELECT VERSION()"]),
        "rabbitmq": version(["rabbitmqctl", "version"]),
        "git_commit": commit + ("+dirty" if dirty else ""),
    }
