"""Driving the bash completion `molteniron completion bash` writes (install.sh installs
it): what bash would offer, without a terminal."""

from __future__ import annotations

import subprocess


def registered(script: str) -> str:
    """What `complete -p molteniron` says once the script is sourced."""
    done = subprocess.run(["bash", "-c", '. "$1"; complete -p molteniron', "bash", script],
                          capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def complete(script: str, *words: str) -> list[str]:
    """What bash completes for the words typed so far (the last one being completed)."""
    probe = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _molteniron; '
             'printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", probe, "bash", script, *words], capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.split()
