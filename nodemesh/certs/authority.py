"""The cluster's certificate authority: the interface the control plane signs through, and the
built-in CA that implements it with a self-signed root kept in the cluster daemon's state.

`CertificateAuthority` is the seam: an external CA (SPIRE, or an intermediate a user supplies)
can replace `BuiltinCA` later without the CA server or the agents noticing. The checks a CSR must
pass (`check_csr`) and the certificate profiles (`build_root`, `build_leaf`) are pure functions
any implementation can reuse.

`BuiltinCA` keeps its state in one directory (``<state>/ca/``, 0700, root's):

- ``ca.key``: the active root's private key (0600);
- ``ca.crt``: the active root's certificate, for people and tools;
- ``ca.json``: the trust bundle (every root nodes must trust now) and which root is active.

Rotation has three steps, so that no node ever meets a certificate it cannot verify:
`prepare` adds a new root to the bundle without signing with it (every node must trust it before
any leaf it signs is shown; its key waits in ``ca.next.key``), `rotate` makes it the signing root
and keeps the previous one in the bundle while the agents renew their leaves, and `retire` drops
every root but the active one. Every write is atomic (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodemesh.certs import pem
from nodemesh.certs.leaf import new_key
from nodemesh.certs.pem import PrivateKey
from nodemesh.certs.spiffe import check_trust_domain, parse_workload_id, trust_domain_id
from nodemesh.errors import NodemeshError

log = logging.getLogger("nodemesh.ca")

CA_JSON = "ca.json"
CA_KEY = "ca.key"
CA_CRT = "ca.crt"
CA_NEXT_KEY = "ca.next.key"  # the key of a prepared root (trusted, not yet signing)
FORMAT_VERSION = 1
# Leaves start this much before they are signed, so a node whose clock is a little behind the
# daemon's accepts them at once.
CLOCK_SKEW = timedelta(seconds=60)


class CaError(NodemeshError):
    """The certificate authority refused a request, or cannot use its files."""


class CertificateAuthority(Protocol):
    """What the CA server needs from a certificate authority."""

    trust_domain: str

    def roots(self) -> list[bytes]:
        """PEM roots every node must trust now: the active one first, then any being rotated out."""
        ...

    def sign(self, csr_pem: bytes, spiffe_id: str, ttl_seconds: float) -> bytes:
        """The PEM chain (leaf first, no root) for a CSR of `spiffe_id`; CaError when refused."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-able facts for `nodemesh status`: trust domain, active root, bundle, rotation."""
        ...


# ---- pure: checks and certificate profiles --------------------------------------------------

def check_csr(csr_pem: bytes, spiffe_id: str, trust_domain: str) -> x509.CertificateSigningRequest:
    """The CSR, once it is fit to be signed for `spiffe_id` in `trust_domain`; CaError saying why not.

    Fit means: a valid self-signature, an EC P-256 or RSA >= 2048 key, and a subjectAltName of
    exactly the URI `spiffe_id` and nothing else, a workload identity of `trust_domain`.
    """
    try:
        td, _, _ = parse_workload_id(spiffe_id)
    except ValueError as e:
        raise CaError(f"spiffeId: {e}") from None
    if td != trust_domain:
        raise CaError(f"spiffeId {spiffe_id}: trust domain {td} is not this CA's ({trust_domain})")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError):
        raise CaError(f"CSR for {spiffe_id}: not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CaError(f"CSR for {spiffe_id}: its signature is invalid")
    try:
        key = csr.public_key()
    except ValueError:
        raise CaError(f"CSR for {spiffe_id}: its public key cannot be read") from None
    if reason := pem.key_problem(key):
        raise CaError(f"CSR for {spiffe_id}: {reason}")
    names = pem.san_names(csr)
    uris = pem.uri_sans(csr)
    if not uris:
        raise CaError(f"CSR for {spiffe_id}: subjectAltName: want exactly the URI {spiffe_id}, got none")
    if uris != [spiffe_id]:
        raise CaError(f"CSR for {spiffe_id}: subjectAltName: want exactly the URI {spiffe_id}, got "
                      + ", ".join(f"URI:{u}" for u in uris))
    if others := [pem.describe_name(n) for n in names if not isinstance(n, x509.UniformResourceIdentifier)]:
        raise CaError(f"CSR for {spiffe_id}: subjectAltName: asks for {', '.join(others)} besides the "
                      "SPIFFE ID; a workload certificate carries only its SPIFFE ID")
    return csr


def check_ttl(ttl_seconds: float) -> float:
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float) \
            or not math.isfinite(ttl_seconds) or ttl_seconds <= 0:
        raise CaError(f"ttlSeconds: must be a positive number of seconds, got {ttl_seconds!r}")
    return float(ttl_seconds)


