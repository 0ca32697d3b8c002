"""The replication gateway: logical replication in, nothing physical (issue 18 §1, docs/replication.md).

    python -m tools.replication.gateway --listen 127.0.0.1:5434 --postgres /run/postgresql --postgres-port 5432

A small asyncio TCP proxy (standard library only) in front of Postgres for
`replication=database` connections. Per client connection it:

- answers SSLRequest with TLS when it has a certificate (--tls-cert; then
  TLS is required), else with 'N'; GSSENCRequest always with 'N';
- reads the StartupMessage, refuses anything but `replication=database`
  (queries go to the direct or pooled string), checks that `user` has the
  shape of a tenant role and rewrites it to the tenant's replication companion
  (`<role>_repl`, chalicelib.replication), then forwards the startup to
  Postgres, on the Unix socket where the companion may log in (or a private
  host name, with TLS: --postgres-sslmode);
- relays authentication untouched: the companion has the tenant's own SCRAM
  verifier and Postgres ignores the user name inside SCRAM, so the gateway
  holds no secret and never logs a password message;
- from then on reads every simple-query ('Q') message and classifies it the
  way PostgreSQL's replication scanner does (repl_scanner.l: the first token,
  case-sensitive keywords, no comments). Plain SQL is forwarded (a
  subscriber's table sync runs SQL and COPY here). Of the replication
  commands only IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY, the LOGICAL forms of
  CREATE_REPLICATION_SLOT and START_REPLICATION, and DROP/ALTER_REPLICATION_SLOT
  of a slot of this database (asked of Postgres on the same connection) pass;
  everything else gets ErrorResponse 42501 and ReadyForQuery, and the
  connection stays usable.

Bounds: connections per process, the time a client may take to log in, and
the size of a client's message. Nothing in chalicelib imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import ssl
import struct
import sys
from dataclasses import dataclass

log = logging.getLogger("instapg.replication.gateway")

# chalicelib.replication.COMPANION_SUFFIX (tests/test_replication.py checks they agree): this
# module stays free of chalicelib so the runtime image needs nothing but Python.
COMPANION_SUFFIX = "_repl"
# chalicelib.identifiers.tenant_name: a prefix, "_", 26 base32 characters.
TENANT_ROLE = re.compile(r"[a-z][a-z0-9_]{0,30}_[a-z2-7]{26}")

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
MAX_STARTUP = 10_000  # PostgreSQL's own MAX_STARTUP_PACKET_LENGTH
MAX_SERVER_MESSAGE = 1 << 30  # PostgreSQL's MaxAllocSize: a row of a COPY may be that big

# repl_scanner.l: the keywords, matched case-sensitively, longest match first.
KEYWORDS = frozenset(
    {
        "BASE_BACKUP", "IDENTIFY_SYSTEM", "READ_REPLICATION_SLOT", "SHOW", "TIMELINE", "START_REPLICATION",
        "CREATE_REPLICATION_SLOT", "DROP_REPLICATION_SLOT", "ALTER_REPLICATION_SLOT", "TIMELINE_HISTORY",
        "PHYSICAL", "RESERVE_WAL", "LOGICAL", "SLOT", "TEMPORARY", "TWO_PHASE", "EXPORT_SNAPSHOT",
        "NOEXPORT_SNAPSHOT", "USE_SNAPSHOT", "WAIT", "UPLOAD_MANIFEST",
    }
)  # fmt: skip
# The first tokens that make a command a replication command (replication_scanner_is_replication_command).
COMMANDS = frozenset(
    {
        "IDENTIFY_SYSTEM", "BASE_BACKUP", "START_REPLICATION", "CREATE_REPLICATION_SLOT", "DROP_REPLICATION_SLOT",
        "ALTER_REPLICATION_SLOT", "READ_REPLICATION_SLOT", "TIMELINE_HISTORY", "UPLOAD_MANIFEST", "SHOW",
    }
)  # fmt: skip
_SPACE = b" \t\n\r\f\v"
_IDENT = re.compile(rb"[A-Za-z\x80-\xff_][A-Za-z\x80-\xff_0-9$]*")
_RECPTR = re.compile(rb"[0-9A-Fa-f]+/[0-9A-Fa-f]+")
_DIGITS = re.compile(rb"[0-9]+")
# ReplicationSlotValidateName: lower-case letters, digits and underscores.
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


@dataclass(frozen=True)
class Token:
    kind: str  # "kw", "ident", "str", "num", "lsn" or "char"
    value: str


class Unterminated(ValueError):
    pass


def tokens(text: bytes) -> list[Token]:
    """The tokens of `text` as repl_scanner.l makes them (Unterminated for an open quote)."""
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i : i + 1]
        if c in _SPACE:
            i += 1
            continue
        if c in (b"'", b'"'):
            j, value = i + 1, bytearray()
            while True:
                k = text.find(c, j)
                if k < 0:
                    raise Unterminated("unterminated quoted string")
                value += text[j:k]
                if text[k + 1 : k + 2] == c:  # a doubled quote is one quote
                    value += c
                    j = k + 2
                    continue
                i = k + 1
                break
            decoded = value.decode("utf-8", "replace")
            out.append(Token("str", decoded) if c == b"'" else Token("ident", _truncate(decoded)))
            continue
        # flex takes the longest match (an LSN is longer than the identifier or number it starts
        # with); a keyword ties with the identifier of the same text and wins, being listed first.
        found = [m for m in (_RECPTR.match(text, i), _DIGITS.match(text, i), _IDENT.match(text, i)) if m]
        if not found:
            out.append(Token("char", c.decode("latin-1")))
            i += 1
            continue
        best = max(found, key=lambda m: m.end())
        word = best.group().decode("utf-8", "replace")
        if best.re is _IDENT:
            out.append(Token("kw", word) if word in KEYWORDS else Token("ident", _truncate(_downcase(word))))
        else:
            out.append(Token("lsn" if best.re is _RECPTR else "num", word))
        i = best.end()
    return out


def _downcase(word: str) -> str:
    # downcase_identifier lowers ASCII letters only (multibyte encodings).
    return "".join(ch.lower() if "A" <= ch <= "Z" else ch for ch in word)


def _truncate(name: str) -> str:
    raw = name.encode()
    if len(raw) <= 63:
        return name
    return raw[:63].decode("utf-8", "ignore")


@dataclass(frozen=True)
class Verdict:
    """What the gateway does with one query: forward it, refuse it, or forward it if `slot` is this database's."""

    action: str  # "forward", "refuse" or "check_slot"
    command: str = ""
    reason: str = ""
    slot: str = ""


