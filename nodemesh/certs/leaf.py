"""Workload certificates on the node agent's side: keys, CSRs and the leaves the CA returns.

The agent generates each workload identity's key itself and sends the CA only a CSR, so private
keys never leave the node. A `Leaf` is what the agent then holds for one identity: the chain the
CA returned, the key, and the facts it needs to schedule renewal (at half of the lifetime) and to
notice a root rotation (the issuer's fingerprint). `to_json`/`from_json` let a restarted agent
keep its leaves; the caller writes them to a 0600 file.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodemesh.certs import pem
from nodemesh.certs.pem import PrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: small, fast, and what Envoy and every SPIFFE implementation accept."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey, spiffe_id: str) -> bytes:
    """A PEM CSR for `spiffe_id`: empty subject, the URI SAN alone (critical, as the subject is empty)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                          critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Leaf:
    """One workload identity's certificate and key, as the agent holds it."""

    spiffe_id: str
    chain_pem: bytes  # leaf first, then any intermediates; never the root
    key_pem: bytes = field(repr=False)  # PKCS8 PEM; kept out of repr so it cannot reach a log
    serial: int
    not_before: datetime
    not_after: datetime
    # sha256 of the issuing CA certificate's DER, so a leaf from before a root rotation shows; see
    # `leaf_from` for when the issuer is not known.
    issuer_fingerprint: str

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def renew_at(self) -> datetime:
        """Half-life: late enough not to churn, early enough to survive a CA outage of half a TTL."""
        return self.not_before + self.lifetime / 2

    def expires_in(self, now: datetime | None = None) -> float:
        """Seconds until the leaf expires (negative once it has)."""
        return (self.not_after - pem.utc(now)).total_seconds()

    def needs_renewal(self, now: datetime | None = None) -> bool:
        return pem.utc(now) >= self.renew_at

    def certificate(self) -> x509.Certificate:
        return pem.load_certs(self.chain_pem, "leaf chain")[0]

    def private_key(self) -> PrivateKey:
        return pem.load_private_key(self.key_pem, f"key of {self.spiffe_id}")

    def to_json(self) -> dict[str, Any]:
        # The serial is a string: 159-bit integers do not survive JSON readers that use doubles.
        return {"spiffeId": self.spiffe_id, "chain": self.chain_pem.decode(), "key": self.key_pem.decode(),
                "serial": format(self.serial, "x"), "notBefore": pem.iso(self.not_before),
                "notAfter": pem.iso(self.not_after), "issuerFingerprint": self.issuer_fingerprint}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Leaf:
        """The leaf `to_json` wrote; ValueError naming the field when the record is damaged.

        Everything but the issuer fingerprint is derived again from the chain and the key, so a
        record cannot claim another identity or expiry than its certificate has.
        """
        fields = {}
        for name in ("spiffeId", "chain", "key", "issuerFingerprint"):
            value = data.get(name) if isinstance(data, Mapping) else None
            if not isinstance(value, str):
                raise ValueError(f"leaf record: {name}: required, a string")
            fields[name] = value
        key = pem.load_private_key(fields["key"].encode(), f"leaf record {fields['spiffeId']}: key")
        leaf = leaf_from(fields["chain"].encode(), key)
        if leaf.spiffe_id != fields["spiffeId"]:
            raise ValueError(f"leaf record {fields['spiffeId']}: chain: the certificate is for "
                             f"{leaf.spiffe_id}")
        return cls(spiffe_id=leaf.spiffe_id, chain_pem=leaf.chain_pem, key_pem=leaf.key_pem,
                   serial=leaf.serial, not_before=leaf.not_before, not_after=leaf.not_after,
                   issuer_fingerprint=fields["issuerFingerprint"])


