"""Operator command for the credential key ring kept in Secrets Manager.

    python -m tools.ops.keyringctl rotate --secret-id ARN [--kid k2]   # new primary in front; first run initializes
    python -m tools.ops.keyringctl show --secret-id ARN                # key ids, primary first (never key material)
    python -m tools.ops.keyringctl new [--kid k1]                      # a fresh `kid:base64key` for INSTAPG_KEYRING

Old keys stay in the ring and keep decrypting what they sealed; removing one
would need every record sealed under it re-encrypted first (not built).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

# The value infra/resources.yaml gives a new secret: no key yet.
UNINITIALIZED = "UNINITIALIZED"


def _default_kid() -> str:
    return "k" + datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def rotated(current: str, kid: str) -> str:
    """The ring text with a new primary key `kid` in front of `current`'s keys."""
    from chalicelib.crypto import KeyRing, new_key_spec

    current = (current or "").strip()
    if current in ("", UNINITIALIZED):
        return new_key_spec(kid)
    ring = KeyRing.parse(current)  # refuse to build on a ring that does not parse
    if kid in ring.keys:
        raise SystemExit(f"key id {kid!r} is already in the ring")
    return f"{new_key_spec(kid)},{current}"


def rotate(secret_id: str, kid: str | None = None, client=None) -> list[str]:
    """Put a new primary key in front; returns the key ids, primary first."""
    import boto3

    from chalicelib.crypto import KeyRing

    client = client or boto3.client("secretsmanager")
    current = client.get_secret_value(SecretId=secret_id)["SecretString"]
    new = rotated(current, kid or _default_kid())
    client.put_secret_value(SecretId=secret_id, SecretString=new)
    KeyRing.parse(new)
    return _kids(new)


def _kids(text: str) -> list[str]:
    return [entry.split(":", 1)[0].strip() for entry in text.split(",") if entry.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Manage instapg's credential key ring.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_rotate = sub.add_parser("rotate", help="put a new primary key in front (initializes an empty secret)")
    p_rotate.add_argument("--secret-id", required=True)
    p_rotate.add_argument("--kid", help="id of the new key (default: k<UTC timestamp>)")
    p_show = sub.add_parser("show", help="list the key ids, primary first")
    p_show.add_argument("--secret-id", required=True)
    p_new = sub.add_parser("new", help="print a fresh kid:base64key entry for INSTAPG_KEYRING")
    p_new.add_argument("--kid", default="k1")
    args = parser.parse_args(argv)

    if args.command == "new":
        from chalicelib.crypto import new_key_spec

        print(new_key_spec(args.kid))
    elif args.command == "rotate":
        kids = rotate(args.secret_id, args.kid)
        print(f"primary key is now {kids[0]}; ring: {', '.join(kids)}")
    else:
        import boto3

        from chalicelib.crypto import KeyRing

        text = boto3.client("secretsmanager").get_secret_value(SecretId=args.secret_id)["SecretString"]
        if text.strip() == UNINITIALIZED:
            print("not initialized: run `python -m tools.ops.keyringctl rotate --secret-id ...`")
            return 1
        KeyRing.parse(text)
        print(", ".join(_kids(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
