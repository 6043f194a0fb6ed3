"""What a job asks of its nodes beyond a pool: arch, minimum CPUs/RAM/disk, tags.

An allocate matches a node only if the node meets every constraint it gives;
an allocate without constraints matches every node of its pool (the fast path:
the lowest ready ids, no scan).
"""

from __future__ import annotations

from dataclasses import dataclass

from molteniron.node_record import NodeRecord


@dataclass(frozen=True)
class Constraints:
    arch: str | None = None
    min_cpus: int = 0
    min_ram_mb: int = 0
    min_disk_gb: int = 0
    tags: frozenset[str] = frozenset()

    @classmethod
    def from_args(cls, args: dict) -> Constraints:
        return cls(arch=args.get("arch"), min_cpus=args.get("min_cpus") or 0,
                   min_ram_mb=args.get("min_ram_mb") or 0,
                   min_disk_gb=args.get("min_disk_gb") or 0,
                   tags=frozenset(args.get("tags") or ()))

    @classmethod
    def from_row(cls, data: dict | None) -> Constraints:
        return cls.from_args(data or {})

    def to_row(self) -> dict | None:
        """What waiting_requests.constraints stores (None: no constraint)."""
        if self.any:
            return None
        return {"arch": self.arch, "min_cpus": self.min_cpus, "min_ram_mb": self.min_ram_mb,
                "min_disk_gb": self.min_disk_gb, "tags": sorted(self.tags)}

    @property
    def any(self) -> bool:
        """True when every node of the pool would do."""
        return (self.arch is None and not self.min_cpus and not self.min_ram_mb
                and not self.min_disk_gb and not self.tags)

    def matches(self, record: NodeRecord) -> bool:
        return ((self.arch is None or record.cpu_arch == self.arch)
                and record.cpus >= self.min_cpus and record.ram_mb >= self.min_ram_mb
                and record.disk_gb >= self.min_disk_gb
                and self.tags <= set(record.tags))

    def describe(self) -> str:
        parts = ([f"arch {self.arch}"] if self.arch else []) + [
            f"{name} >= {value}" for name, value in (
                ("cpus", self.min_cpus), ("ram_mb", self.min_ram_mb),
                ("disk_gb", self.min_disk_gb)) if value
        ] + [f"tag {t}" for t in sorted(self.tags)]
        return ", ".join(parts)


ANY = Constraints()
