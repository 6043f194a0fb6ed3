"""Worker processes whose wall clock is not the machine's: libfaketime (Debian package
`faketime`), as measured in DESIGN.md "Host faults and a real browser".

`FAKETIME_DONT_FAKE_MONOTONIC=1 faketime -m -f '+7h' CMD` only puts LD_PRELOAD and
FAKETIME in CMD's environment; these helpers put them in a worker's environment
(tests' Stack.start_worker(env=...), bench's Sandbox.start_worker(env=...)). A clock that
steps while the worker runs reads its offset from a file at every reading instead; the
faketime command cannot do that, since its FAKETIME takes precedence over the file.
time.monotonic() is left alone.

Measured with libfaketime 0.9.10: under FAKETIME_DONT_FAKE_MONOTONIC, time.sleep()
fails with EINVAL (clock_nanosleep gets a negative absolute monotonic time), while
select, poll and threading waits work. The worker sleeps with time.sleep() only
after losing the broker, which these tests do not do.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

# What `faketime -m` preloads; ld.so expands $LIB (x86_64-linux-gnu here).
PRELOAD = "/usr/$LIB/faketime/libfaketimeMT.so.1"


class FaketimeMissing(RuntimeError):
    """libfaketime is not installed."""


def require_faketime() -> None:
    if not (shutil.which("faketime") and glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")):
        raise FaketimeMissing("libfaketime is not installed (Debian: apt-get install -y "
                              "faketime; .ci/run installs it)")


def wall_clock_off_by(offset: str) -> dict[str, str]:
    """A worker environment whose wall clock runs `offset` ('+7h', '-1h') from the machine's."""
    require_faketime()
    return {"LD_PRELOAD": PRELOAD, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


class SteppedWallClock:
    """A wall clock whose offset a test changes while the worker runs (step): the
    worker reads the file at every reading of the time (FAKETIME_NO_CACHE)."""

    def __init__(self, path: Path, offset: str = "+0"):
        require_faketime()
        self.path = path
        self.step(offset)

    def step(self, offset: str) -> None:
        """From the worker's next reading of the time on, its wall clock is off by offset."""
        fresh = self.path.with_suffix(".new")
        fresh.write_text(f"{offset}\n")
        os.replace(fresh, self.path)  # whole: never an empty file read halfway

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": PRELOAD, "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
