"""Small X.509 and PEM helpers shared by the agent's side (leaf) and the CA's side (authority).

Pure functions over `cryptography` objects: loading PEM, fingerprints, SANs, key checks, and the
UTC timestamps that certificates carry.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtensionOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
MIN_RSA_BITS = 2048


def load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in `pem`, in order; ValueError naming `what` when there is none."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, TypeError):
        raise ValueError(f"{what}: not PEM certificates") from None
    if not certs:
        raise ValueError(f"{what}: no certificate")
    return certs


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER, in hex: what tells two roots apart."""
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM: the file's mode (0600) protects it, not a passphrase."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{what}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{what}: want an EC or RSA private key, got {type(key).__name__}")
    return key


def key_problem(key: PublicKeyTypes) -> str | None:
    """None when a workload may use `key` (EC P-256 or RSA of 2048 bits or more), else why not."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return None
        return f"the key is EC {key.curve.name}; want EC P-256 (secp256r1) or RSA of at least 2048 bits"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS:
            return None
        return f"the key is RSA of {key.key_size} bits; want at least {MIN_RSA_BITS} bits (or EC P-256)"
    return f"the key is {type(key).__name__}; want EC P-256 (secp256r1) or RSA of at least 2048 bits"


def san_names(obj: x509.Certificate | x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        ext = obj.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


def uri_sans(obj: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    return [n.value for n in san_names(obj) if isinstance(n, x509.UniformResourceIdentifier)]


def describe_name(name: x509.GeneralName) -> str:
    """A SAN as OpenSSL prints it (``DNS:a.example``), for messages."""
    prefixes = {x509.DNSName: "DNS", x509.UniformResourceIdentifier: "URI", x509.IPAddress: "IP",
                x509.RFC822Name: "email"}
    prefix = prefixes.get(type(name))
    if prefix is None:
        return type(name).__name__
    return f"{prefix}:{name.value}"


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether `parent` signed `child` (issuer name and signature both checked)."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def subject_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def utc(when: datetime | None = None) -> datetime:
    """`when` as an aware UTC datetime (naive ones are taken as UTC); now when None."""
    if when is None:
        return datetime.now(UTC)
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def iso(when: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes timestamps."""
    return utc(when).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
