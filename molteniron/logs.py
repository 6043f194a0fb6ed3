"""The log lines of the services (worker, cleaner, molteniron-web): one per event, on stderr.

log_format text: `TIME LEVEL LOGGER event=... key=value ...`. Under journald (systemd
sets $JOURNAL_STREAM to the device:inode of the stream it reads) without TIME, which
the journal adds itself, and with a `<N>` prefix that journald turns into the line's
priority (`journalctl -p warning`).
log_format json: one object per line: time (ISO 8601 with its UTC offset), level,
logger, then the event's key=value fields as keys of their own (numbers as numbers,
%r strings without their quotes); `message` holds a line that is not key=value
(pika's, waitress's), `traceback` an exception's. A field named like one of these
keys is kept with an underscore in front.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import datetime

TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
JOURNAL_TEXT = "<%(priority)d>%(levelname)s %(name)s %(message)s"
# syslog priorities of the levels: journald reads them from the <N> prefix.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}
RESERVED = ("time", "level", "logger", "message", "traceback")
# A printf conversion in a log call's format: %r, %s, %d, %.1f ... (not %%).
_CONVERSION = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]")


def setup(config, quiet: Mapping[str, int] = {}) -> None:
    """Log to stderr at config.log_level in config.log_format; quiet: logger -> its level."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(sys.stderr):
        handler.setFormatter(JournalFormatter(JOURNAL_TEXT))
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    logging.basicConfig(level=config.log_level, handlers=[handler])
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)


def under_journald(stream, env: Mapping[str, str] = os.environ) -> bool:
    """Whether stream is the journal's: $JOURNAL_STREAM names it (systemd.exec(5)), so a
    child whose stderr went elsewhere, which inherits the variable, still says the time."""
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # not set, malformed, or no descriptor
        return False


class JournalFormatter(logging.Formatter):
    """Text without the time, with the syslog priority journald reads from `<N>`."""

    def format(self, record: logging.LogRecord) -> str:
        record.priority = PRIORITIES.get(record.levelno, 6 if record.levelno < 30 else 3)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (this module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created).astimezone()
                .isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name}
        found = fields(record)
        if found is None:
            line["message"] = record.getMessage()
        else:
            line.update({f"_{key}" if key in RESERVED else key: value
                         for key, value in found.items()})
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def fields(record: logging.LogRecord) -> dict | None:
    """The key=value fields of a record whose format is only `key=value` words, each
    value literal or one conversion (a unit after it is kept: retry_in=%.1fs -> "2.0s");
    None for any other record."""
    if not isinstance(record.msg, str) or isinstance(record.args, Mapping):
        return None
    args = tuple(record.args or ())
    found: dict = {}
    used = 0
    for word in record.msg.split():
        key, equals, value = word.partition("=")
        if not equals or not key.isidentifier():
            return None
        conversions = _CONVERSION.findall(value) if args else []
        if not conversions:
            found[key] = value.replace("%%", "%") if args else value
            continue
        taken = args[used:used + len(conversions)]
        used += len(conversions)
        try:
            text = value % taken
        except (TypeError, ValueError):
            return None
        found[key] = _typed(value, taken[0], text) if value == conversions[0] else text
    return found if used == len(args) else None


def _typed(conversion: str, arg, text: str):
    """A field's value as JSON should hold it: numbers as numbers, strings as given."""
    kind = conversion[-1]
    try:
        if kind in "di":
            return int(text)
        if kind in "eEfFgG":
            return float(text)
    except ValueError:  # nan, inf: keep the text
        return text
    if kind in "rsa" and (arg is None or isinstance(arg, (str, int, float, bool))):
        return arg
    return text
