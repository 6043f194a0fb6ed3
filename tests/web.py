"""A molteniron-web process for tests: started on a free port against a stack, asked
over HTTP, stopped (and its log shown) at the end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from bench.env import stop_processes
from tests.stack import ROOT, wait_until


class Answer:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:300]!r})"


class WebProcess:
    def __init__(self, env: dict, logdir: Path, *args: str, name: str = "web"):
        self.log_path = logdir / f"{name}.log"
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "molteniron.clients.web", "--address", "127.0.0.1:0", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        self.url = wait_until(self._serving, 30, "molteniron-web to serve")

    def _serving(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"molteniron-web exited {self.process.returncode}:\n"
                                 f"{self.log()[-3000:]}")
        found = re.search(r"event=serving url=(\S+)/ ", self.log())
        return found.group(1) if found else None

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str, headers: dict | None = None, timeout: float = 30) -> Answer:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, exc.headers, exc.read())

    def stop(self) -> None:
        stop_processes([self.process])


def add_nodes(stack, *numbers: int, pool: str = "default", tags: str | None = None) -> None:
    """node_args(i, pool) nodes, added over one connection (a CLI each costs a second)."""
    from tests.stack import node_args
    with stack.client() as client:
        for i in numbers:
            (name, ipmi_ip, ipmi_user, ipmi_password, allocation_pool, port_hwaddr, cpu_arch,
             cpus, ram_mb, disk_gb, node_pool) = node_args(i, pool)
            client.add_baremetal(name=name, ipmi_ip=ipmi_ip, ipmi_user=ipmi_user,
                                 ipmi_password=ipmi_password, allocation_pool=allocation_pool,
                                 port_hwaddr=port_hwaddr, cpu_arch=cpu_arch, cpus=int(cpus),
                                 ram_mb=int(ram_mb), disk_gb=int(disk_gb), node_pool=node_pool,
                                 tags=tags)
