"""The instapg HTTP API, with the standard library only."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from instapg_cli import __version__

USER_AGENT = f"instapg-cli/{__version__}"


class ApiError(Exception):
    """A failure worth one line to the user: what happened and what to do."""

    def __init__(self, message: str, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        text = self.message.rstrip(".")
        return f"{text}. {self.hint}" if self.hint else text


def _request(method: str, url: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("User-Agent", USER_AGENT)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _json(resp.read(), resp.status, url)
    except urllib.error.HTTPError as exc:
        payload = _json(exc.read(), exc.code, url, strict=False)
        error = payload.get("error") or f"HTTP {exc.code}"
        hint = payload.get("hint")
        retry = exc.headers.get("Retry-After")
        if retry and exc.code in (429, 503) and not hint:
            hint = f"Retry in {retry} seconds."
        elif retry and exc.code in (429, 503):
            hint = f"{hint.rstrip('.')}. (Retry-After: {retry}s)"
        raise ApiError(f"{error} (HTTP {exc.code})", hint, exc.code) from None
    except urllib.error.URLError as exc:
        raise ApiError(
            f"cannot reach {url}: {getattr(exc, 'reason', exc)}",
            "Is the server running? Start the local one with `make dev`, or point --url / INSTAPG_URL at yours.",
        ) from None
    except TimeoutError:
        raise ApiError(f"{url} did not answer within {timeout:.0f}s", "Retry in a moment.") from None


def _json(raw: bytes, status: int, url: str, strict: bool = True) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        if not strict:
            return {}
        raise ApiError(
            f"unexpected non-JSON answer (HTTP {status}) from {url}", "Is --url an instapg server?"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(f"unexpected answer (HTTP {status}) from {url}", "Is --url an instapg server?")
    return value


class Client:
    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def create(self, ref: str, logical_replication: bool = False) -> dict[str, Any]:
        """Create a database. The id is chosen here so that a retried request cannot make two."""
        database_id = str(uuid.uuid4())
        url = f"{self.base_url}/api/v1/database/{database_id}"
        body = {"ref": ref, "enable_logical_replication": logical_replication}
        for attempt in range(5):
            try:
                return _request("POST", url, body, self.timeout)[1]
            except ApiError as exc:
                # 409: the first attempt is still being provisioned; ask again.
                if exc.status != 409 or attempt == 4:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def get(self, database_id: str) -> dict[str, Any]:
        return _request("GET", f"{self.base_url}/api/v1/database/{database_id}", None, self.timeout)[1]