def classify(query: bytes) -> Verdict:
    """The gateway's decision for the text of a 'Q' message (up to its first NUL, as Postgres reads it)."""
    text = query.split(b"\0", 1)[0]
    first = _IDENT.match(text.lstrip(_SPACE))
    word = first.group().decode("utf-8", "replace") if first else ""
    command = word.upper()
    if command not in COMMANDS:
        return Verdict("forward")  # SQL: the walsender hands it to the SQL parser
    if word != command and command != "SHOW":
        # Postgres reads a lower-case keyword as SQL (a syntax error there); refusing is the safe reading.
        return Verdict("refuse", command, "replication commands are upper case")
    try:
        toks = tokens(text)
    except Unterminated:
        return Verdict("refuse", command, "unterminated quoted string")

    def at(index: int) -> Token | None:
        return toks[index] if index < len(toks) else None

    def is_kw(index: int, keyword: str) -> bool:
        token = at(index)
        return token is not None and token.kind == "kw" and token.value == keyword

    if command in ("IDENTIFY_SYSTEM", "SHOW", "TIMELINE_HISTORY"):
        return Verdict("forward", command)
    if command == "CREATE_REPLICATION_SLOT":
        name = at(1)
        kind = 3 if is_kw(2, "TEMPORARY") else 2
        if name is not None and name.kind == "ident" and is_kw(kind, "LOGICAL"):
            return Verdict("forward", command)
        return Verdict(
            "refuse", command, "only LOGICAL slots may be created here; a physical slot keeps every database's WAL"
        )
    if command == "START_REPLICATION":
        name = at(2)
        if is_kw(1, "SLOT") and name is not None and name.kind == "ident" and is_kw(3, "LOGICAL"):
            return Verdict("forward", command)
        return Verdict(
            "refuse",
            command,
            "only START_REPLICATION SLOT <slot> LOGICAL may stream here; physical WAL holds every database",
        )
    if command in ("DROP_REPLICATION_SLOT", "ALTER_REPLICATION_SLOT"):
        name = at(1)
        if name is None or name.kind != "ident" or not _SLOT_NAME.fullmatch(name.value):
            return Verdict("refuse", command, "not a slot of this database")
        return Verdict("check_slot", command, slot=name.value)
    reasons = {
        "BASE_BACKUP": "a base backup copies every database on the host",
        "READ_REPLICATION_SLOT": "it reads physical slots",
        "UPLOAD_MANIFEST": "it is part of a base backup",
    }
    return Verdict("refuse", command, reasons.get(command, "not allowed"))


