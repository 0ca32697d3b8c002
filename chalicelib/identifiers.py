"""Identifiers and secrets made by the service: database ids, tenant names, passwords."""

from __future__ import annotations

import base64
import os
import secrets
import time
import uuid


def uuid7() -> uuid.UUID:
    """A UUID version 7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 used
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 68) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return uuid.UUID(int=value)


def parse_database_id(raw: str) -> str | None:
    """The canonical lowercase form of a UUID, or None when `raw` is not one."""
    if not isinstance(raw, str) or len(raw) > 64:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


def tenant_name(prefix: str) -> str:
    """An opaque role/database name: prefix plus 128 random bits in base32.

    Names are visible to every tenant in pg_database and pg_roles, so they carry
    nothing derived from the database id or from user input.
    """
    token = base64.b32encode(os.urandom(16)).decode().rstrip("=").lower()
    return f"{prefix}_{token}"


def tenant_password() -> str:
    """192 random bits, URL-safe so it can sit in a connection string as is."""
    return secrets.token_urlsafe(24)
