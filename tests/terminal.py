"""The CLI run with its stdout on a terminal (a pty) of a given size."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from tests.stack import ROOT


def on_a_terminal(env: dict, *args: str, columns: int = 80) -> tuple[str, str]:
    """(stdout as the terminal shows it, stderr) of the CLI on a pty `columns` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {key: value for key, value in env.items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([sys.executable, "-m", "molteniron.clients.cli", *args],
                               env=env, cwd=ROOT, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.stderr is not None  # stderr=PIPE
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=60) == 0, stderr
    return b"".join(chunks).decode().replace("\r\n", "\n"), stderr
