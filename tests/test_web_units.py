"""molteniron-web's parts that need no services: what a node shows (and never shows),
the charts' buckets, the password file, the address and the scrubbing of credentials."""

from __future__ import annotations

import base64
import os

import pytest

from molteniron.clients.web import charts, views
from molteniron.clients.web.auth import PasswordFile, hash_line
from molteniron.clients.web.main import parse_address, scrubber
from molteniron.clients.web.series import Series
from molteniron.errors import ConfigError

RECORD = {
    "id": 7, "name": "n7", "ipmi_ip": "10.0.0.7", "ipmi_user": "root",
    "ipmi_password": "********", "port_hwaddr": "aa:bb", "cpu_arch": "x86_64", "cpus": 8,
    "ram_mb": 1024, "disk_gb": 10, "allocation_pool": ["10.1.0.1"], "state": "allocated",
    "owner": "job", "holder_user": "ci", "allocated_at": "2026-12-06T10:00:00",
    "lease_expires_at": "2026-12-06T11:00:00", "node_pool": "p", "tags": ["a"],
    "maintenance_reason": None, "clean_claim": "********", "clean_claimed_by": None,
    "clean_claimed_until": None,
    "extra": {"rack": "r1", "bmc_password": "x", "api_token": "y", "ssh_key": "z",
              "nested": {"password": "w"}},
}


def unix(text: str) -> float:
    seconds = views._unix(text)
    assert seconds is not None
    return seconds


def test_a_node_shows_hardware_and_lease_but_nothing_that_may_be_secret():
    shown = views.node(RECORD, now=unix("2026-12-06T10:30:00"))
    assert shown["lease_remaining_s"] == 1800
    assert shown["lease_expires_at"] == "2026-12-06T11:00:00+00:00"
    assert shown["hardware"] == {"cpu_arch": "x86_64", "cpus": 8, "ram_mb": 1024,
                                 "disk_gb": 10, "port_hwaddr": "aa:bb", "rack": "r1"}
    flat = repr(shown)
    for hidden in ("ipmi_user", "root", "********", "bmc_password", "api_token", "ssh_key",
                   "clean_claim", "nested"):
        assert hidden not in flat, hidden


def test_cleaning_is_a_dirty_node_with_a_live_claim():
    dirty = {**RECORD, "state": "dirty", "owner": None, "lease_expires_at": None,
             "clean_claimed_by": "c1", "clean_claimed_until": "2026-12-06T11:00:00"}
    assert views.node(dirty, unix("2026-12-06T10:59:59"))["cleaning"] is True
    assert views.node(dirty, unix("2026-12-06T11:00:01"))["cleaning"] is False
    shown = views.node(dirty, unix("2026-12-06T10:00:00"))
    assert shown["cleaner"] == "c1" and shown["lease_remaining_s"] is None


def test_node_filters_and_pages():
    nodes = [views.node({**RECORD, "id": i, "name": f"n{i}", "node_pool": "p" if i % 2 else "q",
                         "tags": ["gpu"] if i > 6 else []}, 0) for i in range(1, 10)]
    page, next_after, matching = views.filter_nodes(nodes, pool="p", limit=2)
    assert [n["id"] for n in page] == [1, 3] and next_after == 3 and matching == 5
    page, next_after, _ = views.filter_nodes(nodes, pool="p", after=3, limit=10)
    assert [n["id"] for n in page] == [5, 7, 9] and next_after is None
    assert [n["id"] for n in views.filter_nodes(nodes, tag="gpu")[0]] == [7, 8, 9]
    assert [n["id"] for n in views.filter_nodes(nodes, name="N8")[0]] == [8]


def test_chart_buckets_keep_peaks_break_at_silence_and_run_over_empty_spans():
    rows = [(0, 1), (1, 5), (2, 3), (50, None), (90, 2)]
    values = charts.buckets(rows, 0, 100, 1, count=10)
    assert values[0] == 5 and values[5] is charts.NO_ANSWER and values[9] == 2
    assert values[1] is charts.EMPTY
    path = charts._path(values, 10)
    assert path.count("M") == 2  # broken once, at the silence; not at the empty spans
    svg = charts.line_chart("t <x>", [("waiting", "depth", values)], "24 h ago")
    assert "t &lt;x&gt;" in svg and "<script" not in svg and ">5</text>" in svg  # top: 5


def test_series_forgets_samples_older_than_its_window():
    series = Series(window=100)
    series.add({"pools": [{"node_pool": "p", "waiting": 2, "wait_p50_s": 5.0,
                           "wait_p95_s": 9.0}]}, at=1000)
    series.add(None, at=1050)
    series.add({"pools": []}, at=1120)
    assert series.of_pool("p") == [(1050, None, None, None), (1120, 0, 0.0, 0.0)]
    assert series.pools() == []


def test_password_file_accepts_only_salted_slow_hashes(tmp_path):
    path = tmp_path / "passwords"
    path.write_text(f"# ops\n{hash_line('ops', 'long enough pw')}\n")
    passwords = PasswordFile(str(path))

    def header(user, password):
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    assert passwords.check(header("ops", "long enough pw")) == "ops"
    assert passwords.check(header("ops", "long enough pw")) == "ops"  # remembered
    assert passwords.check(header("ops", "wrong")) is None
    assert passwords.check(header("other", "long enough pw")) is None
    assert passwords.check("Basic !!!") is None and passwords.check(None) is None
    # A changed file counts at once: the old password no longer does.
    path.write_text(hash_line("ops", "another pw 123") + "\n")
    os.utime(path, ns=(1, 1))
    assert passwords.check(header("ops", "long enough pw")) is None
    assert passwords.check(header("ops", "another pw 123")) == "ops"
    for bad in ("ops:5f4dcc3b5aa765d61d8327deb882cf99\n", "no colon here\n", "# empty\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            PasswordFile(str(path))


def test_addresses_and_scrubbing():
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    assert parse_address(":8080") == ("127.0.0.1", 8080)
    for bad in ("8080", "host:99999", "a:b:c"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    scrub = scrubber("amqp://web:s3cr%2Ct@mq1:5672/v,amqp://web:other@mq2/v")
    assert scrub("failed at amqp://web:s3cr%2Ct@mq1:5672/v: s3cr,t other") == (
        "failed at amqp://web:****@mq1:5672/v: **** ****")
