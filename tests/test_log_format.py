"""The services' log lines (molteniron/logs.py): log_format json gives one JSON object per
line with the event's fields as keys; under journald the text lines carry no time of
their own (the journal adds it) but a priority it reads."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from molteniron import logs
from tests.stack import wait_until

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def start_worker(stack, config_text: str, env: dict | None = None):
    config = stack.logdir / "logging.yaml"
    config.write_text(config_text)
    stack.start_worker(env={"MOLTENIRON_CONFIG": str(config), **(env or {})})
    assert stack.cli("status").returncode == 0  # one request, so one request line


def worker_lines(stack, wanted) -> list[str]:
    """The worker's log lines, once one of them satisfies wanted (it writes as it goes)."""
    def lines():
        found = stack.worker_log(0).splitlines()
        return found if any(wanted(line) for line in found) else None
    return wait_until(lines, 30, "the worker to log the status request")


def test_json_lines_carry_time_level_logger_and_the_events_fields(stack):
    start_worker(stack, "log_format: json\n")
    lines = worker_lines(stack, lambda line: '"op": "status"' in line)
    records = [json.loads(line) for line in lines]  # every line, pika's included
    for record in records:
        assert {"time", "level", "logger"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d",
                            record["time"]), record  # with its UTC offset
    consuming = next(r for r in records if r.get("event") == "consuming")
    assert consuming["level"] == "INFO" and consuming["worker"] == "test-worker-0"
    assert consuming["logger"].startswith("molteniron.")
    status = next(r for r in records if r.get("op") == "status")
    assert status["status"] == 200 and isinstance(status["ms"], float), status


def test_under_journald_text_lines_have_no_time_but_a_priority(stack):
    # systemd names the stream it reads: here the worker's log file (start_worker opens
    # it again with "w", which keeps its inode).
    log = stack.logdir / "worker-0.log"
    log.touch()
    status = os.stat(log)
    start_worker(stack, "log_level: INFO\n",
                 env={"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    lines = worker_lines(stack, lambda line: "op=status" in line)
    assert not [line for line in lines if TIMESTAMP.search(line)], lines
    assert all(re.match(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ", line)
               for line in lines), lines
    assert any(line.startswith("<6>INFO molteniron.") and "event=consuming" in line
               for line in lines), lines


def test_a_journal_stream_that_is_not_stderr_keeps_the_time(stack):
    """A process started by a service inherits JOURNAL_STREAM with its stderr elsewhere."""
    null = os.stat(os.devnull)
    start_worker(stack, "log_level: INFO\n",
                 env={"JOURNAL_STREAM": f"{null.st_dev}:{null.st_ino}"})
    lines = worker_lines(stack, lambda line: "op=status" in line)
    assert all(TIMESTAMP.match(line) for line in lines if "event=consuming" in line), lines


def record(msg: str, *args, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("molteniron.test", level, __file__, 1, msg, args, None)


@pytest.mark.parametrize("msg, args, expected", [
    ("event=broker_lost worker=%s error=%r retry_in=%.1fs", ("w1", OSError("gone"), 2.04),
     {"event": "broker_lost", "worker": "w1", "error": "OSError('gone')", "retry_in": "2.0s"}),
    ("op=%s user=%s ms=%.2f nodes=%d detail=%r", ("allocate", None, 1.234, 3, "a b"),
     {"op": "allocate", "user": None, "ms": 1.23, "nodes": 3, "detail": "a b"}),
    ("event=stopped", (), {"event": "stopped"}),
    ("event=x level=%s", ("high",), {"event": "x", "_level": "high"}),
])
def test_json_fields_of_key_value_events(msg, args, expected):
    line = json.loads(logs.JsonFormatter().format(record(msg, *args)))
    assert {key: line[key] for key in expected} == expected
    assert line["level"] == "INFO" and "message" not in line


@pytest.mark.parametrize("msg, args", [("Connecting to %s:%s", ("mq", 5672)),
                                       ("event=x %s", ("loose",)), ("%(a)s=1", ({"a": "k"},))])
def test_json_keeps_other_lines_whole_as_message(msg, args):
    rec = record(msg, *args)
    assert json.loads(logs.JsonFormatter().format(rec))["message"] == rec.getMessage()
