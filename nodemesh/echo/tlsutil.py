"""TLS material for the echo server's TLS listeners.

The conformance manifests pass ``--crt=/cert.crt --key=/cert.key``; those files exist inside the
upstream image but usually not here. :func:`load_keypair` reads them when both exist and otherwise
generates a self-signed certificate (ECDSA P-256, valid one year, SANs for the pod name, the
usual service names, ``localhost``, 127.0.0.1 and ``$POD_IP``) with the ``cryptography`` package.
:func:`server_context` turns the PEM pair into an :class:`ssl.SSLContext` that records the SNI
name the client sent, so the HTTP echo can report it like echo-basic does.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import tempfile
import weakref
from dataclasses import dataclass

__all__ = ["KeyPair", "load_keypair", "self_signed", "server_context", "sni_of"]


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate chain and its private key, and where they came from."""

    cert_pem: bytes
    key_pem: bytes
    source: str  # "file:<path>" or "self-signed"


def self_signed(names: list[str], ips: list[str]) -> KeyPair:
    """Generate a self-signed certificate for ``names`` (DNS SANs) and ``ips`` (IP SANs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    dns = list(dict.fromkeys(n for n in names if n))
    addrs = []
    for ip in dict.fromkeys(ips):
        try:
            addrs.append(ipaddress.ip_address(ip))
        except ValueError:
            continue
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "echo")])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(a) for a in addrs]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        source="self-signed",
    )


def load_keypair(crt: str | None, key: str | None, names: list[str], ips: list[str]) -> KeyPair:
    """Read ``crt``/``key`` if both files exist, else generate a self-signed pair."""
    if crt and key and os.path.isfile(crt) and os.path.isfile(key):
        with open(crt, "rb") as f:
            cert_pem = f.read()
        with open(key, "rb") as f:
            key_pem = f.read()
        return KeyPair(cert_pem, key_pem, f"file:{crt}")
    return self_signed(names, ips)


# SNI names seen by server contexts, keyed by the SSLObject of the connection.
_SNI: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def _remember_sni(sslobj: object, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    if server_name:
        # An object that is not weak-referenceable simply gets no SNI reported.
        with contextlib.suppress(TypeError):
            _SNI[sslobj] = server_name


def sni_of(sslobj: object) -> str:
    """The SNI name the client sent on this connection, or ``""``."""
    try:
        return _SNI.get(sslobj, "")
    except TypeError:
        return ""


def server_context(pair: KeyPair, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A server-side SSLContext for ``pair`` (TLS 1.2+), offering ``alpn`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only reads files: write the PEMs to a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="nodemesh-echo-") as tmp:
        cert_path = os.path.join(tmp, "tls.crt")
        key_path = os.path.join(tmp, "tls.key")
        with open(cert_path, "wb") as f:
            f.write(pair.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    ctx.sni_callback = _remember_sni
    return ctx
