"""A TLS endpoint speaking the Postgres protocol, in front of the embedded Postgres (built without SSL).

It answers a client's SSLRequest with 'S', completes the TLS handshake with
the certificate it is given (as RDS does with its own), then relays the
session to the plain server. What the client verifies - the chain to the CA
and the name - is the real libpq TLS code path; a plaintext startup is refused
(as RDS's rds.force_ssl does).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


class TlsProxy:
    def __init__(self, upstream_port: int, certfile: str, keyfile: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with contextlib.ExitStack() as stack:
            stack.enter_context(conn)
            while True:
                header = _recv_exact(conn, 8)
                if header is None:
                    return
                _, code = struct.unpack("!II", header)
                if code == GSSENC_REQUEST:
                    conn.sendall(b"N")
                    continue
                if code != SSL_REQUEST:
                    return  # plaintext: refused
                conn.sendall(b"S")
                break
            try:
                tls = self.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                return  # the client rejected our certificate
            self.handshakes += 1
            stack.enter_context(tls)
            upstream = stack.enter_context(socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30))
            _relay(tls, upstream)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _relay(tls: ssl.SSLSocket, upstream: socket.socket) -> None:
    while True:
        ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 60)[0]
        if not ready:
            return
        for sock in ready:
            try:
                data = sock.recv(65536)
            except (ssl.SSLError, OSError):
                return
            if not data:
                return
            (upstream if sock is tls else tls).sendall(data)
