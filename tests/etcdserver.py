"""A real single-member etcd for tests: on 127.0.0.1, free ports, a temporary data dir, stopped by
PID and removed afterwards. Optionally with client TLS (certificates made with `cryptography`).

etcd comes from Debian (`etcd-server`, installed by `make setup`); without it the tests that need
it fail (they do not skip: CI has it)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

ETCD = "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_certs(d: str) -> tuple[str, str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate; (ca, cert, key) paths
    of the client, the server's sit beside them as server.pem/server-key.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(path: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        with open(path + ".pem", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(path + "-key.pem", "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test etcd CA")).issuer_name(name("test etcd CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    save(os.path.join(d, "ca"), ca_key, ca)
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                       ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(f"test etcd {who}")).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if who == "server":
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        save(os.path.join(d, who), key, b.sign(ca_key, hashes.SHA256()))
    return (os.path.join(d, "ca.pem"), os.path.join(d, "client.pem"),
            os.path.join(d, "client-key.pem"))


class EtcdServer:
    def __init__(self, tls: bool = False) -> None:
        if not os.access(ETCD, os.X_OK):
            pytest.fail(f"{ETCD} is missing: run `make setup` (it installs Debian's etcd-server)",
                        pytrace=False)
        self.dir = tempfile.mkdtemp(prefix="nodemesh-test-etcd-")
        self.tls = tls
        self.ca = self.cert = self.key = None
        scheme = "https" if tls else "http"
        client, peer = free_port(), free_port()
        self.endpoint = f"{scheme}://127.0.0.1:{client}"
        args = [ETCD, "--name", "test", "--data-dir", os.path.join(self.dir, "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"test=http://127.0.0.1:{peer}",
                "--log-level", "warn", "--logger", "zap"]
        if tls:
            self.ca, self.cert, self.key = _write_certs(self.dir)
            args += ["--cert-file", os.path.join(self.dir, "server.pem"),
                     "--key-file", os.path.join(self.dir, "server-key.pem"),
                     "--trusted-ca-file", self.ca, "--client-cert-auth"]
        self._args = args
        self._log = open(os.path.join(self.dir, "etcd.log"), "ab")  # noqa: SIM115
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self._args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self._wait_ready()

    def restart(self) -> None:
        """Stop the member (by PID) and start it again on the same ports and data."""
        self.proc.terminate()
        self.proc.wait(10)
        self._start()

    @property
    def url(self) -> str:
        """The location form `nodemesh.store.etcd.open_url` takes (without a prefix)."""
        if not self.tls:
            return self.endpoint
        return f"{self.endpoint}?ca={self.ca}&cert={self.cert}&key={self.key}"

    def location(self, prefix: str) -> str:
        base, _, query = self.url.partition("?")
        return f"{base}|{prefix}" + (f"?{query}" if query else "")

    def _wait_ready(self) -> None:
        from nodemesh.store.etcd import open_url

        deadline = time.monotonic() + 20
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                s = open_url(self.location("/ready/"))
                try:
                    s.revision()
                    return
                finally:
                    s.close()
            except Exception as e:
                last = e
                time.sleep(0.1)
        log = open(os.path.join(self.dir, "etcd.log"), errors="replace").read()[-3000:]  # noqa: SIM115
        self.stop()
        pytest.fail(f"etcd did not come up ({last}):\n{log}", pytrace=False)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
