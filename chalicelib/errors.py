"""The domain's exceptions: what went wrong and what the caller can do about it.

Plain Python exceptions, no HTTP and no Chalice: each carries a short
`error`, a `hint`, and where it applies when to retry (`retry_after`) or
how to authenticate (`challenge`). chalicelib/http.py is the one place that
turns them into responses (status codes, headers, the `{"error", "hint"}`
body).
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    def __init__(
        self,
        error: str,
        hint: str | None = None,
        retry_after: int | None = None,
        challenge: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.hint = hint
        self.retry_after = retry_after
        self.challenge = challenge  # how to authenticate, for Unauthenticated
        self.extra = extra  # more fields for the body (e.g. expired_at)


class Invalid(DomainError):
    """The request is malformed: a bad id, body or field."""


class Unauthenticated(DomainError):
    """No credential, or one that is not valid."""


class Forbidden(DomainError):
    """A valid credential that does not allow this."""


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    """The thing is in a state that does not allow this now (claimed, still being created...)."""


class Gone(DomainError):
    """It existed and ended (expired, deleted, failed)."""


class TooLarge(DomainError):
    """The request body is larger than allowed."""


class UnsupportedMediaType(DomainError):
    pass


class Refused(DomainError):
    """Well-formed, but this deployment will not do it (a feature it lacks, a reused Idempotency-Key)."""


class RateLimited(DomainError):
    """Too many requests (or failed authentications) from this caller; `retry_after` says when."""


class Unavailable(DomainError):
    """A dependency (a Postgres host, the metadata store, the audit log) failed; retry later."""

    def __init__(self, error: str, hint: str | None = None, retry_after: int = 5, **extra: Any) -> None:
        # Every 503 says when to come back; 5 s unless the raiser knows better.
        super().__init__(error, hint, retry_after=retry_after, **extra)
