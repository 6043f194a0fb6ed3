"""What one broker user who is not an admin may ask of the pool, so that nobody crowds
it out: config max_priority, max_waiting_per_user and max_wait_seconds."""

from __future__ import annotations

from molteniron import errors


class UserLimits:
    def __init__(self, max_priority: int, max_waiting_per_user: int, max_wait_seconds: float):
        self.max_priority = max_priority
        self.max_waiting_per_user = max_waiting_per_user
        self.max_wait_seconds = max_wait_seconds

    def check_allocate(self, args: dict) -> dict:
        """The allocate's arguments within the limits (a wait without an end waits
        max_wait_seconds); BadRequest naming the limit for a priority or wait beyond it."""
        priority = args["priority"]
        if not 0 <= priority <= self.max_priority:
            raise errors.BadRequest(f"allocate: priority must be between 0 and "
                                    f"{self.max_priority} (the worker's max_priority), "
                                    f"got {priority}")
        wait = args["wait_seconds"]
        if wait is not None and wait > self.max_wait_seconds:
            raise errors.BadRequest(f"allocate: wait_seconds must be at most "
                                    f"{self.max_wait_seconds:g} (the worker's "
                                    f"max_wait_seconds), got {wait:g}")
        if wait is None and args["wait"]:
            return {**args, "wait_seconds": self.max_wait_seconds}
        return args

    def check_waiting(self, user: str | None, waiting: int) -> None:
        """TooManyRequests when `user` already has `waiting` allocates at the limit."""
        if waiting >= self.max_waiting_per_user:
            raise errors.TooManyRequests(
                f"allocate: user {user} already has {waiting} waiting allocate(s), the "
                f"most the worker's max_waiting_per_user allows; release or cancel one, "
                f"or wait without queueing (--no-wait)")
