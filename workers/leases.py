"""Leases: every allocation ends by itself unless renewed, so a job that dies
after its pre-hook cannot keep nodes forever. The worker's timer takes back
what has expired (PoolState.expire); this module says how long a lease is."""

from __future__ import annotations

from datetime import datetime, timedelta

from molteniron import errors


class LeasePolicy:
    def __init__(self, default_seconds: int, max_seconds: int):
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds

    def check(self, asked: int | None) -> None:
        """400 naming the cap when a lease longer than max_lease_seconds is asked for."""
        if asked is not None and asked > self.max_seconds:
            raise errors.BadRequest(f"a lease of {asked}s is longer than the cap "
                                    f"max_lease_seconds={self.max_seconds}s")

    def until(self, now: datetime, asked: int | None) -> datetime:
        """When a lease asked for now ends (the default when none was asked for).

        Rounded up to a whole second: replies and status show whole seconds, and a
        lease read back from them must be the very one the timer keeps.
        """
        end = now + timedelta(seconds=min(asked or self.default_seconds, self.max_seconds))
        return end.replace(microsecond=0) + timedelta(seconds=1 if end.microsecond else 0)
