"""A small certificate authority for mutual TLS between agents and process servers.

The playbooks (and the demo and tests) make one CA per deployment and issue
each component a certificate signed by it.  Keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, cast

# The certificate authority's half imports cryptography when it is used: the daemons
# only make TLS contexts and read peer certificates (ssl), and cryptography.x509 took
# a quarter of the agent's imports at every start.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

VALID_DAYS = 825
"""Lifetime of issued certificates, in days."""


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferry"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip


def make_ca(directory: str | Path, name: str = "Ferry CA") -> tuple[Path, Path]:
    """Create ``ca.pem`` and ``ca.key`` in ``directory`` unless they exist; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = d / "ca.pem", d / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS * 2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


TENANT_URI = "urn:ferry:tenant:"
"""Prefix of the URI subject alternative names that bind an agent certificate to tenants."""

MACHINE_URI = "urn:ferry:machine:"
"""Prefix of the URI subject alternative name naming the machine an agent certificate is for."""


ROLES = ("agent", "server")
"""What a certificate may do, decided by the issuer: an ``agent`` authenticates as a TLS
client only, bound to its tenants and machine; a ``server`` (process server, a local
configuration server) as a TLS server only, for its host names."""


def issue(
    ca_dir: str | Path,
    out_dir: str | Path,
    name: str,
    hosts: list[str] | None = None,
    tenants: list[str] | None = None,
    role: str | None = None,
    machine: str | None = None,
) -> tuple[Path, Path]:
    """Issue ``<name>.pem``/``<name>.key`` signed by the CA in ``ca_dir``; return their paths.

    The role decides usage and names, never the caller's wishes: an
    ``agent`` certificate is for client authentication only and carries
    ``urn:ferry:tenant:<t>`` for each of ``tenants`` and
    ``urn:ferry:machine:<machine>`` (a process server takes the machine from
    it), and no host names; a ``server`` certificate is for server
    authentication only and carries ``hosts`` (DNS names or IP addresses).
    ``role`` defaults to ``agent`` when ``tenants`` or ``machine`` are given.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID

    role = role or ("agent" if tenants or machine else "server")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if role == "agent" and (hosts or not tenants or not machine):
        raise ValueError("an agent certificate needs its tenants and machine, and no host names")
    if role == "server" and (tenants or machine):
        raise ValueError("a server certificate binds no tenant or machine")
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, dsa.DSAPrivateKey)):
        # what .sign(..., SHA256) can use
        raise ValueError(f"{ca_dir / 'ca.key'} is a {type(ca_key).__name__}, not an EC or RSA key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for host in (hosts or ["localhost", "127.0.0.1"]) if role == "server" else []:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    sans += [x509.UniformResourceIdentifier(TENANT_URI + t) for t in tenants or []]
    if machine:
        sans.append(x509.UniformResourceIdentifier(MACHINE_URI + machine))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if role == "agent" else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS server context that requires a client certificate from ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No TLS 1.3 session tickets: they arrive after the handshake and made
    # concurrent reads and writes on one connection fail (BAD_RECORD_MAC).
    ctx.num_tickets = 0
    return ctx


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS client context presenting ``cert`` and trusting only ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = True
    return ctx


def _peer_uris(sock: ssl.SSLSocket, prefix: str) -> set[str]:
    cert = sock.getpeercert() or {}
    # ssl documents subjectAltName as pairs ("DNS", "name"), ("URI", "urn:..."), ...
    names = cast("tuple[tuple[str, str], ...]", cert.get("subjectAltName", ()))
    return {value.removeprefix(prefix) for kind, value in names
            if kind == "URI" and value.startswith(prefix)}  # fmt: skip


def peer_tenants(sock: ssl.SSLSocket) -> set[str]:
    """The tenants the verified peer certificate is bound to (``*``: any); empty if none."""
    return _peer_uris(sock, TENANT_URI)


def peer_machines(sock: ssl.SSLSocket) -> set[str]:
    """The machines the verified peer certificate is bound to (``*``: any); empty if none."""
    return _peer_uris(sock, MACHINE_URI)


def peer_name(sock: ssl.SSLSocket) -> str:
    """Common name of the verified peer certificate."""
    cert = sock.getpeercert() or {}
    # ssl documents subject as relative distinguished names of (key, value) pairs.
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return value
    return "unknown"
