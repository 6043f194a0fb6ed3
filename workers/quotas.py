"""Quotas: the most nodes each broker user may hold at once (config `quotas`).

An allocate that would take a user past its quota waits, without keeping
nodes from anyone else; one asking for more than the quota itself is 409.
"""

from __future__ import annotations

from molteniron import errors

EVERYONE = "*"


class Quotas:
    def __init__(self, limits: dict | None):
        self.limits = dict(limits or {})

    def limit(self, user: str | None) -> int | None:
        """The user's quota (None: none)."""
        if not self.limits:
            return None
        return self.limits.get(user or "", self.limits.get(EVERYONE))

    def check_count(self, user: str | None, count: int) -> None:
        limit = self.limit(user)
        if limit is not None and count > limit:
            raise errors.Conflict(f"{count} node(s) is more than the quota of user {user} "
                                  f"({limit}): this allocate can never be served")

    def allows(self, user: str | None, count: int, held: int) -> bool:
        limit = self.limit(user)
        return limit is None or held + count <= limit

    def held_back(self, user: str | None, count: int, held: int) -> str | None:
        """Why an allocate of `count` nodes by `user`, who holds `held`, must wait for its
        quota (None: the quota lets it through): which quota, what is held, the limit."""
        limit = self.limit(user)
        if limit is None or held + count <= limit:
            return None
        entry = user if (user or "") in self.limits else EVERYONE
        return (f"user {user} holds {held} node(s) and its quota (quotas: {entry!r}) is "
                f"{limit}: {count} more would make {held + count}")
