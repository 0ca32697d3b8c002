"""Checked parsing of the environment's values, one function per kind of value.

chalicelib.settings reads the environment (with ENVIRONMENT's defaults) and hands each raw value here;
a malformed one raises ValueError naming the setting, which the service answers as 503 "Service not
configured" with the reason in the log (chalicelib.http).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit


def integer(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def fraction(name: str, raw: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {raw!r}")
    return value


def copy_strategy(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("wal_log", "file_copy"):
        raise ValueError(f"INSTAPG_COPY_STRATEGY must be wal_log or file_copy, got {value!r}")
    return value


def public_url(raw: str) -> str | None:
    value = raw.strip().rstrip("/")
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"INSTAPG_PUBLIC_URL must be an http(s) URL like https://db.example.com, got {value!r}")
    return value


def origins(raw: str) -> tuple[str, ...]:
    """INSTAPG_ALLOWED_ORIGINS: comma-separated origins, lower-cased, without a trailing slash."""
    found = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in found:
        if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
            raise ValueError(f"INSTAPG_ALLOWED_ORIGINS holds origins like https://app.example.com, got {origin!r}")
    return found


def app_path(raw: str) -> str | None:
    """An absolute path; a relative one is taken from the folder app.py is in (Lambda: /var/task)."""
    if not raw:
        return None
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), raw)
    return os.path.normpath(path)
