"""The built-in CA: its files, its certificate profiles, what it refuses, and root rotation."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from nodemesh.certs.authority import BuiltinCA, CaError, CertificateAuthority, check_csr
from nodemesh.certs.leaf import leaf_from, make_csr, new_key, verify_chain
from nodemesh.errors import NodemeshError

TD = "cluster.local"
SID = "spiffe://cluster.local/ns/prod/sa/api"


@pytest.fixture
def ca_dir(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "ca")


@pytest.fixture
def ca(ca_dir: str) -> BuiltinCA:
    return BuiltinCA.create(ca_dir, TD)


def sign(ca: BuiltinCA, sid: str = SID, ttl: float = 3600) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = new_key()
    return key, ca.sign(make_csr(key, sid), sid, ttl)


def csr_with(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, names: list[x509.GeneralName]) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def fingerprint(pem: bytes) -> str:
    return cert(pem).fingerprint(hashes.SHA256()).hex()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---- create and load -------------------------------------------------------------------------

def test_builtin_ca_is_a_certificate_authority(ca: BuiltinCA) -> None:
    authority: CertificateAuthority = ca  # the Protocol is what the server takes
    assert authority.trust_domain == TD


def test_create_writes_a_private_directory(ca: BuiltinCA, ca_dir: str) -> None:
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.json", "ca.key"]
    assert mode(ca_dir) == 0o700
    assert mode(os.path.join(ca_dir, "ca.key")) == 0o600
    assert mode(os.path.join(ca_dir, "ca.json")) == 0o600
    if os.geteuid() == 0:
        for name in ("", "ca.key", "ca.json", "ca.crt"):
            st = os.stat(os.path.join(ca_dir, name))
            assert (st.st_uid, st.st_gid) == (0, 0)


def test_create_gives_exact_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        BuiltinCA.create(str(tmp_path / "ca"), TD)
    finally:
        os.umask(old)
    assert mode(str(tmp_path / "ca")) == 0o700
    assert mode(str(tmp_path / "ca" / "ca.key")) == 0o600


def test_ca_json_lists_the_trusted_roots_and_the_active_one(ca: BuiltinCA, ca_dir: str) -> None:
    data = read_json(os.path.join(ca_dir, "ca.json"))
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        crt = f.read()
    assert data["trustDomain"] == TD
    assert [r["certificate"].encode() for r in data["roots"]] == [crt] == ca.roots()
    assert data["active"] == cert(crt).fingerprint(hashes.SHA256()).hex() == data["roots"][0]["fingerprint"]


def test_root_certificate_profile(ca: BuiltinCA) -> None:
    root = cert(ca.roots()[0])
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "nodemesh"
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "nodemesh root 1"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://cluster.local")]
    root.verify_directly_issued_by(root)
    lifetime = root.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=3649) < lifetime <= timedelta(days=3650)


def test_load_after_create_gives_the_same_ca(ca: BuiltinCA, ca_dir: str) -> None:
    again = BuiltinCA.load(ca_dir)
    assert again.trust_domain == TD
    assert again.roots() == ca.roots()
    assert again.status()["activeRoot"] == ca.status()["activeRoot"]
    _, chain = sign(again)
    assert verify_chain(chain, ca.roots()) is None


def test_create_refuses_an_existing_ca_and_bad_arguments(ca: BuiltinCA, ca_dir: str, tmp_path: Path) -> None:
    with pytest.raises(CaError, match="a certificate authority exists already"):
        BuiltinCA.create(ca_dir, TD)
    with pytest.raises(CaError, match=re.escape("trust domain 'Bad.Domain': character 'B'")):
        BuiltinCA.create(str(tmp_path / "x"), "Bad.Domain")
    with pytest.raises(CaError, match="CA validity: must be at least one day"):
        BuiltinCA.create(str(tmp_path / "y"), TD, validity_days=0)


def test_load_refuses_a_missing_or_damaged_ca(ca: BuiltinCA, ca_dir: str, tmp_path: Path) -> None:
    with pytest.raises(CaError, match=r"no certificate authority in .*: ca\.json is missing"):
        BuiltinCA.load(str(tmp_path / "nowhere"))
    json_path = os.path.join(ca_dir, "ca.json")
    good = read_json(json_path)

    def load_with(data: object) -> str:
        with open(json_path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(CaError) as e:
            BuiltinCA.load(ca_dir)
        return str(e.value)

    assert "ca.json: cannot read" in load_with("{not json")
    assert load_with({**good, "trustDomain": 5}).endswith("trustDomain: required, a string")
    assert load_with({**good, "roots": []}).endswith("roots: required, a non-empty list")
    assert load_with({**good, "roots": [{"generation": 1, "certificate": "x"}]}).endswith(
        "roots[0].certificate: not PEM certificates")
    damaged = {**good, "roots": [{**good["roots"][0], "fingerprint": "00"}]}
    assert "roots[0].fingerprint: does not match the certificate" in load_with(damaged)
    other = BuiltinCA.create(str(tmp_path / "other"), TD)
    assert load_with({**good, "roots": read_json(os.path.join(other.directory, "ca.json"))["roots"]}) \
        .endswith("ca.key: matches none of the roots in " + json_path)


def test_load_tightens_a_key_file_others_could_read(ca: BuiltinCA, ca_dir: str) -> None:
    key_path = os.path.join(ca_dir, "ca.key")
    os.chmod(key_path, 0o644)
    BuiltinCA.load(ca_dir)
    assert mode(key_path) == 0o600


def test_load_or_create(tmp_path: Path) -> None:
    directory = str(tmp_path / "ca")
    first = BuiltinCA.load_or_create(directory, TD)
    assert BuiltinCA.load_or_create(directory, TD).roots() == first.roots()
    with pytest.raises(CaError, match=re.escape("the CA is for trust domain cluster.local, not example.org")):
        BuiltinCA.load_or_create(directory, "example.org")


# ---- signing ---------------------------------------------------------------------------------

def test_sign_round_trip(ca: BuiltinCA) -> None:
    key, chain = sign(ca)
    leaf = leaf_from(chain, key, ca.roots())
    assert leaf.spiffe_id == SID
    assert verify_chain(chain, ca.roots()) is None
    assert leaf.issuer_fingerprint == ca.status()["activeRoot"]["fingerprint"]
    assert chain.count(b"BEGIN CERTIFICATE") == 1  # the leaf; the root is not part of the chain


def test_leaf_certificate_profile(ca: BuiltinCA) -> None:
    key, chain = sign(ca, ttl=86400)
    leaf, root = cert(chain), cert(ca.roots()[0])
    exts = leaf.extensions
    assert leaf.issuer == root.subject
    assert len(leaf.subject) == 0
    assert leaf.public_key() == key.public_key()
    san = exts.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(SID)]
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert exts.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    assert exts.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert len(exts) == 6
    now = datetime.now(UTC)
    # Back-dated by a minute for clock skew, valid for the TTL from now.
    assert now - timedelta(seconds=62) <= leaf.not_valid_before_utc <= now - timedelta(seconds=59)
    assert abs((leaf.not_valid_after_utc - now) - timedelta(days=1)) < timedelta(seconds=3)
    root.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(root)


def test_serials_are_random(ca: BuiltinCA) -> None:
    serials = {cert(sign(ca)[1]).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_leaves_pass_an_rfc5280_verifier(ca: BuiltinCA) -> None:
    _, chain = sign(ca)
    store = Store([cert(r) for r in ca.roots()])
    verifier = PolicyBuilder().store(store).time(datetime.now(UTC)).build_client_verifier()
    verified = verifier.verify(cert(chain), [])
    assert verified.subjects == [x509.UniformResourceIdentifier(SID)]


def test_two_leaves_make_a_mutual_tls_connection(ca: BuiltinCA, tmp_path: Path) -> None:
    """What the node Envoys will do with these certificates, done by OpenSSL through ssl."""
    cadata = b"".join(ca.roots()).decode()

    def context(protocol: int, name: str, sid: str) -> ssl.SSLContext:
        key, chain = sign(ca, sid)
        leaf = leaf_from(chain, key)
        (tmp_path / f"{name}.pem").write_bytes(leaf.chain_pem + leaf.key_pem)
        ctx = ssl.SSLContext(protocol)
        ctx.check_hostname = False  # peers are named by SPIFFE ID, checked below
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=cadata)
        ctx.load_cert_chain(str(tmp_path / f"{name}.pem"))
        return ctx

    server_ctx = context(ssl.PROTOCOL_TLS_SERVER, "server", "spiffe://cluster.local/ns/prod/sa/web")
    client_ctx = context(ssl.PROTOCOL_TLS_CLIENT, "client", "spiffe://cluster.local/ns/prod/sa/client")
    a, b = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as s:
            seen["client"] = s.getpeercert()["subjectAltName"]
            s.sendall(s.recv(5))

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b) as c:
        seen["server"] = c.getpeercert()["subjectAltName"]
        c.sendall(b"hello")
        assert c.recv(5) == b"hello"
    t.join(5)
    assert seen == {"client": (("URI", "spiffe://cluster.local/ns/prod/sa/client"),),
                    "server": (("URI", "spiffe://cluster.local/ns/prod/sa/web"),)}


def test_a_five_second_ttl_renews_at_half_life(ca: BuiltinCA) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    key, chain = sign(ca, ttl=5)
    after = datetime.now(UTC)
    leaf = leaf_from(chain, key)
    assert before + timedelta(seconds=4) <= leaf.not_after <= after + timedelta(seconds=5)
    assert 3 <= leaf.expires_in(before) <= 5
    assert leaf.renew_at == leaf.not_before + (leaf.not_after - leaf.not_before) / 2
    # Back-dating must not push the half-life before the leaf was even issued.
    assert before <= leaf.renew_at <= after + timedelta(seconds=3)
    assert not leaf.needs_renewal(before)
    assert verify_chain(chain, ca.roots(), before) is None
    assert verify_chain(chain, ca.roots(), leaf.not_after + timedelta(seconds=1)) is not None


def test_a_leaf_never_outlives_its_root(tmp_path: Path) -> None:
    short = BuiltinCA.create(str(tmp_path / "ca"), TD, validity_days=1)
    _, chain = sign(short, ttl=10 * 86400)
    assert cert(chain).not_valid_after_utc == cert(short.roots()[0]).not_valid_after_utc


def test_rsa_2048_csrs_are_signed(ca: BuiltinCA) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    chain = ca.sign(make_csr(key, SID), SID, 60)
    assert verify_chain(chain, ca.roots()) is None
    assert leaf_from(chain, key).spiffe_id == SID


def flip_last_byte(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature: still DER, no longer a valid signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(("make", "message"), [
    (lambda k: make_csr(k, "spiffe://cluster.local/ns/prod/sa/admin"),
     f"CSR for {SID}: subjectAltName: want exactly the URI {SID}, got "
     "URI:spiffe://cluster.local/ns/prod/sa/admin"),
    (lambda k: csr_with(k, [x509.UniformResourceIdentifier(SID), x509.DNSName("api.example.com")]),
     f"CSR for {SID}: subjectAltName: asks for DNS:api.example.com besides the SPIFFE ID; "
     "a workload certificate carries only its SPIFFE ID"),
    (lambda k: csr_with(k, [x509.UniformResourceIdentifier(SID),
                            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/prod/sa/db")]),
     f"CSR for {SID}: subjectAltName: want exactly the URI {SID}, got URI:{SID}, "
     "URI:spiffe://cluster.local/ns/prod/sa/db"),
    (lambda k: csr_with(k, []), f"CSR for {SID}: subjectAltName: want exactly the URI {SID}, got none"),
    (lambda k: flip_last_byte(make_csr(k, SID)), f"CSR for {SID}: its signature is invalid"),
    (lambda k: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     f"CSR for {SID}: not a PEM certificate signing request"),
    (lambda k: b"garbage", f"CSR for {SID}: not a PEM certificate signing request"),
    (lambda k: make_csr(ec.generate_private_key(ec.SECP384R1()), SID),
     f"CSR for {SID}: the key is EC secp384r1; want EC P-256 (secp256r1) or RSA of at least 2048 bits"),
    (lambda k: make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024), SID),
     f"CSR for {SID}: the key is RSA of 1024 bits; want at least 2048 bits (or EC P-256)"),
])
def test_sign_refuses_unfit_csrs(ca: BuiltinCA, make: Callable[[ec.EllipticCurvePrivateKey], bytes],
                                 message: str) -> None:
    with pytest.raises(CaError) as e:
        ca.sign(make(new_key()), SID, 3600)
    assert str(e.value) == message


@pytest.mark.parametrize(("sid", "message"), [
    ("spiffe://example.org/ns/prod/sa/api",
     "spiffeId spiffe://example.org/ns/prod/sa/api: trust domain example.org is not this CA's "
     "(cluster.local)"),
    ("spiffe://cluster.local", "spiffeId: SPIFFE ID 'spiffe://cluster.local' is not a workload identity"),
    ("spiffe://cluster.local/ns/prod/sa/api?x", "spiffeId: SPIFFE ID 'spiffe://cluster.local/ns/prod/sa/api?x'"),
    ("https://cluster.local/ns/prod/sa/api", "is not a SPIFFE ID: must start with spiffe://"),
])
def test_sign_refuses_ids_outside_the_trust_domain_or_not_workloads(ca: BuiltinCA, sid: str,
                                                                    message: str) -> None:
    with pytest.raises(CaError) as e:
        ca.sign(make_csr(new_key(), sid), sid, 3600)
    assert message in str(e.value)


@pytest.mark.parametrize("ttl", [0, -5, float("nan"), float("inf"), True, "60"])
def test_sign_refuses_ttls_that_are_not_positive_numbers(ca: BuiltinCA, ttl: object) -> None:
    with pytest.raises(CaError, match="ttlSeconds: must be a positive number of seconds"):
        ca.sign(make_csr(new_key(), SID), SID, ttl)  # type: ignore[arg-type]


def test_ca_errors_are_nodemesh_errors() -> None:
    assert issubclass(CaError, NodemeshError)
    assert CaError("x").exit_code == 1


def test_check_csr_is_usable_on_its_own() -> None:
    key = new_key()
    csr = check_csr(make_csr(key, SID), SID, TD)
    assert csr.public_key() == key.public_key()


def test_concurrent_signing_while_rotating(ca: BuiltinCA) -> None:
    def one(_: int) -> bytes:
        return sign(ca)[1]

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        ca.rotate()
        chains = [f.result() for f in futures]
    roots = ca.roots()
    assert all(verify_chain(c, roots) is None for c in chains)


# ---- status and rotation ---------------------------------------------------------------------

def test_status_describes_the_active_root(ca: BuiltinCA) -> None:
    status = json.loads(json.dumps(ca.status()))
    root = cert(ca.roots()[0])
    assert status["trustDomain"] == TD
    assert status["roots"] == 1
    assert status["rotation"] == "idle"
    active = status["activeRoot"]
    assert active["subject"] == "CN=nodemesh root 1,O=nodemesh"
    assert active["fingerprint"] == root.fingerprint(hashes.SHA256()).hex()
    assert active["notBefore"] == root.not_valid_before_utc.isoformat().replace("+00:00", "Z")
    assert active["notAfter"] == root.not_valid_after_utc.isoformat().replace("+00:00", "Z")


def test_rotation_keeps_old_leaves_valid_until_retire(ca: BuiltinCA, ca_dir: str) -> None:
    old_key, old_chain = sign(ca)
    old_root = ca.roots()[0]

    ca.rotate()
    roots = ca.roots()
    new_root = roots[0]
    assert roots == [new_root, old_root]
    assert cert(new_root).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "nodemesh root 2"
    assert verify_chain(old_chain, roots) is None  # signed before the rotation, still trusted

    new_key_, new_chain = sign(ca)
    assert verify_chain(new_chain, [new_root]) is None  # new leaves come from the new root
    assert verify_chain(new_chain, [old_root]) is not None
    # The agent tells leaves of the old root from those of the new one by their issuer.
    assert leaf_from(old_chain, old_key, roots).issuer_fingerprint == fingerprint(old_root)
    assert leaf_from(new_chain, new_key_, roots).issuer_fingerprint == fingerprint(new_root)

    status = ca.status()
    assert status["rotation"] == "rotating" and status["roots"] == 2
    assert status["previousRoots"][0]["subject"] == "CN=nodemesh root 1,O=nodemesh"
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        assert f.read() == new_root
    assert mode(os.path.join(ca_dir, "ca.key")) == 0o600
    assert BuiltinCA.load(ca_dir).roots() == roots

    assert ca.retire() == 1
    assert ca.roots() == [new_root]
    assert verify_chain(old_chain, ca.roots()) is not None
    assert verify_chain(new_chain, ca.roots()) is None
    assert ca.status()["rotation"] == "idle"
    assert ca.retire() == 0
    assert BuiltinCA.load(ca_dir).roots() == [new_root]
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.json", "ca.key"]  # no temporary files left


def test_two_rotations_keep_every_root_until_retire(ca: BuiltinCA, ca_dir: str) -> None:
    _, first = sign(ca)
    ca.rotate()
    _, second = sign(ca)
    ca.rotate()
    assert len(ca.roots()) == 3
    assert all(verify_chain(c, ca.roots()) is None for c in (first, second))
    assert ca.status()["activeRoot"]["generation"] == 3
    assert ca.retire() == 2
    assert BuiltinCA.load(ca_dir).status()["activeRoot"]["subject"] == "CN=nodemesh root 3,O=nodemesh"


def test_load_completes_a_rotation_a_crash_interrupted(ca: BuiltinCA, ca_dir: str) -> None:
    """rotate() writes ca.key before ca.json names its root active; a crash in between is repaired."""
    json_path, crt_path = os.path.join(ca_dir, "ca.json"), os.path.join(ca_dir, "ca.crt")
    old_fingerprint = ca.status()["activeRoot"]["fingerprint"]
    with open(crt_path, "rb") as f:
        old_crt = f.read()
    ca.rotate()
    new_root = ca.roots()[0]
    data = read_json(json_path)
    with open(json_path, "w") as f:
        json.dump({**data, "active": old_fingerprint}, f)  # as if the last two writes never happened
    with open(crt_path, "wb") as f:
        f.write(old_crt)

    loaded = BuiltinCA.load(ca_dir)
    assert loaded.roots()[0] == new_root
    assert read_json(json_path)["active"] != old_fingerprint
    with open(crt_path, "rb") as f:
        assert f.read() == new_root
    _, chain = sign(loaded)
    assert verify_chain(chain, [new_root]) is None


# ---- prepared rotation: trust the next root before it signs ---------------------------------

def root_with(ca: BuiltinCA, fp: str) -> bytes:
    (root,) = [r for r in ca.roots() if fingerprint(r) == fp]
    return root


def test_prepare_adds_a_trusted_root_that_does_not_sign(ca: BuiltinCA, ca_dir: str) -> None:
    old_root = ca.roots()[0]
    _, before = sign(ca)
    fp = ca.prepare()
    assert ca.prepared == fp
    new_root = root_with(ca, fp)
    assert ca.roots() == [old_root, new_root]  # the active (signing) root first
    assert cert(new_root).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "nodemesh root 2"
    # Still signing with the old root: a leaf verifies against it alone, not against the new one.
    key, chain = sign(ca)
    assert verify_chain(chain, [old_root]) is None
    assert verify_chain(chain, [new_root]) is not None
    assert leaf_from(chain, key, ca.roots()).issuer_fingerprint == fingerprint(old_root)
    assert verify_chain(before, ca.roots()) is None
    # ca.json lists both, the old one still active; ca.crt is still the old root.
    data = read_json(os.path.join(ca_dir, "ca.json"))
    assert {r["fingerprint"] for r in data["roots"]} == {fp, fingerprint(old_root)}
    assert data["active"] == fingerprint(old_root)
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        assert f.read() == old_root
    assert mode(os.path.join(ca_dir, "ca.next.key")) == 0o600
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.json", "ca.key", "ca.next.key"]


def test_prepare_twice_gives_the_same_root(ca: BuiltinCA, ca_dir: str) -> None:
    fp = ca.prepare()
    with open(os.path.join(ca_dir, "ca.next.key"), "rb") as f:
        next_key = f.read()
    assert ca.prepare() == fp
    assert ca.prepare(validity_days=30) == fp  # the prepared root is kept, not remade
    assert len(ca.roots()) == 2
    with open(os.path.join(ca_dir, "ca.next.key"), "rb") as f:
        assert f.read() == next_key


def test_prepare_validity(ca: BuiltinCA) -> None:
    fp = ca.prepare(validity_days=30)
    lifetime = cert(root_with(ca, fp)).not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < lifetime <= timedelta(days=30)


def test_prepare_without_validity_keeps_the_active_roots_lifetime(ca: BuiltinCA) -> None:
    lifetime = cert(root_with(ca, ca.prepare())).not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=3649) < lifetime <= timedelta(days=3650)


@pytest.mark.parametrize("days", [0, -1])
def test_prepare_and_rotate_refuse_a_validity_under_one_day(ca: BuiltinCA, ca_dir: str,
                                                            days: int) -> None:
    roots = ca.roots()
    for step in (ca.prepare, ca.rotate):
        with pytest.raises(CaError, match="CA validity: must be at least one day"):
            step(days)
    assert ca.roots() == roots and ca.prepared is None
    assert not os.path.exists(os.path.join(ca_dir, "ca.next.key"))


def test_load_keeps_a_prepared_root_pending(ca: BuiltinCA, ca_dir: str) -> None:
    fp = ca.prepare()
    next_path = os.path.join(ca_dir, "ca.next.key")
    os.chmod(next_path, 0o644)  # as if someone loosened it: load tightens it again
    loaded = BuiltinCA.load(ca_dir)
    assert loaded.prepared == fp
    assert loaded.roots() == ca.roots()
    assert loaded.status()["rotation"] == "prepared"
    assert mode(next_path) == 0o600
    # The loaded CA still signs with the old root, and its rotate() activates the prepared one.
    old_root = ca.roots()[0]
    _, chain = sign(loaded)
    assert verify_chain(chain, [old_root]) is None
    loaded.rotate()
    _, chain = sign(loaded)
    assert verify_chain(chain, [root_with(loaded, fp)]) is None
    assert not os.path.exists(next_path)


def test_rotate_activates_exactly_the_prepared_root(ca: BuiltinCA, ca_dir: str) -> None:
    old_root = ca.roots()[0]
    _, old_chain = sign(ca)
    fp = ca.prepare()
    ca.rotate()
    assert ca.prepared is None
    new_root = root_with(ca, fp)
    assert ca.roots() == [new_root, old_root]  # no third root was made
    assert ca.status()["activeRoot"]["fingerprint"] == fp
    key, chain = sign(ca)
    assert verify_chain(chain, [new_root]) is None
    assert verify_chain(chain, [old_root]) is not None
    assert leaf_from(chain, key, ca.roots()).issuer_fingerprint == fp
    assert verify_chain(old_chain, ca.roots()) is None  # the old leaves stay trusted until retire
    assert not os.path.exists(os.path.join(ca_dir, "ca.next.key"))
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.json", "ca.key"]
    assert read_json(os.path.join(ca_dir, "ca.json"))["active"] == fp
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        assert f.read() == new_root
    # What ca.key holds now is the prepared root's key: a reload signs with it.
    loaded = BuiltinCA.load(ca_dir)
    assert loaded.prepared is None and loaded.status()["activeRoot"]["fingerprint"] == fp
    assert verify_chain(sign(loaded)[1], [new_root]) is None


def test_rotate_without_prepare_makes_a_new_root(ca: BuiltinCA) -> None:
    old = fingerprint(ca.roots()[0])
    ca.rotate()
    active = ca.status()["activeRoot"]["fingerprint"]
    assert active != old and ca.prepared is None
    assert [fingerprint(r) for r in ca.roots()] == [active, old]


def test_rotation_status_phases(ca: BuiltinCA) -> None:
    def phase() -> tuple[str, str | None, list[str]]:
        s = json.loads(json.dumps(ca.status()))  # JSON-able at every step
        prepared = s["preparedRoot"]["fingerprint"] if s["preparedRoot"] else None
        return s["rotation"], prepared, [r["fingerprint"] for r in s["previousRoots"]]

    old = ca.status()["activeRoot"]["fingerprint"]
    assert phase() == ("idle", None, [])
    fp = ca.prepare()
    assert phase() == ("prepared", fp, [])  # the prepared root is not a "previous" one
    assert ca.status()["roots"] == 2
    assert ca.status()["preparedRoot"]["generation"] == 2
    assert ca.status()["activeRoot"]["fingerprint"] == old
    ca.rotate()
    assert phase() == ("rotating", None, [old])
    assert ca.status()["activeRoot"]["fingerprint"] == fp
    ca.retire()
    assert phase() == ("idle", None, [])


def test_retire_after_rotate_drops_the_old_root(ca: BuiltinCA, ca_dir: str) -> None:
    _, old_chain = sign(ca)
    fp = ca.prepare()
    ca.rotate()
    assert ca.retire() == 1
    assert [fingerprint(r) for r in ca.roots()] == [fp]
    assert verify_chain(old_chain, ca.roots()) is not None
    assert [r["fingerprint"] for r in read_json(os.path.join(ca_dir, "ca.json"))["roots"]] == [fp]


def test_retire_while_prepared_keeps_the_prepared_root(ca: BuiltinCA, ca_dir: str) -> None:
    ca.rotate()  # generation 2 active, generation 1 still trusted
    active = ca.status()["activeRoot"]["fingerprint"]
    fp = ca.prepare()  # generation 3
    assert len(ca.roots()) == 3
    assert ca.retire() == 1  # only generation 1 goes
    assert sorted(fingerprint(r) for r in ca.roots()) == sorted([active, fp])
    assert ca.prepared == fp and ca.status()["rotation"] == "prepared"
    assert ca.retire() == 0  # a prepared root alone is never retired
    assert os.path.exists(os.path.join(ca_dir, "ca.next.key"))
    assert BuiltinCA.load(ca_dir).prepared == fp
    ca.rotate()
    assert ca.status()["activeRoot"]["fingerprint"] == fp


def test_load_drops_a_next_key_a_crash_left_behind(ca: BuiltinCA, ca_dir: str) -> None:
    """prepare() writes ca.next.key before ca.json lists its root: a crash in between leaves a key
    of no root, which load() removes; so does a crash in rotate() after ca.key was replaced."""
    json_path, next_path = os.path.join(ca_dir, "ca.json"), os.path.join(ca_dir, "ca.next.key")
    before = read_json(json_path)
    ca.prepare()
    with open(json_path, "w") as f:
        json.dump(before, f)  # as if ca.json was never rewritten
    loaded = BuiltinCA.load(ca_dir)
    assert loaded.prepared is None and len(loaded.roots()) == 1
    assert not os.path.exists(next_path)

    fp = loaded.prepare()
    with open(next_path, "rb") as f:
        next_key = f.read()
    loaded.rotate()
    with open(next_path, "wb") as f:
        f.write(next_key)  # as if rotate() crashed before removing it
    os.chmod(next_path, 0o600)
    again = BuiltinCA.load(ca_dir)
    assert again.prepared is None
    assert again.status()["activeRoot"]["fingerprint"] == fp
    assert not os.path.exists(next_path)


def test_concurrent_rotations_each_activate_a_root(ca: BuiltinCA) -> None:
    # rotate() prepares (when nothing is prepared) and activates under one lock: two at once
    # must not find the other's prepared root already gone.
    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(ca.rotate) for _ in range(8)]:
            f.result()
    status = ca.status()
    assert status["activeRoot"]["generation"] == 9 and status["roots"] == 9
    assert ca.prepared is None
