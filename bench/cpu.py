"""Where a load's CPU goes: each party's CPU time over a window, from /proc.

The clients, the broker, the database and the worker share this machine's
cores. When the cores are full (the machine is hardly idle), a cycle costs
what all of them spend on it, not only what the worker spends: the figures
say how much each party adds.
"""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BROKER, DATABASE = "beam.smp", "mariadbd"


def process_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (command name, user + system clock ticks)} of every process now."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                line = stat.read()
        except OSError:  # it ended meanwhile
            continue
        name = line[line.index("(") + 1:line.rindex(")")]
        fields = line[line.rindex(")") + 2:].split()
        ticks[int(entry)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(all ticks, idle + iowait ticks) of every core since boot."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


class CpuMeter:
    """CPU seconds per party between start() and stop(). Parties: the worker's and the
    clients' processes (by pid, children included when they are threads, not forks),
    the broker and the database (by command name), and everything else."""

    def __init__(self, worker_pids: list[int], client_pids: list[int] | None = None):
        self.worker_pids = set(worker_pids)
        self.client_pids = set(client_pids or ())
        self.before: dict[int, tuple[str, int]] = {}
        self.machine_before = (0, 0)
        self.seconds: dict[str, float] = {}
        self.idle = 0.0

    def party(self, pid: int, name: str) -> str:
        if pid in self.worker_pids:
            return "worker"
        if pid in self.client_pids:
            return "clients"
        return {BROKER: "broker", DATABASE: "database"}.get(name, "other")

    def start(self) -> None:
        self.before, self.machine_before = process_ticks(), machine_ticks()

    def stop(self) -> None:
        after, (total, idle) = process_ticks(), machine_ticks()
        seconds = dict.fromkeys(("worker", "broker", "database", "clients", "other"), 0.0)
        for pid, (name, ticks) in after.items():
            spent = ticks - self.before.get(pid, (name, 0))[1]
            seconds[self.party(pid, name)] += spent / CLOCK_TICKS
        self.seconds = seconds
        elapsed = total - self.machine_before[0]
        self.idle = (idle - self.machine_before[1]) / elapsed if elapsed else 0.0

    def per_cycle_ms(self, cycles: int) -> dict:
        """Each party's CPU per cycle, in ms, and the machine's idle share."""
        return {**{party: round(s * 1000 / cycles, 3) if cycles else None
                   for party, s in self.seconds.items()},
                "machine_idle": round(self.idle, 3)}
