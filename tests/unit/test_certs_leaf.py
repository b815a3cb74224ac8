"""The agent's side of workload certificates: keys, CSRs, `Leaf`, and chain verification."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from nodemesh.certs.authority import BuiltinCA
from nodemesh.certs.leaf import Leaf, leaf_from, make_csr, new_key, verify_chain

SID = "spiffe://cluster.local/ns/prod/sa/api"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> BuiltinCA:
    return BuiltinCA.create(str(tmp_path_factory.mktemp("leaf") / "ca"), "cluster.local")


def signed(ca: BuiltinCA, sid: str = SID, ttl: float = 3600) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = new_key()
    return key, ca.sign(make_csr(key, sid), sid, ttl)


def pem_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def hand_cert(key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
              issuer_key: ec.EllipticCurvePrivateKey, *, uris: tuple[str, ...] = (SID,), ca: bool = False,
              cn: str = "", start: datetime | None = None, days: int = 1,
              aki: bool = True) -> x509.Certificate:
    """A certificate made by hand, for shapes the built-in CA never produces."""
    now = start or datetime.now(UTC) - timedelta(minutes=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer.subject if issuer is not None else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=not cn)
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


# ---- keys and CSRs ---------------------------------------------------------------------------

def test_new_key_is_a_fresh_p256_key() -> None:
    a, b = new_key(), new_key()
    assert isinstance(a, ec.EllipticCurvePrivateKey) and isinstance(a.curve, ec.SECP256R1)
    assert a.private_numbers().private_value != b.private_numbers().private_value


def test_make_csr_carries_exactly_the_uri_san_and_an_empty_subject() -> None:
    key = new_key()
    data = make_csr(key, SID)
    assert data.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    csr = x509.load_pem_x509_csr(data)
    assert csr.is_signature_valid
    assert len(csr.subject) == 0
    ext = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert ext.critical
    assert list(ext.value) == [x509.UniformResourceIdentifier(SID)]
    assert len(csr.extensions) == 1
    assert csr.public_key() == key.public_key()


# ---- Leaf ------------------------------------------------------------------------------------

def test_leaf_from_describes_the_signed_chain(ca: BuiltinCA) -> None:
    key, chain = signed(ca)
    leaf = leaf_from(chain, key, ca.roots())
    cert = x509.load_pem_x509_certificate(chain)
    root_der = x509.load_pem_x509_certificate(ca.roots()[0]).public_bytes(serialization.Encoding.DER)
    assert leaf.spiffe_id == SID
    assert leaf.chain_pem == chain
    assert leaf.serial == cert.serial_number
    assert leaf.not_before == cert.not_valid_before_utc
    assert leaf.not_after == cert.not_valid_after_utc
    assert leaf.issuer_fingerprint == hashlib.sha256(root_der).hexdigest()
    assert leaf.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert leaf.private_key().private_numbers() == key.private_numbers()
    assert leaf.certificate() == cert


def test_leaf_from_without_roots_names_the_issuer_by_its_key_id(ca: BuiltinCA) -> None:
    key, chain = signed(ca)
    root = x509.load_pem_x509_certificate(ca.roots()[0])
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert leaf_from(chain, key).issuer_fingerprint == "keyid:" + ski.hex()


def test_leaf_from_takes_the_issuer_from_an_intermediate() -> None:
    root_key, mid_key, leaf_key = new_key(), new_key(), new_key()
    root = hand_cert(root_key, None, root_key, uris=(), ca=True, cn="root")
    mid = hand_cert(mid_key, root, root_key, uris=(), ca=True, cn="intermediate")
    leaf = hand_cert(leaf_key, mid, mid_key)
    got = leaf_from(pem_of(leaf) + pem_of(mid), leaf_key)
    assert got.issuer_fingerprint == mid.fingerprint(hashes.SHA256()).hex()
    assert verify_chain(got.chain_pem, [pem_of(root)]) is None


def test_leaf_from_refuses_another_key(ca: BuiltinCA) -> None:
    _, chain = signed(ca)
    with pytest.raises(ValueError, match="public key does not match the private key"):
        leaf_from(chain, new_key())


@pytest.mark.parametrize("uris", [(), (SID, "spiffe://cluster.local/ns/prod/sa/other")])
def test_leaf_from_wants_exactly_one_uri_san(uris: tuple[str, ...]) -> None:
    issuer_key, key = new_key(), new_key()
    cert = hand_cert(key, None, issuer_key, uris=uris, cn="x")
    with pytest.raises(ValueError, match=f"has {len(uris)} URI SANs; want exactly one"):
        leaf_from(pem_of(cert), key)


def test_leaf_from_refuses_garbage_and_roots_that_did_not_sign(ca: BuiltinCA, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chain: not PEM certificates"):
        leaf_from(b"not a pem", new_key())
    key, chain = signed(ca)
    other = BuiltinCA.create(str(tmp_path / "other"), "cluster.local")
    with pytest.raises(ValueError, match="not signed by any of the given roots"):
        leaf_from(chain, key, other.roots())


def test_renew_at_is_half_of_the_lifetime_and_expires_in_counts_down() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    leaf = Leaf(SID, b"", b"", 1, start, start + timedelta(hours=24), "f")
    assert leaf.lifetime == timedelta(hours=24)
    assert leaf.renew_at == start + timedelta(hours=12)
    assert leaf.expires_in(start + timedelta(hours=20)) == 4 * 3600
    assert leaf.expires_in(start + timedelta(hours=25)) == -3600
    assert not leaf.needs_renewal(start + timedelta(hours=11, minutes=59))
    assert leaf.needs_renewal(start + timedelta(hours=12))
    # A naive datetime is taken as UTC, as X.509 times are.
    assert leaf.expires_in(datetime(2030, 1, 1, 20)) == 4 * 3600


def test_leaf_json_round_trip(ca: BuiltinCA) -> None:
    key, chain = signed(ca)
    leaf = leaf_from(chain, key, ca.roots())
    data = json.loads(json.dumps(leaf.to_json()))  # JSON-able, all of it
    assert data["spiffeId"] == SID
    assert int(data["serial"], 16) == leaf.serial
    assert data["notAfter"].endswith("Z")
    assert Leaf.from_json(data) == leaf


def test_leaf_from_json_refuses_damaged_records(ca: BuiltinCA) -> None:
    key, chain = signed(ca)
    good = leaf_from(chain, key, ca.roots()).to_json()
    with pytest.raises(ValueError, match="leaf record: key: required, a string"):
        Leaf.from_json({k: v for k, v in good.items() if k != "key"})
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        Leaf.from_json({**good, "key": "garbage"})
    another_key = new_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode()
    with pytest.raises(ValueError, match="public key does not match"):
        Leaf.from_json({**good, "key": another_key})
    with pytest.raises(ValueError, match=re.escape(f"the certificate is for {SID}")):
        Leaf.from_json({**good, "spiffeId": "spiffe://cluster.local/ns/prod/sa/admin"})
    with pytest.raises(ValueError, match="spiffeId: required"):
        Leaf.from_json([])  # type: ignore[arg-type]


def test_leaf_repr_does_not_show_the_key(ca: BuiltinCA) -> None:
    key, chain = signed(ca)
    leaf = leaf_from(chain, key)
    assert "PRIVATE KEY" not in repr(leaf)
    assert "key_pem" not in repr(leaf)


# ---- verify_chain ----------------------------------------------------------------------------

def test_verify_chain_accepts_a_signed_leaf_within_its_validity(ca: BuiltinCA) -> None:
    _, chain = signed(ca)
    cert = x509.load_pem_x509_certificate(chain)
    assert verify_chain(chain, ca.roots()) is None
    assert verify_chain(chain, ca.roots(), cert.not_valid_before_utc) is None
    assert verify_chain(chain, ca.roots(), cert.not_valid_after_utc) is None


def test_verify_chain_refuses_expired_and_not_yet_valid_leaves(ca: BuiltinCA) -> None:
    _, chain = signed(ca, ttl=60)
    cert = x509.load_pem_x509_certificate(chain)
    late = verify_chain(chain, ca.roots(), cert.not_valid_after_utc + timedelta(seconds=1))
    assert late is not None and f"{SID}): expired at" in late
    early = verify_chain(chain, ca.roots(), cert.not_valid_before_utc - timedelta(seconds=1))
    assert early is not None and "not valid before" in early


def test_verify_chain_refuses_a_leaf_of_another_root(ca: BuiltinCA, tmp_path: Path) -> None:
    other = BuiltinCA.create(str(tmp_path / "other"), "cluster.local")
    _, chain = signed(other)
    reason = verify_chain(chain, ca.roots())
    assert reason is not None and "is not signed by any of the 1 roots" in reason
    assert "nodemesh root 1" in reason


def test_verify_chain_refuses_a_ca_certificate_as_the_leaf(ca: BuiltinCA) -> None:
    assert verify_chain(ca.roots()[0], ca.roots()) == "the leaf certificate is a CA certificate"


def test_verify_chain_refuses_an_expired_root() -> None:
    root_key, key = new_key(), new_key()
    old = datetime.now(UTC) - timedelta(days=10)
    root = hand_cert(root_key, None, root_key, uris=(), ca=True, cn="old root", start=old, days=2)
    leaf = hand_cert(key, root, root_key)
    reason = verify_chain(pem_of(leaf), [pem_of(root)])
    assert reason is not None and reason.startswith("root CN=old root: expired at")


def test_verify_chain_refuses_an_intermediate_that_is_not_a_ca() -> None:
    root_key, mid_key, key = new_key(), new_key(), new_key()
    root = hand_cert(root_key, None, root_key, uris=(), ca=True, cn="root")
    mid = hand_cert(mid_key, root, root_key, uris=(), ca=False, cn="not a ca")
    leaf = hand_cert(key, mid, mid_key)
    reason = verify_chain(pem_of(leaf) + pem_of(mid), [pem_of(root)])
    assert reason == "chain[1] (CN=not a ca) is not a CA certificate"


def test_verify_chain_refuses_a_forged_signature() -> None:
    root_key, forger, key = new_key(), new_key(), new_key()
    root = hand_cert(root_key, None, root_key, uris=(), ca=True, cn="root")
    forged = hand_cert(key, root, forger)  # names the root as issuer, signed by another key
    reason = verify_chain(pem_of(forged), [pem_of(root)])
    assert reason is not None and "is not signed by any of the 1 roots" in reason


def test_verify_chain_refuses_garbage_and_no_roots(ca: BuiltinCA) -> None:
    _, chain = signed(ca)
    assert verify_chain(b"garbage", ca.roots()) == "chain: not PEM certificates"
    assert verify_chain(chain, [b"garbage"]) == "roots[0]: not PEM certificates"
    assert verify_chain(chain, []) == "no roots to verify against"
