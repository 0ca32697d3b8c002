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

    @property
    def temporary(self) -> bool:
        """Worth retrying later: the server was unreachable, busy (503) or rate limiting (429)."""
        return self.status is None or self.status in (429, 502, 503, 504)


def _request(
    method: str,
    url: str,
    body: dict[str, Any] | None,
    timeout: float,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("User-Agent", USER_AGENT)
    req.add_header("Accept", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
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


def check_id(database_id: str) -> str:
    """A database id as the API spells it (a UUID), or ApiError: it goes into a URL path."""
    try:
        return str(uuid.UUID(database_id.strip()))
    except (ValueError, AttributeError):
        raise ApiError(
            f"{database_id!r} is not a database id", "Ids look like 2b929341-cbab-40c2-bdaa-8880ffbe4ac4.", 400
        ) from None


class Client:
    def __init__(self, base_url: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key

    def create(self, ref: str, logical_replication: bool = False, region: str | None = None) -> dict[str, Any]:
        """Create a database (in `region`, or the server's default region). The id is chosen here so that
        a retried request cannot make two."""
        database_id = str(uuid.uuid4())
        url = f"{self.base_url}/api/v1/database/{database_id}"
        body: dict[str, Any] = {"ref": ref, "enable_logical_replication": logical_replication}
        if region:
            body["region"] = region
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

    def delete_unclaimed(self, database_id: str, creator_token: str) -> None:
        """The creator deletes an unclaimed database early, with the creator token its create returned."""
        _request("DELETE", f"{self.base_url}/api/v1/database/{database_id}", None, self.timeout, creator_token)

    # The account's endpoints: each needs the API key (Authorization: Bearer).

    def _owner(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.api_key:
            raise ApiError(
                "this needs an API key",
                "Pass --api-key or set INSTAPG_API_KEY (create an account with POST /api/v1/accounts).",
                status=401,
            )
        return _request(method, f"{self.base_url}/api/v1{path}", body, self.timeout, self.api_key)[1]

    def claim(self, database_id: str, creator_token: str | None = None) -> dict[str, Any]:
        """Claim an unclaimed database for the key's account; the creator token goes along when there is one
        (the server checks it when sent, and requires it where INSTAPG_CLAIM_REQUIRES_TOKEN is on)."""
        if not self.api_key:
            raise ApiError("this needs an API key", "Pass --api-key or set INSTAPG_API_KEY.", status=401)
        headers = {"Instapg-Creator-Token": creator_token} if creator_token else None
        url = f"{self.base_url}/api/v1/database/{database_id}/claim"
        return _request("POST", url, {}, self.timeout, self.api_key, headers)[1]

    def list(self) -> list[dict[str, Any]]:
        return self._owner("GET", "/databases").get("databases", [])

    def owned(self, database_id: str) -> dict[str, Any]:
        """The owner's view: plan, live size and open connections."""
        return self._owner("GET", f"/databases/{database_id}")

    def connection(self, database_id: str) -> dict[str, Any]:
        """Connection strings of an owned database (the server audits every read)."""
        return self._owner("GET", f"/databases/{database_id}/connection-string")

    def rotate(self, database_id: str) -> dict[str, Any]:
        return self._owner("POST", f"/databases/{database_id}/rotate-password", {})

    def delete(self, database_id: str) -> None:
        self._owner("DELETE", f"/databases/{database_id}")

    def copy(self, database_id: str) -> dict[str, Any]:
        """A copy of an owned, claimed database: a new database with its own role and password."""
        return self._owner("POST", f"/databases/{database_id}/copies", {})

    def reset(self, copy_id: str) -> dict[str, Any]:
        """Make a copy a fresh copy of its source again (its changes are lost; its password stays)."""
        return self._owner("POST", f"/databases/{copy_id}/reset", {})
