"""The flat part of YAML that configuration files are written in, read without PyYAML.

Importing PyYAML costs every `molteniron` command about 13 ms of a start that should
take under 100. A configuration file is usually a few `key: value` lines and
comments, which this reads; anything else (quotes, block scalars, nested mappings,
comments after a value, non-ASCII text...) makes `parse` return None, and the caller
reads the file with PyYAML. Whatever `parse` returns, PyYAML's safe_load returns too,
except that a document of only comments is {} here and None there
(tests/test_flat_yaml.py checks it on generated documents).

Read here, by PyYAML's own rules (YAML 1.1):
- whole numbers without leading zeros or underscores (an int), and digits.digits (a float);
- plain words starting with a letter or "/" from [A-Za-z0-9._~%+/:@=?&-], except
  those YAML reads as something else (yes/no/on/off/true/false/null), and except a
  word ending in ":";
- null and ~ (None);
- flow lists of such words (without "?") or numbers: [a, b].
"""

from __future__ import annotations

import re

_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,255}): +(.+?) *")  # YAML: keys <= 1024
_IGNORED = re.compile(r" *(#.*)?")
_PRINTABLE_ASCII = re.compile(r"[ -~\n]*")
_INT = re.compile(r"0|-?[1-9][0-9]*")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)\.[0-9]+")
_WORD = re.compile(r"[A-Za-z/][A-Za-z0-9._~%+/:@=?&-]*")
# An IPv4 address and port (web_address: 127.0.0.1:8080): text for YAML too (its
# floats and base-60 numbers have at most one dot).
_IPV4_ADDRESS = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?::[0-9]{1,5})?")
_NULLS = {"~", "null", "Null", "NULL"}
_NOT_WORDS = {"yes", "no", "on", "off", "true", "false", "null", "y", "n"}


_NOT_FLAT = object()  # what _value and _scalar return for text they do not read


def parse(text: str) -> dict | None:
    """{key: value} of a flat document, or None if the text is not one."""
    if not _PRINTABLE_ASCII.fullmatch(text):
        return None
    values = {}
    for line in text.split("\n"):
        if _IGNORED.fullmatch(line):
            continue
        match = _LINE.fullmatch(line)
        if match is None or match.group(1).lower() in _NOT_WORDS:  # a key is read like a value
            return None
        value = _value(match.group(2))
        if value is _NOT_FLAT:
            return None
        values[match.group(1)] = value
    return values


def _value(text: str):
    """A scalar or a flow list of scalars."""
    if not text.startswith("["):
        return _scalar(text)
    if not text.endswith("]"):
        return _NOT_FLAT
    inside = text[1:-1].strip()
    items = [_scalar(item.strip(), in_list=True) for item in inside.split(",")] if inside else []
    return _NOT_FLAT if _NOT_FLAT in items else items


def _scalar(text: str, in_list: bool = False):
    if in_list and "?" in text:  # inside [...], YAML ends a word at "?"
        return _NOT_FLAT
    if text in _NULLS:
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if _WORD.fullmatch(text) and text.lower() not in _NOT_WORDS and not text.endswith(":"):
        return text
    if _IPV4_ADDRESS.fullmatch(text):
        return text
    return _NOT_FLAT