def slot_query(slot: str) -> bytes:
    """The gateway's own question: is `slot` a slot of the connection's database?

    `slot` matched _SLOT_NAME (no quote, no backslash). Everything is schema-
    qualified: the tenant may have changed search_path on this connection.
    """
    assert _SLOT_NAME.fullmatch(slot)
    return (
        "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) "
        f"'{slot}'::pg_catalog.name AND database OPERATOR(pg_catalog.=) pg_catalog.current_database()"
    ).encode()


# -- the wire ----------------------------------------------------------------------------------


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error(code: str, text: str, hint: str = "", severity: str = "ERROR") -> bytes:
    fields = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + code.encode(), b"M" + text.encode()]
    if hint:
        fields.append(b"H" + hint.encode())
    return message(b"E", b"\0".join(fields) + b"\0\0")


def ready(status: bytes) -> bytes:
    return message(b"Z", status)


async def read_message(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    kind, length = header[:1], struct.unpack("!I", header[1:])[0]
    if length < 4 or length - 4 > limit:
        raise ProtocolError(f"message {kind!r} of {length} bytes")
    return kind, await reader.readexactly(length - 4)


class ProtocolError(Exception):
    pass


class Refused(Exception):
    """A login the gateway turns away (its ErrorResponse goes to the client)."""

    def __init__(self, code: str, text: str, hint: str = "") -> None:
        super().__init__(text)
        self.packet = error(code, text, hint, severity="FATAL")


@dataclass
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5434
    postgres: str = "/var/run/postgresql"  # a folder (Unix socket) or a host name
    postgres_port: int = 5432
    max_connections: int = 200
    login_timeout_s: float = 10.0
    max_message_bytes: int = 1 << 20
    name_prefix: str = ""  # only this deployment's tenants, when set
    tls_cert: str = ""  # with tls_key: TLS towards clients, and then required of them
    tls_key: str = ""
    postgres_sslmode: str = "disable"  # towards a Postgres host name: disable, require or verify-full
    postgres_sslrootcert: str = ""  # the CA bundle verify-full checks Postgres's certificate against
    parent_pid: int = 0  # stop when this process is gone (the local stack and the tests: no orphan if they are killed)


def rewrite_startup(body: bytes, config: Config) -> tuple[bytes, str, str]:
    """The StartupMessage for Postgres (user -> its companion): (body, tenant role, database); Refused if not one."""
    version = struct.unpack("!I", body[:4])[0]
    if version >> 16 != 3:
        raise Refused("08P01", f"unsupported frontend protocol {version >> 16}.{version & 0xFFFF}")
    parts = body[4:].split(b"\0")
    params: dict[str, str] = {}
    order: list[str] = []
    for key, value in zip(parts[0::2], parts[1::2], strict=False):
        if not key:
            break
        name = key.decode("utf-8", "replace")
        params[name] = value.decode("utf-8", "replace")
        order.append(name)
    if params.get("replication") != "database":
        raise Refused(
            "08004",
            "this endpoint serves logical replication connections only (replication=database)",
            "Use the database's connection_string or direct_connection_string for queries.",
        )
    user = params.get("user", "")
    if not TENANT_ROLE.fullmatch(user) or not user.startswith(config.name_prefix):
        raise Refused(
            "28000", "no such database role here", "Log in as the database's own role (its connection string's user)."
        )
    database = params.get("database") or user  # Postgres's default: the user name, which is the tenant's here
    params["user"], params["database"] = user + COMPANION_SUFFIX, database
    for name in ("user", "database"):
        if name not in order:
            order.append(name)
    out = struct.pack("!I", version) + b"".join(k.encode() + b"\0" + params[k].encode() + b"\0" for k in order) + b"\0"
    return out, user, database


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.active = 0
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls.load_cert_chain(config.tls_cert, config.tls_key or None)
        self.upstream_tls: ssl.SSLContext | None = None
        if config.postgres_sslmode == "verify-full":
            self.upstream_tls = ssl.create_default_context(cafile=config.postgres_sslrootcert or None)
        elif config.postgres_sslmode == "require":  # encrypted, the certificate not checked (libpq's require)
            self.upstream_tls = ssl.create_default_context()
            self.upstream_tls.check_hostname = False
            self.upstream_tls.verify_mode = ssl.CERT_NONE

    async def upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cfg = self.config
        if cfg.postgres.startswith("/"):
            return await asyncio.open_unix_connection(f"{cfg.postgres}/.s.PGSQL.{cfg.postgres_port}")
        reader, writer = await asyncio.open_connection(cfg.postgres, cfg.postgres_port)
        if self.upstream_tls is not None:
            # Postgres's own TLS negotiation (RDS forces it): SSLRequest, 'S', then the handshake.
            writer.write(struct.pack("!II", 8, SSL_REQUEST))
            await writer.drain()
            if await reader.readexactly(1) != b"S":
                writer.close()
                raise ConnectionRefusedError("Postgres offers no TLS")
            await writer.start_tls(self.upstream_tls, server_hostname=cfg.postgres)
        return reader, writer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        up_writer = None
        if self.active >= self.config.max_connections:
            writer.write(error("53300", "too many replication connections to this gateway", severity="FATAL"))
            await _close(writer)
            return
        self.active += 1
        try:
            opened = await asyncio.wait_for(self.login(reader, writer), self.config.login_timeout_s)
            if opened is None:
                return
            up_reader, up_writer, who = opened
            log.info("replication session of %s from %s", who, peer)
            await Session(self.config, reader, writer, up_reader, up_writer, who).run()
        except Refused as exc:
            log.info("login from %s refused: %s", peer, exc)
            writer.write(exc.packet)
        except TimeoutError:
            log.info("login from %s timed out", peer)
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("connection from %s ended: %s", peer, type(exc).__name__)
        except OSError as exc:
            log.warning("connection from %s: %s", peer, exc)
        finally:
            self.active -= 1
            if up_writer is not None:
                await _close(up_writer)
            await _close(writer)

    async def login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str] | None:
        """Startup and authentication; the upstream connection once Postgres says ReadyForQuery."""
        for _ in range(3):  # SSLRequest, GSSENCRequest, then the startup
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            if not 8 <= length <= MAX_STARTUP:
                raise ProtocolError(f"startup packet of {length} bytes")
            body = await reader.readexactly(length - 4)
            code = struct.unpack("!I", body[:4])[0]
            if code == SSL_REQUEST and self.tls is not None and writer.get_extra_info("ssl_object") is None:
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self.tls)
                continue
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            if code == CANCEL_REQUEST:
                # Postgres checks the backend's secret key; nothing of ours to add.
                _, up = await self.upstream()
                up.write(struct.pack("!I", length) + body)
                await _close(up)
                return None
            if self.tls is not None and writer.get_extra_info("ssl_object") is None:
                raise Refused("28000", "this endpoint requires TLS", "Connect with sslmode=require or verify-full.")
            startup, role, database = rewrite_startup(body, self.config)
            break
        else:
            raise ProtocolError("no startup message")
        try:
            up_reader, up_writer = await self.upstream()
        except OSError as exc:
            log.warning("postgres not reachable: %s", exc)
            raise Refused("08006", "the database server is not answering", "Try again in a moment.") from None
        try:
            up_writer.write(struct.pack("!I", len(startup) + 4) + startup)
            await up_writer.drain()
            while True:
                kind, payload = await read_message(up_reader, MAX_SERVER_MESSAGE)
                writer.write(message(kind, payload))
                await writer.drain()
                if kind == b"E":
                    await _close(up_writer)
                    return None
                if kind == b"Z":
                    return up_reader, up_writer, f"{role}/{database}"
                if kind == b"R" and struct.unpack("!I", payload[:4])[0] in (3, 5, 10, 11):
                    # The client's password or SASL message: relayed as is, never logged.
                    answer, answer_body = await read_message(reader, MAX_STARTUP)
                    if answer != b"p":
                        raise ProtocolError("expected a password message")
                    up_writer.write(message(answer, answer_body))
                    await up_writer.drain()
        except BaseException:
            await _close(up_writer)
            raise


