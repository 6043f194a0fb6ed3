"""The bad-input suite (bench/badinput/), short: 1000 raw messages and 50 Hypothesis examples.

Runs on the real local RabbitMQ and MariaDB in a Sandbox of its own; if they are
down the Sandbox raises, so these tests error out rather than skip. The kinds in
ONCE_FATAL each killed, wedged or silenced the worker before it was fixed; they
also run alone, so a regression names its kind.
"""

from __future__ import annotations

import json

import pytest

from bench import badinput

SEED = 20261125
ONCE_FATAL = {
    "deep_nesting": "JSON nested ~1000 deep raised RecursionError: the worker exited",
    "lone_surrogates": "a lone surrogate in a string reached PyMySQL: the worker exited",
    "infinite_deadlines": "an Infinity deadline could not be stored: the worker retried forever",
    "internal_ops": "a client's 'tick' with reply_to was consumed and never answered",
    "long_request_ids": "cancel with a 65-255 char request_id was dead-lettered without a reply",
}


@pytest.fixture(scope="module")
def figures() -> dict:
    """One short run of every kind of bad input."""
    return badinput.run(messages=1000, examples=50, seed=SEED)


def explain(figures: dict) -> str:
    return badinput.summary(figures) + "\n" + json.dumps(figures, indent=1, default=str)[:4000]


@pytest.mark.parametrize("check", badinput.CHECKS)
def test_check(figures, check):
    assert figures["checks"][check], explain(figures)


def test_the_short_run_covers_both_phases(figures):
    assert figures["raw"]["sent"] >= 1000
    assert figures["raw"]["routes"].get("ours", 0) > 300
    assert figures["raw"]["routes"].get("none", 0) > 300
    assert figures["hypothesis"]["examples"] == 50
    assert figures["ok"], explain(figures)


@pytest.mark.parametrize("kind", sorted(ONCE_FATAL))
def test_input_that_once_stopped_the_worker_is_refused_and_the_worker_lives(kind):
    figures = badinput.run(messages=20, examples=0, seed=SEED, kinds={kind})
    assert figures["ok"], f"{ONCE_FATAL[kind]}\n{explain(figures)}"
