from __future__ import annotations

import pytest

from chalicelib.crypto import KeyRing, KeyRingError, new_key_spec


def test_round_trip_and_rotation():
    old = KeyRing.parse(new_key_spec("k1"))
    sealed = old.encrypt("s3cret", context="db-1")
    assert sealed.key_id == "k1" and b"s3cret" not in sealed.blob
    rotated = KeyRing.parse(new_key_spec("k2") + "," + old_spec_of(old))
    assert rotated.primary_id == "k2"
    assert rotated.decrypt(sealed, context="db-1") == "s3cret"
    assert rotated.encrypt("x", context="db-2").key_id == "k2"


def old_spec_of(ring: KeyRing) -> str:
    import base64

    return ",".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in ring.keys.items())


def test_ciphertext_is_bound_to_its_record():
    ring = KeyRing.parse(new_key_spec("k1"))
    sealed = ring.encrypt("s3cret", context="db-1")
    with pytest.raises(KeyRingError):
        ring.decrypt(sealed, context="db-2")


def test_unknown_key_id_fails_clearly():
    sealed = KeyRing.parse(new_key_spec("k1")).encrypt("s3cret", context="db-1")
    with pytest.raises(KeyRingError, match="no key 'k1'"):
        KeyRing.parse(new_key_spec("k9")).decrypt(sealed, context="db-1")


@pytest.mark.parametrize("spec", ["", "nokey", "k1:notbase64!!", "k1:" + "QUFB", "k1:{k},k1:{k}"])
def test_bad_key_rings_are_refused_without_echoing_keys(spec):
    key = new_key_spec("k1").split(":", 1)[1]
    spec = spec.format(k=key)
    with pytest.raises(KeyRingError) as err:
        KeyRing.parse(spec)
    assert key not in str(err.value)


def test_repr_never_shows_key_material():
    spec = new_key_spec("k1")
    assert spec.split(":", 1)[1] not in repr(KeyRing.parse(spec))