def leaf_from(chain_pem: bytes, key: PrivateKey, roots_pem: list[bytes] | None = None) -> Leaf:
    """The `Leaf` for a chain the CA returned for a CSR made with `key`.

    ValueError when the leaf's public key is not `key`'s or it does not carry exactly one URI SAN.
    `issuer_fingerprint` is the sha256 of the issuing CA certificate: the first intermediate when
    the chain has one, else the one of `roots_pem` that signed the leaf (ValueError if none did).
    With neither, the issuer's certificate is not at hand and it is ``keyid:<hex>`` of the leaf's
    AuthorityKeyIdentifier instead, which changes with a root rotation just as well.
    """
    certs = pem.load_certs(chain_pem, "chain")
    cert = certs[0]
    if pem.public_key_der(cert.public_key()) != pem.public_key_der(key.public_key()):
        raise ValueError("chain: the certificate's public key does not match the private key")
    uris = pem.uri_sans(cert)
    if len(uris) != 1:
        raise ValueError(f"chain: the certificate has {len(uris)} URI SANs; want exactly one (the SPIFFE ID)")
    return Leaf(spiffe_id=uris[0], chain_pem=b"".join(pem.cert_pem(c) for c in certs),
                key_pem=pem.key_to_pem(key), serial=cert.serial_number,
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                issuer_fingerprint=_issuer_fingerprint(certs, roots_pem))


def _issuer_fingerprint(certs: list[x509.Certificate], roots_pem: list[bytes] | None) -> str:
    if len(certs) > 1:
        return pem.fingerprint(certs[1])
    if roots_pem:
        for root in _load_roots(roots_pem):
            if pem.issued_by(certs[0], root):
                return pem.fingerprint(root)
        raise ValueError("chain: the certificate is not signed by any of the given roots")
    aki = pem.authority_key_id(certs[0])
    if aki is None:
        raise ValueError("chain: cannot tell the issuer (no intermediate, no roots given, "
                         "no AuthorityKeyIdentifier)")
    return "keyid:" + aki.hex()


def _load_roots(roots_pem: list[bytes]) -> list[x509.Certificate]:
    return [c for i, p in enumerate(roots_pem) for c in pem.load_certs(p, f"roots[{i}]")]


def verify_chain(chain_pem: bytes, roots_pem: list[bytes], now: datetime | None = None) -> str | None:
    """None when the chain is a valid workload certificate under one of the roots, else why not.

    For tests and diagnostics, not for the datapath (Envoy verifies peers itself): the leaf is not
    a CA, carries one URI SAN, every certificate is within its validity at `now`, each one is
    signed by the next, and the last by one of `roots_pem` (itself within validity).
    """
    at = pem.utc(now)
    try:
        certs = pem.load_certs(chain_pem, "chain")
        roots = _load_roots(roots_pem)
    except ValueError as e:
        return str(e)
    if not roots:
        return "no roots to verify against"
    if pem.is_ca(certs[0]):
        return "the leaf certificate is a CA certificate"
    if len(pem.uri_sans(certs[0])) != 1:
        return "the leaf certificate does not carry exactly one URI SAN"
    for i, cert in enumerate(certs):
        if reason := _validity_problem(cert, at):
            return f"chain[{i}] ({_name(cert)}): {reason}"
    for i, (child, parent) in enumerate(itertools.pairwise(certs)):
        if not pem.is_ca(parent):
            return f"chain[{i + 1}] ({_name(parent)}) is not a CA certificate"
        if not pem.issued_by(child, parent):
            return f"chain[{i}] ({_name(child)}) is not signed by chain[{i + 1}] ({_name(parent)})"
    top = certs[-1]
    for root in roots:
        if pem.issued_by(top, root):
            if reason := _validity_problem(root, at):
                return f"root {_name(root)}: {reason}"
            return None
    return (f"chain[{len(certs) - 1}] ({_name(top)}) is not signed by any of the {len(roots)} roots "
            f"(its issuer is {top.issuer.rfc4514_string() or 'empty'})")


def _validity_problem(cert: x509.Certificate, at: datetime) -> str | None:
    if at < cert.not_valid_before_utc:
        return f"not valid before {pem.iso(cert.not_valid_before_utc)}"
    if at > cert.not_valid_after_utc:
        return f"expired at {pem.iso(cert.not_valid_after_utc)}"
    return None


def _name(cert: x509.Certificate) -> str:
    uris = pem.uri_sans(cert)
    if uris and not pem.is_ca(cert):
        return uris[0]
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
