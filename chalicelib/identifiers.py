"""Identifiers and secrets made by the service: database ids, tenant names, passwords."""

from __future__ import annotations

import base64
import hashlib
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


# A client-chosen id is the database's only credential on the public routes
# (see README "What the id, the creator token and an API key allow"), so it
# must be as unguessable as one we make: a v4 or v7 UUID whose random bits
# look random. Bounds are loose enough that a real random id fails them with
# a probability far below one in a million.
_V7_EARLIEST_MS = 1_577_836_800_000  # 2020-01-01: no real v7 id is older


def _random_bits(value: uuid.UUID) -> tuple[int, int] | None:
    """(random bits, how many) of a v4 or v7 UUID; None for any other version or variant."""
    if value.variant != uuid.RFC_4122:
        return None
    n = value.int
    if value.version == 4:
        # All but the 4 version bits and 2 variant bits: 122.
        return ((n >> 80) << 74) | (((n >> 64) & 0xFFF) << 62) | (n & ((1 << 62) - 1)), 122
    if value.version == 7:
        ms = n >> 80
        if not _V7_EARLIEST_MS <= ms <= time.time_ns() // 1_000_000 + 86_400_000:
            return None  # a zero or far-future timestamp is not a real v7 id
        return (((n >> 64) & 0xFFF) << 62) | (n & ((1 << 62) - 1)), 74
    return None


def parse_client_id(raw: str) -> str | None:
    """The canonical form of a client-chosen id when it is a random v4/v7 UUID, else None.

    Refuses other versions (v1 leaks a MAC and a time, v3/v5 are hashes of a
    name, the nil UUID and `...0001` are guesses) and ids whose random part
    is visibly not random: too few or too many set bits, or too few distinct
    hex digits.
    """
    canonical = parse_database_id(raw)
    if canonical is None:
        return None
    found = _random_bits(uuid.UUID(canonical))
    if found is None:
        return None
    bits, width = found
    ones = bin(bits).count("1")
    if not width // 5 <= ones <= width - width // 5:
        return None
    # Fewer distinct hex digits than this happen by chance about once in 10**11 ids: 5 or fewer of
    # v4's 31 digits (~1e-12), 3 or fewer of v7's 19 (~1e-11; at 5 or fewer it was ~1e-6, a v7 in a million).
    if len(set(f"{bits:0{(width + 3) // 4}x}")) < (6 if width > 100 else 4):
        return None
    return canonical


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


CREATOR_TOKEN_PREFIX = "ipgc_"


def creator_token() -> str:
    """The secret a create hands its caller once: 256 random bits; only its hash is stored."""
    return CREATOR_TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """SHA-256 of a 256-bit token: nothing to stretch, as for API keys (chalicelib.accounts)."""
    return hashlib.sha256(token.encode()).hexdigest()


def short_hash(value: str) -> str:
    """A log-safe stand-in for a capability (a database id): 12 hex digits of its SHA-256."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]
