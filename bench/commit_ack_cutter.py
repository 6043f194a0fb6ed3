"""A TCP proxy in front of a MySQL/MariaDB server that can lose one COMMIT's acknowledgement.

The case DESIGN.md measured once by chance (kill -9 during a commit): the server has
committed, but the client gets 2013 "Lost connection to MySQL server during query" and
cannot tell whether its transaction happened. Here it happens on purpose and exactly once:

    cutter = CommitAckCutter(server_port)          # clients connect to cutter.port instead
    cutter.arm(b"INSERT INTO allocations")         # the next transaction holding this...
    ...                                            # ...is committed, then the line goes dead
    assert cutter.cut_commits == 1

The COMMIT may come alone or as the last of several statements sent in one query (the
worker joins a batch's writes and its COMMIT: molteniron/db.py run_statements). The
proxy waits for the server's answer to the COMMIT itself, the last of the query's
results, and loses that answer with everything before it that was not forwarded yet.

After the cut the proxy behaves like a server that died: every proxied connection is
closed and new ones are refused. Only the classic protocol without TLS or compression
is read (what PyMySQL speaks unless told otherwise); the proxy never changes a byte.
"""

from __future__ import annotations

import socket
import threading

COM_QUERY = 0x03
OK_PACKET, ERR_PACKET = 0x00, 0xFF
SERVER_MORE_RESULTS_EXISTS = 0x0008  # in an OK packet's status: another result follows


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
        last = sql.rsplit(b";", 1)[-1].strip().upper()  # the last of joined statements
        if self.cutter._matches(sql):
            self.in_matching_transaction = True
        if last in (b"COMMIT", b"ROLLBACK"):
            if last == b"COMMIT" and self.in_matching_transaction and self.cutter._take_cut():
                self.lose_next_reply.set()
            self.in_matching_transaction = False

    def server_to_client(self) -> None:
        held = b""  # the answers to the COMMIT's query, never forwarded
        try:
            while data := self.server.recv(65536):
                if not self.lose_next_reply.is_set():
                    self.client.sendall(data)
                    continue
                held += data
                final = _final_answer(held)
                if final is not None:  # the server answered the COMMIT: it is done
                    self.cutter._cut(final)
                    return
        except OSError:
            pass
        _close(self.client)


def _final_answer(data: bytes) -> int | None:
    """The first byte of the last answer to a query of statements without result sets
    (an OK without SERVER_MORE_RESULTS_EXISTS, or an error), once all of it arrived."""
    while len(data) >= 4:
        size = int.from_bytes(data[:3], "little")
        if len(data) < 4 + size:
            return None
        payload, data = data[4:4 + size], data[4 + size:]
        if payload[0] == ERR_PACKET:
            return ERR_PACKET
        at = 1
        for _ in range(2):  # affected rows, last insert id: length-encoded integers
            at += {0xFC: 3, 0xFD: 4, 0xFE: 9}.get(payload[at], 1)
        status = int.from_bytes(payload[at:at + 2], "little")
        if not status & SERVER_MORE_RESULTS_EXISTS:
            return payload[0]
    return None


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