def _whole_seconds(when: datetime) -> datetime:
    # X.509 times have whole seconds; trimming here keeps what we compute equal to what we encode.
    return when.replace(microsecond=0)


def _check_validity(validity_days: int | None) -> None:
    # None: as long as the active root was made to live. 0 or less would make a root that has
    # expired (or does at once), which rotate() would then sign with.
    if validity_days is not None and validity_days <= 0:
        raise CaError(f"CA validity: must be at least one day, got {validity_days}")


def build_root(key: PrivateKey, trust_domain: str, generation: int, now: datetime,
               validity_days: int) -> x509.Certificate:
    """A self-signed root: O=nodemesh, CN=nodemesh root <generation>, URI SAN spiffe://<td>."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root {generation}")])
    start = _whole_seconds(pem.utc(now)) - CLOCK_SKEW
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + CLOCK_SKEW + timedelta(days=validity_days))
            # pathlen 0: this root signs leaves directly, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))


def leaf_validity(now: datetime, ttl_seconds: float, root: x509.Certificate) -> tuple[datetime, datetime]:
    """(not_before, not_after) of a leaf signed at `now` for `ttl_seconds` under `root`.

    The back-dating for clock skew is at most a quarter of the TTL: with a full minute, a leaf of a
    few seconds (tests) would reach its half-life before it was even issued.
    """
    at = pem.utc(now)
    ttl = timedelta(seconds=ttl_seconds)
    not_before = max(_whole_seconds(at - min(CLOCK_SKEW, ttl / 4)), root.not_valid_before_utc)
    not_after = min(_whole_seconds(at + ttl), root.not_valid_after_utc)
    return not_before, not_after


def build_leaf(csr: x509.CertificateSigningRequest, spiffe_id: str, root: x509.Certificate,
               root_key: PrivateKey, now: datetime, ttl_seconds: float) -> x509.Certificate:
    """A workload certificate for a checked CSR: empty subject, the SPIFFE ID as its only SAN."""
    not_before, not_after = leaf_validity(now, ttl_seconds, root)
    ski = pem.subject_key_id(root)
    aki = (x509.AuthorityKeyIdentifier(ski, None, None) if ski is not None
           else x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()))
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(root.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # Critical: with an empty subject the SAN is the certificate's only name (RFC 5280).
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=True, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))


# ---- files ------------------------------------------------------------------------------------

def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never a part; the mode holds from the first byte."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exact, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own_by_root(path: str) -> None:
    # Only root can give files to root; as another user (tests elsewhere) the files stay the caller's.
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


@dataclass(frozen=True)
class _Root:
    generation: int
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return pem.cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return pem.fingerprint(self.cert)

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "fingerprint": self.fingerprint,
                "certificate": self.pem.decode()}

    def describe(self) -> dict[str, Any]:
        c = self.cert
        return {"generation": self.generation, "subject": c.subject.rfc4514_string(),
                "fingerprint": self.fingerprint, "notBefore": pem.iso(c.not_valid_before_utc),
                "notAfter": pem.iso(c.not_valid_after_utc)}


def _parse_ca_json(data: Any, path: str) -> tuple[str, str, list[_Root]]:
    """(trust domain, active fingerprint, roots) of ca.json; CaError naming the field."""
    if not isinstance(data, dict):
        raise CaError(f"{path}: want a JSON object")
    td = data.get("trustDomain")
    if not isinstance(td, str):
        raise CaError(f"{path}: trustDomain: required, a string")
    if reason := check_trust_domain(td):
        raise CaError(f"{path}: trustDomain {td!r}: {reason}")
    active = data.get("active")
    if not isinstance(active, str):
        raise CaError(f"{path}: active: required, the fingerprint of the active root")
    entries = data.get("roots")
    if not isinstance(entries, list) or not entries:
        raise CaError(f"{path}: roots: required, a non-empty list")
    roots = []
    for i, entry in enumerate(entries):
        where = f"{path}: roots[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("certificate"), str) \
                or not isinstance(entry.get("generation"), int):
            raise CaError(f"{where}: want an object with generation and certificate")
        try:
            cert = pem.load_certs(entry["certificate"].encode(), f"{where}.certificate")[0]
        except ValueError as e:
            raise CaError(str(e)) from None
        root = _Root(entry["generation"], cert)
        if entry.get("fingerprint") not in (None, root.fingerprint):
            raise CaError(f"{where}.fingerprint: does not match the certificate (the file is damaged)")
        roots.append(root)
    return td, active, roots


class BuiltinCA:
    """A CA with its own self-signed root, kept in a directory. Thread-safe."""

    def __init__(self, directory: str, trust_domain: str, key: PrivateKey, roots: list[_Root],
                 active: _Root) -> None:
        # Use create() or load(); this only assembles the parts.
        self.directory = directory
        self.trust_domain = trust_domain
        self._key = key
        self._roots = roots
        self._active = active
        self._pending: tuple[_Root, PrivateKey] | None = None  # prepared, not yet signing
        self._lock = threading.Lock()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str, trust_domain: str, validity_days: int = 3650) -> BuiltinCA:
        """A new CA with a fresh root (generation 1) in `directory`; CaError if one is there."""
        if reason := check_trust_domain(trust_domain):
            raise CaError(f"trust domain {trust_domain!r}: {reason}")
        _check_validity(validity_days)
        if os.path.exists(os.path.join(directory, CA_JSON)):
            raise CaError(f"{directory}: a certificate authority exists already ({CA_JSON}); load it")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        _own_by_root(directory)
        key = new_key()
        root = _Root(1, build_root(key, trust_domain, 1, pem.utc(), validity_days))
        ca = cls(directory, trust_domain, key, [root], root)
        ca._write_key(key)
        ca._write_bundle(ca._roots, root)
        ca._write_crt()
        log.info("created CA for %s in %s: root %s", trust_domain, directory, root.fingerprint)
        return ca

    @classmethod
    def load(cls, directory: str) -> BuiltinCA:
        """The CA `create` made in `directory`, finishing a rotation that a crash interrupted."""
        json_path = os.path.join(directory, CA_JSON)
        key_path = os.path.join(directory, CA_KEY)
        try:
            with open(json_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CaError(f"no certificate authority in {directory}: {CA_JSON} is missing") from None
        except (OSError, ValueError) as e:
            raise CaError(f"{json_path}: cannot read: {e}") from None
        td, active_fp, roots = _parse_ca_json(data, json_path)
        try:
            key = pem.load_private_key(cls._read_key(key_path), key_path)
        except ValueError as e:
            raise CaError(str(e)) from None
        # The key decides which root is active: rotate() replaces ca.key before it records the new
        # root as active, so after a crash between the two the key is the truth.
        mine = pem.public_key_der(key.public_key())
        matching = [r for r in roots if pem.public_key_der(r.cert.public_key()) == mine]
        if not matching:
            raise CaError(f"{key_path}: matches none of the roots in {json_path}")
        active = matching[0]
        ca = cls(directory, td, key, sorted(roots, key=lambda r: -r.generation), active)
        next_path = os.path.join(directory, CA_NEXT_KEY)
        if os.path.exists(next_path):
            try:
                nkey = pem.load_private_key(cls._read_key(next_path), next_path)
            except ValueError as e:
                raise CaError(str(e)) from None
            nder = pem.public_key_der(nkey.public_key())
            pending = [r for r in roots if pem.public_key_der(r.cert.public_key()) == nder]
            if pending and pending[0] is not active:
                ca._pending = (pending[0], nkey)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(next_path)
        if active.fingerprint != active_fp:
            log.warning("CA in %s: completing an interrupted rotation to root %s", directory,
                        active.fingerprint)
            ca._write_bundle(ca._roots, active)
        ca._write_crt_if_stale()
        return ca

    @classmethod
    def load_or_create(cls, directory: str, trust_domain: str, validity_days: int = 3650) -> BuiltinCA:
        """What the daemon calls at start: the existing CA, or a new one; CaError on a trust domain change."""
        if not os.path.exists(os.path.join(directory, CA_JSON)):
            return cls.create(directory, trust_domain, validity_days)
        ca = cls.load(directory)
        if ca.trust_domain != trust_domain:
            raise CaError(f"{directory}: the CA is for trust domain {ca.trust_domain}, not {trust_domain}")
        return ca

    @staticmethod
    def _read_key(path: str) -> bytes:
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CaError(f"{path}: cannot read: {e.strerror or e}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning("%s was readable by others (mode %o); setting 0600", path, stat.S_IMODE(st.st_mode))
            os.chmod(path, 0o600)
        return data

    # ---- the CertificateAuthority interface -------------------------------------------------
    def roots(self) -> list[bytes]:
        with self._lock:
            return [self._active.pem] + [r.pem for r in self._roots if r is not self._active]

    def sign(self, csr_pem: bytes, spiffe_id: str, ttl_seconds: float) -> bytes:
        ttl = check_ttl(ttl_seconds)
        csr = check_csr(csr_pem, spiffe_id, self.trust_domain)
        now = pem.utc()
        with self._lock:
            root, key = self._active.cert, self._key
        if now >= root.not_valid_after_utc:
            raise CaError(f"the CA's root expired at {pem.iso(root.not_valid_after_utc)}; rotate the CA")
        return pem.cert_pem(build_leaf(csr, spiffe_id, root, key, now, ttl))

    def status(self) -> dict[str, Any]:
        with self._lock:
            previous = [r.describe() for r in self._roots if r is not self._active]
            previous = [r for r in previous
                        if not (self._pending and r["fingerprint"] == self._pending[0].fingerprint)]
            phase = "prepared" if self._pending else "rotating" if previous else "idle"
            return {"kind": "builtin", "trustDomain": self.trust_domain, "directory": self.directory,
                    "activeRoot": self._active.describe(), "roots": len(self._roots),
                    "rotation": phase, "previousRoots": previous,
                    "preparedRoot": self._pending[0].describe() if self._pending else None}

    # ---- rotation ---------------------------------------------------------------------------
    def prepare(self, validity_days: int | None = None) -> str:
        """Step 1 of a rotation: a new root every node trusts from now on (it is in `roots()`),
        that signs nothing until `rotate`. Its fingerprint; the same one when already prepared
        (`validity_days` then changes nothing)."""
        _check_validity(validity_days)
        with self._lock:
            return self._prepare_locked(validity_days).fingerprint

    def _prepare_locked(self, validity_days: int | None) -> _Root:
        if self._pending is not None:
            return self._pending[0]
        days = validity_days if validity_days is not None else self._root_validity_days()
        generation = max(r.generation for r in self._roots) + 1
        key = new_key()
        root = _Root(generation, build_root(key, self.trust_domain, generation, pem.utc(), days))
        # The key first: a root in the bundle whose key is lost could never sign.
        path = os.path.join(self.directory, CA_NEXT_KEY)
        write_atomic(path, pem.key_to_pem(key), 0o600)
        _own_by_root(path)
        roots = [root, *self._roots]
        self._write_bundle(roots, self._active)
        self._roots = roots
        self._pending = (root, key)
        log.info("CA %s: prepared root %d (%s)", self.trust_domain, generation, root.fingerprint)
        return root

    @property
    def prepared(self) -> str | None:
        """The fingerprint of a prepared root that does not sign yet, if any."""
        with self._lock:
            return self._pending[0].fingerprint if self._pending else None

    def rotate(self, validity_days: int | None = None) -> None:
        """Make the prepared root (or, without one, a new one) the signing root; the previous
        roots stay trusted until `retire`."""
        _check_validity(validity_days)
        # Prepare and activate under one hold of the lock: two rotations at once must not find
        # the root one of them prepared already activated by the other.
        with self._lock:
            root = self._prepare_locked(validity_days)
            assert self._pending is not None and self._pending[0] is root
            key = self._pending[1]
            # Order matters for a crash: the key is in place before ca.json calls its root active
            # (load() trusts the key).
            self._write_key(key)
            self._key, self._active = key, root
            self._write_bundle(self._roots, self._active)
            self._write_crt()
            self._pending = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, CA_NEXT_KEY))
        log.info("CA %s: rotated to root %d (%s)", self.trust_domain, root.generation,
                 root.fingerprint)

    def retire(self) -> int:
        """Drop every root but the active one (and a prepared one) from the bundle; how many
        were dropped."""
        with self._lock:
            keep = [r for r in self._roots
                    if r is self._active or (self._pending and r is self._pending[0])]
            dropped = len(self._roots) - len(keep)
            if dropped:
                self._write_bundle(keep, self._active)
                self._roots = keep
        if dropped:
            log.info("CA %s: retired %d previous root(s)", self.trust_domain, dropped)
        return dropped

    def _root_validity_days(self) -> int:
        # A rotated root lives as long as the one it replaces was made to.
        lifetime = self._active.cert.not_valid_after_utc - self._active.cert.not_valid_before_utc
        return max(1, round((lifetime - CLOCK_SKEW) / timedelta(days=1)))

    # ---- writes (callers hold the lock, or own the object alone) -----------------------------
    def _write_key(self, key: PrivateKey) -> None:
        path = os.path.join(self.directory, CA_KEY)
        write_atomic(path, pem.key_to_pem(key), 0o600)
        _own_by_root(path)

    def _write_bundle(self, roots: list[_Root], active: _Root) -> None:
        data = {"version": FORMAT_VERSION, "trustDomain": self.trust_domain,
                "active": active.fingerprint, "roots": [r.to_json() for r in roots]}
        path = os.path.join(self.directory, CA_JSON)
        write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o600)
        _own_by_root(path)

    def _write_crt(self) -> None:
        path = os.path.join(self.directory, CA_CRT)
        write_atomic(path, self._active.pem, 0o644)
        _own_by_root(path)

    def _write_crt_if_stale(self) -> None:
        try:
            with open(os.path.join(self.directory, CA_CRT), "rb") as f:
                if f.read() == self._active.pem:
                    return
        except OSError:
            pass
        self._write_crt()