class Session:
    """One authenticated replication connection: client messages filtered, server messages relayed."""

    # Messages a client may send on a replication connection: a query, COPY data (a stream's
    # status updates), the end of a COPY, and Terminate. Extended query and function calls
    # are refused by Postgres there anyway.
    CLIENT_MESSAGES = (b"Q", b"d", b"c", b"f", b"X")

    def __init__(self, config, reader, writer, up_reader, up_writer, who: str) -> None:
        self.config = config
        self.reader, self.writer = reader, writer
        self.up_reader, self.up_writer = up_reader, up_writer
        self.who = who
        self.pending = 0  # queries forwarded whose ReadyForQuery has not come back
        self.idle = asyncio.Event()
        self.idle.set()
        self.status = b"I"
        self.intercept: asyncio.Queue | None = None

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.from_client()), asyncio.create_task(self.from_server())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def from_server(self) -> None:
        """Relay whole messages in the chunks they came in (a stream is many small CopyData messages).

        Each message is still looked at: ReadyForQuery ends a query, and while the
        gateway asks its own question the answer is kept from the client.
        """
        buf = bytearray()
        while True:
            chunk = await self.up_reader.read(1 << 16)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), None)
            buf += chunk
            pos = start = 0
            became_idle = False
            while len(buf) - pos >= 5:
                kind = bytes(buf[pos : pos + 1])
                length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if length < 4 or length - 4 > MAX_SERVER_MESSAGE:
                    raise ProtocolError(f"server message {kind!r} of {length} bytes")
                end = pos + 1 + length
                if len(buf) < end:
                    break  # the rest of it is still on its way
                if self.intercept is not None and kind not in (b"N", b"A", b"S"):
                    if start < pos:
                        self.writer.write(bytes(buf[start:pos]))
                    self.intercept.put_nowait((kind, bytes(buf[pos + 5 : end])))
                    start = end
                elif kind == b"Z":
                    self.status = bytes(buf[pos + 5 : pos + 6])
                    self.pending = max(0, self.pending - 1)
                    became_idle = became_idle or self.pending == 0
                pos = end
            if start < pos:
                self.writer.write(bytes(buf[start:pos]))
            del buf[:pos]
            if became_idle:  # after the answers are written: a refusal waiting for it comes after them
                self.idle.set()
            await self.writer.drain()

    async def from_client(self) -> None:
        while True:
            kind, body = await read_message(self.reader, self.config.max_message_bytes)
            if kind not in self.CLIENT_MESSAGES:
                self.writer.write(
                    error(
                        "08P01", f"message type {kind!r} is not supported on a replication connection", severity="FATAL"
                    )
                )
                await self.writer.drain()
                return
            if kind == b"Q":
                verdict = classify(body)
                if verdict.action == "check_slot":
                    await self.idle.wait()
                    if not await self.slot_is_ours(verdict.slot):
                        verdict = Verdict(
                            "refuse", verdict.command, f"slot {verdict.slot!r} is not a slot of this database"
                        )
                if verdict.action == "refuse":
                    await self.idle.wait()  # after the answers to what came before it
                    log.warning("%s: refused %s: %s", self.who, verdict.command, verdict.reason)
                    self.writer.write(
                        error("42501", f"{verdict.command} is not allowed through the replication gateway: {verdict.reason}",
                              "Only logical replication of this database is served here (docs/replication.md).")
                        + ready(self.status)
                    )  # fmt: skip
                    await self.writer.drain()
                    continue
                self.pending += 1
                self.idle.clear()
            self.up_writer.write(message(kind, body))
            await self.up_writer.drain()
            if kind == b"X":
                return

    async def slot_is_ours(self, slot: str) -> bool:
        """Ask Postgres on this connection, the answer consumed here (the connection is idle)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.intercept = queue
        try:
            self.up_writer.write(message(b"Q", slot_query(slot) + b"\0"))
            await self.up_writer.drain()
            found = False
            while True:
                kind, body = await queue.get()
                if kind == b"D":
                    found = True
                elif kind == b"E":
                    found = False
                    log.info("%s: slot check failed", self.who)
                elif kind == b"Z":
                    self.status = body[:1]
                    return found
        finally:
            self.intercept = None


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


async def serve(config: Config, ready_line: bool = True) -> None:
    gateway = Gateway(config)
    server = await asyncio.start_server(gateway.handle, config.listen_host, config.listen_port)
    host, port = server.sockets[0].getsockname()[:2]
    if ready_line:
        # The one line the tests and make dev wait for (the port may have been 0: any free one).
        print(f"replication gateway listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async def watch_parent() -> None:
        while os.getppid() == config.parent_pid:
            await asyncio.sleep(1)
        log.info("parent %d gone: stopping", config.parent_pid)
        stop.set()

    watcher = asyncio.create_task(watch_parent()) if config.parent_pid else None
    async with server:
        await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("replication gateway stopped")


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m tools.replication.gateway",
        description="Logical replication connections to Postgres, with every physical command refused (docs/replication.md).",
    )
    parser.add_argument("--listen", default="127.0.0.1:5434", help="HOST:PORT to listen on (port 0: any free one)")
    parser.add_argument(
        "--postgres", default="/var/run/postgresql",
        help="Postgres's Unix socket folder (a path) or host name; companions may log in only there",
    )  # fmt: skip
    parser.add_argument("--postgres-port", type=int, default=5432)
    parser.add_argument("--max-connections", type=int, default=200, help="client connections at once (default 200)")
    parser.add_argument("--login-timeout", type=float, default=10.0, help="seconds a client has to log in (default 10)")
    parser.add_argument("--max-message-bytes", type=int, default=1 << 20, help="largest client message (default 1 MiB)")
    parser.add_argument("--name-prefix", default="", help="serve only roles with this prefix (INSTAPG_NAME_PREFIX)")
    parser.add_argument("--tls-cert", default="", help="PEM certificate chain: TLS towards clients, then required")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--postgres-sslmode", default="disable", choices=("disable", "require", "verify-full"),
        help="TLS towards a Postgres host name (RDS: verify-full with --postgres-sslrootcert)",
    )  # fmt: skip
    parser.add_argument("--postgres-sslrootcert", default="", help="CA bundle for --postgres-sslmode verify-full")
    parser.add_argument("--parent-pid", type=int, default=0, help="stop when this parent process is gone")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    return Config(
        listen_host=host or "127.0.0.1",
        listen_port=int(port),
        postgres=args.postgres,
        postgres_port=args.postgres_port,
        max_connections=args.max_connections,
        login_timeout_s=args.login_timeout,
        max_message_bytes=args.max_message_bytes,
        name_prefix=args.name_prefix + "_" if args.name_prefix else "",
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        postgres_sslmode=args.postgres_sslmode,
        postgres_sslrootcert=args.postgres_sslrootcert,
        parent_pid=args.parent_pid,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
