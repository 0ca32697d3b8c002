"""What every HTTP request and response goes through: origin checks and security headers.

One Chalice middleware (`http_policy`, registered first, so it is the
outermost) does three things:

1. Refuses to serve at all when deployed without INSTAPG_PUBLIC_URL: the
   Host header is the client's to choose, so a deployed service never builds
   a link from it. Every request answers 503 and the log says why.
2. The cross-site rule, for POST/PUT/PATCH/DELETE. Browsers say where a
   request comes from (`Origin` on every cross-origin POST, and
   `Sec-Fetch-Site` in current browsers); get-db, the CLI and curl send
   neither. So: no `Origin` and no `Sec-Fetch-Site` is a program, served as
   before (curl's default form content type included). A browser request
   from another site, or from an opaque origin (`Origin: null`), is a 403,
   unless its origin is listed in INSTAPG_ALLOWED_ORIGINS. A browser request
   from this site to a JSON route (/api/, /admin/api/) must say
   `application/json` (415 otherwise), so no HTML form anywhere can stand in
   for the API. The claim
   page's own forms are same-origin, and go to /claim/..., not /api/.
3. Headers on every response: `Cache-Control: no-store` on JSON (bodies
   may carry a password or an API key), `X-Content-Type-Options: nosniff`,
   `X-Frame-Options: DENY`, `Strict-Transport-Security` when the request
   came over HTTPS, and `Access-Control-Allow-Origin` for an allowed origin.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from chalice import Response

from chalicelib import context
from chalicelib.errors import DomainError, Forbidden, Unavailable, UnsupportedMediaType
from chalicelib.http import http_error
from chalicelib.settings import Settings

log = logging.getLogger(__name__)

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
HSTS = "max-age=31536000"
# A Host header we are willing to echo into a link: a DNS name or IPv4
# address with an optional port, or a bracketed IPv6 address. Anything else
# (a scheme, a path, spaces, 60 KB of it) gives the fallback.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
FALLBACK_BASE = "http://localhost"


def _first(headers: Mapping[str, str], name: str) -> str:
    """A header's first comma-separated value, lowercased and stripped ('' when absent)."""
    return (headers.get(name) or "").split(",")[0].strip().lower()


def request_scheme(headers: Mapping[str, str]) -> str:
    """http or https, as the proxy in front says; anything else counts as http."""
    proto = _first(headers, "x-forwarded-proto")
    return proto if proto in ("http", "https") else "http"


def base_url(settings: Settings, headers: Mapping[str, str], context: Mapping[str, Any] | None) -> str:
    """The public base URL for links (claim_url, the page's examples).

    INSTAPG_PUBLIC_URL when set (always, once deployed). Locally, the
    request's own scheme and host when they are sane, else FALLBACK_BASE.
    """
    if settings.public_url:
        return settings.public_url
    host = (headers.get("host") or "").strip()
    if not _HOST.fullmatch(host):
        return FALLBACK_BASE
    stage = (context or {}).get("stage")
    # Behind API Gateway's default domain, paths carry the stage name.
    prefix = f"/{stage}" if stage and host.endswith(".amazonaws.com") else ""
    return f"{request_scheme(headers)}://{host.lower()}{prefix}"


def _origin_of(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/')[0]}".lower()


def check_request(
    settings: Settings, method: str, path: str, headers: Mapping[str, str], context: Mapping[str, Any] | None
) -> None:
    """Raise the error a request gets before any route runs (see the module docstring), or return."""
    if settings.deployed and not settings.public_url:
        log.error("INSTAPG_PUBLIC_URL is not set: refusing every request (links would be built from the Host header)")
        raise Unavailable(
            "Service not configured",
            hint="The operator must set INSTAPG_PUBLIC_URL; retry later.",
            retry_after=300,
        )
    if method.upper() not in UNSAFE_METHODS:
        return
    origin = _first(headers, "origin")
    site = _first(headers, "sec-fetch-site")
    if not origin and not site:
        return  # not a browser: get-db, the CLI, curl
    if origin and origin in settings.allowed_origins:
        return
    # Sec-Fetch-Site is set by the browser itself and no page can change it;
    # Origin is the fallback for browsers that do not send it.
    if site:
        foreign = site not in ("same-origin", "none")
    else:
        foreign = origin != _origin_of(base_url(settings, headers, context))
    if foreign:
        raise Forbidden(
            "Cross-site request refused",
            hint="Browsers on other sites may not call this API; call it from your server, "
            "or ask the operator to add your origin to INSTAPG_ALLOWED_ORIGINS.",
        )
    if path.startswith(("/api/", "/admin/api/")) and method.upper() != "DELETE":
        content_type = _first(headers, "content-type").split(";")[0].strip()
        if content_type != "application/json":
            raise UnsupportedMediaType(
                "Browsers must send JSON to the API",
                hint="Send the body with 'Content-Type: application/json'.",
            )


def secure(response: Response, headers: Mapping[str, str], settings: Settings) -> Response:
    """Add the security headers every response carries (never overriding a route's own)."""
    have = {name.lower() for name in response.headers}

    def put(name: str, value: str) -> None:
        if name.lower() not in have:
            response.headers[name] = value

    content_type = next((v for k, v in response.headers.items() if k.lower() == "content-type"), "")
    if content_type.startswith("application/json"):
        put("Cache-Control", "no-store")
    put("X-Content-Type-Options", "nosniff")
    put("X-Frame-Options", "DENY")
    if request_scheme(headers) == "https":
        put("Strict-Transport-Security", HSTS)
    origin = _first(headers, "origin")
    if origin and origin in settings.allowed_origins:
        put("Access-Control-Allow-Origin", origin)
        put("Vary", "Origin")
    return response


def http_policy(event: Any, get_response: Callable[[Any], Response]) -> Response:
    """Chalice HTTP middleware: the checks before a route, the headers after it."""
    headers = event.headers
    try:
        settings = context.settings()
    except ValueError as exc:  # a malformed setting: say which, never serve half-configured
        log.error("configuration error: %s", exc)
        error = Unavailable(
            "Service not configured",
            hint="The operator must fix its settings; retry later.",
            retry_after=300,
        )
        return http_error(error)
    try:
        check_request(settings, event.method, event.path, headers, event.context)
    except DomainError as exc:
        return secure(http_error(exc), headers, settings)
    return secure(get_response(event), headers, settings)
