"""`chalice local`'s server, with the differences that make it answer as production does.

- An unknown path answers 404 JSON, as the API Gateway gateway response in
  the deployed stack does (plain chalice local answers 403 "Missing
  Authentication Token").
- `requestContext.identity.sourceIp` is the real peer address, as API Gateway
  sets it (chalice local always says 127.0.0.1), so each client address has
  its own rate-limit budget. X-Forwarded-For is not read, as in production.
- TRACE, CONNECT and any method Chalice has no handler for answer 405 JSON
  with an Allow header (plain chalice local: 501 HTML); every error the HTTP
  layer itself sends is JSON.
- Reads are bounded: a client gets READ_TIMEOUT_S to send each request's
  body, and an idle connection is closed after as long, so a slow or
  never-finished body holds a worker thread for at most that long.
- The access log shows a short hash for every database id in a path: an
  unclaimed database's id is enough to read its password (README, "Web
  security"), and access logs are read by more people than the database.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from chalice.local import ChaliceRequestHandler, ForbiddenError, LocalDevServer, LocalGatewayException

from chalicelib.http import NOT_FOUND_BODY
from chalicelib.identifiers import short_hash

_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def redact_ids(line: str) -> str:
    """`line` with each UUID replaced by `id:` and 12 hex digits of its SHA-256 (still greppable, not usable)."""
    return _UUID.sub(lambda m: "id:" + short_hash(m.group(0).lower()), line)

# API Gateway waits at most 30 s for a whole request (its integration limit)
# and refuses bodies over 10 MB; locally a client that has not sent its body
# in 10 s is not coming back with it: far above what a real client needs on
# loopback, short enough that a few stuck clients cannot tie up the server.
READ_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 10 * 1024 * 1024
# What BaseHTTPRequestHandler.send_error says for the statuses it sends itself.
_HINTS = {
    400: "The HTTP request line or headers are malformed.",
    408: f"Send the whole request body within {READ_TIMEOUT_S:.0f} seconds.",
    413: f"Bodies over {MAX_BODY_BYTES} bytes are refused.",
    414: "The URL is too long.",
    431: "The request headers are too large.",
    505: "Use HTTP/1.1.",
}


class _ReadTimeout(Exception):
    pass


class InstapgRequestHandler(ChaliceRequestHandler):
    timeout = READ_TIMEOUT_S  # socketserver applies it to the socket: the idle and per-read bound
    # The headers and the body leave in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers: 40 ms added to every answer on a kept-alive connection.
    disable_nagle_algorithm = True

    def _generic_handle(self) -> None:
        # Each connection has its own LocalGateway, so this instance attribute is this peer's alone.
        self.local_gateway.event_converter.LOCAL_SOURCE_IP = self.client_address[0]
        try:
            super()._generic_handle()
        except _ReadTimeout:
            self.close_connection = True
            try:
                self._send_json(408, "Request body timed out")
            except OSError:
                pass  # the client hung up before sending its body: nobody is left to answer

    # Chalice's class body says `do_GET = ... = _generic_handle`, binding its
    # own function: without these lines the override above never runs.
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _generic_handle

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler looks up `do_<METHOD>` and answers 501 HTML when
        # it is missing: TRACE, CONNECT and made-up methods get a 405 instead.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._discard_body()
        self._send_json(
            405,
            "Method Not Allowed",
            "See GET /api/v1/openapi.yaml for the methods each path accepts.",
            {"Allow": ", ".join(self._allowed_methods())},
        )

    def _allowed_methods(self) -> list[str]:
        """The methods the path's route accepts; none when no route matches."""
        try:
            match = self.local_gateway.event_converter._route_matcher.match_route(self.path)
        except ValueError:
            return []
        return sorted(self.local_gateway._app_object.routes[match.route])

    def _parse_payload(self) -> tuple[dict[str, str], bytes | None]:
        """The headers and the body, read within READ_TIMEOUT_S in all."""
        length = self._content_length()
        body = None
        if length > 0:
            body = self._read_body(length)
        return dict(self.headers), body

    def _content_length(self) -> int:
        raw = self.headers.get("content-length", "0")
        if not raw.isdigit():
            raise _Refused(400, "Invalid Content-Length header", "Send the body's length in bytes.")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            raise _Refused(413, "Request body too large", _HINTS[413])
        return length

    def _read_body(self, length: int) -> bytes:
        deadline = time.monotonic() + READ_TIMEOUT_S
        chunks: list[bytes] = []
        remaining = length
        try:
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _ReadTimeout
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:  # the client closed before sending it all
                    raise _ReadTimeout
                chunks.append(chunk)
                remaining -= len(chunk)
        except TimeoutError:
            raise _ReadTimeout from None
        finally:
            self.connection.settimeout(READ_TIMEOUT_S)
        return b"".join(chunks)

    def _discard_body(self) -> None:
        try:
            length = self._content_length()
            if length:
                self._read_body(length)
        except (_Refused, _ReadTimeout):
            self.close_connection = True

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Refused as refused:
            self.close_connection = True
            self._send_json(refused.status, refused.error, refused.hint)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The HTTP layer's own errors (bad request line, headers too large, ...) as JSON."""
        self.close_connection = True
        self._send_json(code, message or self.responses.get(code, ("Error",))[0])

    def _send_json(
        self, status: int, error: str, hint: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"error": error, "hint": hint or _HINTS.get(status)}).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        if self.close_connection:
            headers["Connection"] = "close"
        if self.command == "HEAD":
            self._send_http_response_no_body(status, headers)
            return
        self._send_http_response(status, headers, body)

    def _send_error_response(self, error: LocalGatewayException) -> None:
        if isinstance(error, ForbiddenError) and b"Missing Authentication Token" in (error.body or b""):
            body = json.dumps(NOT_FOUND_BODY).encode()
            headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
            headers.update({"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"})
            self._send_http_response(404, headers, body)
            return
        super()._send_error_response(error)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        sys.stderr.write(f"{self.address_string()} - - [{self.log_date_time_string()}] {redact_ids(format % args)}\n")


class _Refused(Exception):
    def __init__(self, status: int, error: str, hint: str) -> None:
        super().__init__(error)
        self.status, self.error, self.hint = status, error, hint


def create_server(project_dir: Path, host: str, port: int, stage: str = "dev") -> LocalDevServer:
    """The app in `project_dir` served as `chalice local --stage <stage>` serves it.

    Like `chalice local`, it applies the stage's environment variables from
    .chalice/config.json before importing the app; variables already set win,
    so the local stack can point the app at its own services.
    """
    import os

    from chalice.cli import factory
    from chalice.local import CustomLocalChalice, LocalChalice

    cli = factory.CLIFactory(str(project_dir))
    config = cli.create_config_obj(chalice_stage_name=stage)
    for key, value in config.environment_variables.items():
        os.environ.setdefault(key, value)
    app = cli.load_chalice_app()
    # socketserver's default listen backlog is 5: a burst of concurrent
    # clients (the bench runs 16) would see connections reset.
    from chalice.local import ThreadedHTTPServer

    ThreadedHTTPServer.request_queue_size = 128
    # What chalice.local.create_local_server does, with our handler class;
    # only once per process (a second server in the same process, as the
    # browser tests start, would make the class its own base).
    if not isinstance(app, CustomLocalChalice):
        CustomLocalChalice.__bases__ = (LocalChalice, app.__class__)
        app.__class__ = CustomLocalChalice
    return LocalDevServer(app, config, host, port, handler_cls=InstapgRequestHandler)
