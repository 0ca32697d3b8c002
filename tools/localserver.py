"""`chalice local`'s server, with two differences that match production.

- An unknown path answers 404 JSON, as the API Gateway gateway response in
  the deployed stack does (plain chalice local answers 403 "Missing
  Authentication Token").
- `requestContext.identity.sourceIp` is the real peer address, as API Gateway
  sets it (chalice local always says 127.0.0.1).
- The access log shows a short hash for every database id in a path: an
  unclaimed database's id is enough to read its password (README, "Web
  security"), and access logs are read by more people than the database.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from chalice.local import ChaliceRequestHandler, ForbiddenError, LocalDevServer, LocalGatewayException

from chalicelib.errors import NOT_FOUND_BODY
from chalicelib.identifiers import short_hash

_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def redact_ids(line: str) -> str:
    """`line` with each UUID replaced by `id:` and 12 hex digits of its SHA-256 (still greppable, not usable)."""
    return _UUID.sub(lambda m: "id:" + short_hash(m.group(0).lower()), line)


class InstapgRequestHandler(ChaliceRequestHandler):
    def _generic_handle(self) -> None:
        self.local_gateway.event_converter.LOCAL_SOURCE_IP = self.client_address[0]
        super()._generic_handle()

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
