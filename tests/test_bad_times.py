"""A time out of range is a clear 400 (exit 2 in the CLI), never a traceback; a raw
request the worker cannot decode still gets a reply."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from molteniron import errors, protocol
from tests.raw import RawPublisher, valid
from tests.stack import ROOT

OUT_OF_RANGE = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("when", OUT_OF_RANGE)
def test_a_time_that_leaves_the_calendar_in_utc_is_a_bad_request(when):
    with pytest.raises(errors.BadRequest, match="since must be an ISO-8601 time"):
        protocol.validate_args("history", {"since": when})


def test_the_cli_says_so_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "molteniron.clients.cli", "history", "--since", OUT_OF_RANGE[0]],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MOLTENIRON_CONFIG": "/dev/null",
             "MOLTENIRON_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"},
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "since" in done.stderr, done


def test_a_raw_request_with_a_time_out_of_range_gets_a_400_reply(running):
    raw = RawPublisher(running.amqp_url)
    try:
        reply = raw.reply_to(raw.publish(json.dumps(
            valid("history", {"since": OUT_OF_RANGE[0]})).encode()))
    finally:
        raw.close()
    assert reply["status"] == 400 and "since" in reply["message"], reply
    assert running.dead_letters() == 0
