"""flat_yaml reads configuration files without PyYAML, and never differently from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from molteniron import flat_yaml

ROOT = Path(__file__).resolve().parent.parent

# Tokens YAML reads as something other than the string they look like, and tokens
# that break a line's structure: each must either be read as PyYAML reads it or
# make parse() give up.
TRICKY = ["yes", "No", "ON", "off", "True", "FALSE", "y", "n", "null", "Null", "NULL", "~",
          "nULL", "0", "-0", "007", "0755", "0x1f", "0o17", "1_000", "1:30", "190:20:30",
          "2001-12-14", "2001-12-14t21:59:43.10-05:00", "1e3", "1.5e3", "1.", ".5", "-1.25",
          ".inf", "-.inf", ".nan", "=", "<<", "-", "--", "?", ":", "a:", "a:b", "a: b", "a #b",
          "a#b", "#a", "'a'", '"a"', "!!str a", "&x a", "*x", "|", ">", "%x", "@x", "`x",
          "{a: 1}", "[a]", "[a, b]", "[ ]", "[a,]", "[a?b]", "[a:]", "[a:b]", "[1, 2.5, null]",
          "amqp://guest:guest@127.0.0.1:5672/%2F", "mysql+pymysql://root@db:3306/pool",
          "/etc/molteniron/secret.keys", "INFO", "a~", "a=b", "a?b", "a&b", "é", "a\tb",
          "k" * 1025]
WORD_CHARACTERS = "abzAZ09._~%+/:@=?&-#,[]{}!*'\"|> "

keys = st.sampled_from(["db_url", "amqp_url", "prefetch", "admins", "a", "_x", "k1", "yes",
                        "Off", "null", "y", "1a", "a b", "<<", "é"])
values = st.one_of(st.sampled_from(TRICKY), st.text(WORD_CHARACTERS, min_size=1, max_size=12),
                   st.integers(-10**6, 10**6).map(str),
                   st.lists(st.sampled_from(TRICKY), max_size=3).map(lambda v: f"[{', '.join(v)}]"))
spaces = st.sampled_from(["", " ", "  ", "\t"])
entries = st.builds(lambda key, gap, value, tail: f"{key}:{gap}{value}{tail}", keys,
                    st.sampled_from([" ", "  ", "", "\t"]), values,
                    st.sampled_from(["", " ", "  # note", " #", "#x"]))
other_lines = st.sampled_from(["", " ", "# a comment", "   # indented comment", "---", "...",
                               "- item", "  nested: 1", "key:", "%YAML 1.1", "\ufeffa: 1",
                               "a: |", "  text", "a: 1\r", "a:\u2028b: 2"])
lines = st.one_of(entries, entries, entries, other_lines,
                  st.builds(lambda indent, line: indent + line, spaces, entries))
documents = st.lists(lines, max_size=8).map("\n".join)


def assert_read_as_pyyaml_reads(text):
    flat = flat_yaml.parse(text)
    if flat is None:
        return
    expected = yaml.safe_load(text)
    # repr, not ==: 1, 1.0 and True are equal in Python but not the same configuration
    assert repr(flat) == repr({} if expected is None else expected), text


@pytest.mark.parametrize("token", TRICKY)
def test_each_tricky_token_is_read_as_pyyaml_reads_it(token):
    for text in (f"a: {token}", f"a: [{token}]", f"a: [x, {token}]", f"{token}: 1",
                 f"a: 1\n{token}\n"):
        assert_read_as_pyyaml_reads(text)


@settings(max_examples=3000, deadline=None)
@given(documents)
def test_what_flat_yaml_reads_pyyaml_reads_the_same(text):
    assert_read_as_pyyaml_reads(text)


def test_the_files_the_kit_writes_are_read_without_pyyaml():
    installed = (ROOT / "deploy" / "install.sh").read_text()
    conf = installed.split('write_once "$etc/conf.yaml" 640 root:molteniron <<EOF\n')[1]
    conf = conf.split("\nEOF\n")[0].replace("$etc", "/etc/molteniron")
    example = (ROOT / "deploy" / "conf.yaml.example").read_text()
    for text in (conf, example, ""):
        assert repr(flat_yaml.parse(text)) == repr(yaml.safe_load(text) or {})
    parsed = flat_yaml.parse(conf)
    assert parsed is not None
    assert parsed["admins"] == ["molteniron-admin"]


def test_flat_values_are_read_here_not_left_to_pyyaml():
    text = ("a: amqp://ci:pw@mq:5671/v?heartbeat=30\nb: INFO\nc: 0\nd: -1.25\ne: null\n"
            "f: [x, 2, ~]\ng: []\n  # indented comment\n\nh: /etc/molteniron/secret.keys  \n")
    assert repr(flat_yaml.parse(text)) == repr({
        "a": "amqp://ci:pw@mq:5671/v?heartbeat=30", "b": "INFO", "c": 0, "d": -1.25, "e": None,
        "f": ["x", 2, None], "g": [], "h": "/etc/molteniron/secret.keys"})



@given(st.lists(st.integers(0, 999), min_size=4, max_size=4),
       st.none() | st.integers(0, 99999))
def test_an_ipv4_address_and_port_is_text_as_pyyaml_reads_it(parts, port):
    value = ".".join(map(str, parts)) + ("" if port is None else f":{port}")
    text = f"web_address: {value}\n"
    assert flat_yaml.parse(text) == yaml.safe_load(text) == {"web_address": value}
