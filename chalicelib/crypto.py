"""AES-256-GCM key ring for credentials at rest.

The ring is `kid:base64key,kid:base64key,...`; the first key encrypts, every
key decrypts, so a new primary can be put in front without re-encrypting.
Each ciphertext is bound to the record it belongs to through the associated
data, so a ciphertext copied onto another record does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

_KID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class KeyRingError(ValueError):
    """The key ring configuration is unusable (never includes key material)."""


@dataclass(frozen=True)
class Sealed:
    key_id: str
    blob: bytes  # 12-byte nonce followed by ciphertext and tag


@dataclass(frozen=True)
class KeyRing:
    primary_id: str
    keys: dict[str, bytes] = field(repr=False)

    @classmethod
    def parse(cls, spec: str) -> KeyRing:
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for entry in (part.strip() for part in (spec or "").split(",")):
            if not entry:
                continue
            kid, sep, encoded = entry.partition(":")
            if not sep or not _KID.match(kid):
                raise KeyRingError("each key ring entry must be 'kid:base64key' with a short kid")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise KeyRingError(f"key {kid!r} is not valid base64") from None
            if len(key) != 32:
                raise KeyRingError(f"key {kid!r} must be 32 bytes (AES-256)")
            if kid in keys:
                raise KeyRingError(f"key id {kid!r} appears twice")
            keys[kid] = key
            order.append(kid)
        if not order:
            raise KeyRingError("the key ring is empty: set INSTAPG_KEYRING")
        return cls(primary_id=order[0], keys=keys)

    def encrypt(self, plaintext: str, context: str) -> Sealed:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        ct = AESGCM(self.keys[self.primary_id]).encrypt(nonce, plaintext.encode(), context.encode())
        return Sealed(self.primary_id, nonce + ct)

    def mac_key(self, purpose: str, kid: str | None = None) -> tuple[str, bytes] | None:
        """(kid, a key for HMACs of `purpose`) derived from key `kid` (default: the primary); None if unknown.

        Derived, never the encryption key itself: a MAC and AES-GCM under one
        key would be one key for two jobs.
        """
        kid = self.primary_id if kid is None else kid
        key = self.keys.get(kid)
        if key is None:
            return None
        return kid, hmac.new(key, b"instapg mac key: " + purpose.encode(), hashlib.sha256).digest()

    def decrypt(self, sealed: Sealed, context: str) -> str:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self.keys.get(sealed.key_id)
        if key is None:
            raise KeyRingError(f"no key {sealed.key_id!r} in the key ring")
        try:
            plain = AESGCM(key).decrypt(sealed.blob[:12], sealed.blob[12:], context.encode())
        except InvalidTag:
            raise KeyRingError(f"ciphertext does not verify under key {sealed.key_id!r}") from None
        return plain.decode()


def new_key_spec(kid: str) -> str:
    """A fresh `kid:base64key` entry, for operators and the local stack."""
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"
