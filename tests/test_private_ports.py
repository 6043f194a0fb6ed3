"""Private services' ports (bench/private.py free_port) lie below the ephemeral range."""

from __future__ import annotations

import socket

from bench.private import CTL_DIST_PORTS, free_port


def ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return low, high


def test_a_private_port_is_never_one_an_outgoing_connection_may_take():
    """A private broker restarted on its port found it taken by a client's connection
    (eaddrinuse): the kernel gives ports of the ephemeral range to outgoing connections."""
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert all(port < low and port not in CTL_DIST_PORTS for port in ports), ports
    with socket.socket() as s:  # and each is really free
        s.bind(("127.0.0.1", ports[-1]))
