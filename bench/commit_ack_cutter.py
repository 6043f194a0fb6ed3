"""A TCP proxy in front of a MySQL/MariaDB server that can lose one COMMIT's acknowledgement.

The case DESIGN.md measured once by chance (kill -9 during a commit): the server has
committed, but the client gets 2013 "Lost connection to MySQL server during query" and
cannot tell whether its transaction happened. Here it happens on purpose and exactly once:

    cutter = CommitAckCutter(server_port)          # clients connect to cutter.port instead
    cutter.arm(b"INSERT INTO allocations")         # the next transaction holding this...
    ...                                            # ...is committed, then the line goes dead
    assert cutter.cut_commits == 1

After the cut the proxy behaves like a server that died: every proxied connection is
closed and new ones are refused. Only the classic protocol without TLS or compression
is read (what PyMySQL speaks unless told otherwise); the proxy never changes a byte.
"""

from __future__ import annotations

import socket
import threading

COM_QUERY = 0x03
OK_PACKET, ERR_PACKET = 0x00, 0xFF


class CommitAckCutter:
    def __init__(self, server_port: int, server_host: str = "127.0.0.1"):
        self.server = (server_host, server_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pattern: bytes | None = None
        self.cut_commits = 0
        self.cut_replies: list[int] = []  # first byte of each swallowed reply: 0 = OK
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True, name="cutter-accept").start()

    def arm(self, statement_part: bytes) -> None:
        """Cut the acknowledgement of the next COMMIT of a transaction that ran a statement
        containing `statement_part`; then act as a dead server."""
        with self.lock:
            self.pattern = statement_part

    def close(self) -> None:
        """Stop accepting and drop every proxied connection."""
        _close(self.listener)  # shutdown first: a bare close leaves accept() listening
        with self.lock:
            for sock in self.sockets:
                _close(sock)
            self.sockets.clear()

    def __enter__(self) -> CommitAckCutter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.server, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets.update((client, server))
            line = _Line(self, client, server)
            threading.Thread(target=line.client_to_server, daemon=True).start()
            threading.Thread(target=line.server_to_client, daemon=True).start()

    def _matches(self, sql: bytes) -> bool:
        with self.lock:
            return self.pattern is not None and self.pattern in sql

    def _take_cut(self) -> bool:
        """True once per arm(): this COMMIT's reply is the one to lose."""
        with self.lock:
            if self.pattern is None:
                return False
            self.pattern = None
            return True

    def _cut(self, first_reply_byte: int) -> None:
        with self.lock:
            self.cut_commits += 1
            self.cut_replies.append(first_reply_byte)
        self.close()


class _Line:
    """One client connection and its server connection, pumped by two threads."""

    def __init__(self, cutter: CommitAckCutter, client: socket.socket, server: socket.socket):
        self.cutter = cutter
        self.client = client
        self.server = server
        self.in_matching_transaction = False
        # Set before the COMMIT is forwarded, so the reply cannot slip through first.
        self.lose_next_reply = threading.Event()

    def client_to_server(self) -> None:
        buffer = b""
        try:
            while data := self.client.recv(65536):
                buffer += data
                while len(buffer) >= 4:
                    size = int.from_bytes(buffer[:3], "little")
                    if len(buffer) < 4 + size:
                        break
                    packet, buffer = buffer[:4 + size], buffer[4 + size:]
                    self._watch(packet[4:])
                    self.server.sendall(packet)
        except OSError:
            pass
        _close(self.server)

    def _watch(self, payload: bytes) -> None:
        if not payload or payload[0] != COM_QUERY:
            return
        sql = payload[1:]
        word = sql.strip().upper()
        if word in (b"COMMIT", b"ROLLBACK"):
            if word == b"COMMIT" and self.in_matching_transaction and self.cutter._take_cut():
                self.lose_next_reply.set()
            self.in_matching_transaction = False
        elif self.cutter._matches(sql):
            self.in_matching_transaction = True

    def server_to_client(self) -> None:
        try:
            while data := self.server.recv(65536):
                if self.lose_next_reply.is_set():
                    # The server answered the COMMIT (data[4] is its OK or error byte).
                    self.cutter._cut(data[4] if len(data) > 4 else -1)
                    return
                self.client.sendall(data)
        except OSError:
            pass
        _close(self.client)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
