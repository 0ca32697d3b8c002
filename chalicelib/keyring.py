"""Where the credential key ring comes from: Secrets Manager in production, the environment locally.

The secret's value is the same `kid:base64key,...` text as INSTAPG_KEYRING
(tools/ops/keyringctl.py writes it). It is read lazily, on the first request that
needs it, never at import. Rotation puts a new primary in front of the old
keys; a warm Lambda learns about it in two ways: a ciphertext under a key id it
does not know makes it read the secret again (once), and it re-reads the
secret every few minutes so its own new ciphertexts move to the new primary.
"""

from __future__ import annotations

import logging
import threading
import time

from chalicelib import reliability
from chalicelib.crypto import KeyRing, KeyRingError, Sealed
from chalicelib.settings import Settings

log = logging.getLogger(__name__)

# How stale a warm Lambda's copy of the ring may get before encrypting with
# it re-reads the secret (one GetSecretValue per interval per instance).
REFRESH_INTERVAL_S = 300.0


def read_secret(secret_id: str, settings: Settings) -> KeyRing:
    import boto3

    client = boto3.client("secretsmanager", config=reliability.botocore_config(settings))
    raw = client.get_secret_value(SecretId=secret_id)["SecretString"]
    try:
        return KeyRing.parse(raw)
    except KeyRingError as exc:
        raise KeyRingError(f"the key ring secret is unusable ({exc}); run `python -m tools.ops.keyringctl rotate`") from None


class SecretKeyRing:
    """A KeyRing kept in a Secrets Manager secret; same encrypt/decrypt as KeyRing."""

    def __init__(self, secret_id: str, settings: Settings, refresh_interval_s: float = REFRESH_INTERVAL_S) -> None:
        self.secret_id = secret_id
        self.settings = settings
        self.refresh_interval_s = refresh_interval_s
        self._ring: KeyRing | None = None
        self._loaded = 0.0
        self._lock = threading.Lock()

    def _current(self, reload: bool = False) -> KeyRing:
        with self._lock:
            stale = time.monotonic() - self._loaded > self.refresh_interval_s
            if self._ring is None or reload or stale:
                self._ring = read_secret(self.secret_id, self.settings)
                self._loaded = time.monotonic()
            return self._ring

    @property
    def primary_id(self) -> str:
        return self._current().primary_id

    def encrypt(self, plaintext: str, context: str) -> Sealed:
        return self._current().encrypt(plaintext, context)

    def mac_key(self, purpose: str, kid: str | None = None) -> tuple[str, bytes] | None:
        # No re-read for an unknown kid: anyone can send one (a forged cookie), and the
        # worst a rotation does to a session signed under a newer key is one more login.
        return self._current().mac_key(purpose, kid)

    def decrypt(self, sealed: Sealed, context: str) -> str:
        ring = self._current()
        if sealed.key_id not in ring.keys:
            # Sealed by an instance that has already seen a newer ring.
            log.info("key %r not in the cached key ring; reading the secret again", sealed.key_id)
            ring = self._current(reload=True)
        return ring.decrypt(sealed, context)


def load(settings: Settings) -> KeyRing | SecretKeyRing:
    """The key ring the settings name: the secret when INSTAPG_KEYRING_SECRET_ARN is set, else INSTAPG_KEYRING."""
    if settings.keyring_secret_arn:
        return SecretKeyRing(settings.keyring_secret_arn, settings)
    return KeyRing.parse(settings.keyring)
