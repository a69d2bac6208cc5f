"""The Python client against a daemon serving TLS (``vcid serve --tls-cert``):
certificates made here (``cryptography``), the real daemon on loopback.
A Monitor and a Client over ``https://`` with ``tls_ca`` (and the
``VCID_TLS_*`` variables) push, close and read; a client trusting another
CA, or speaking plaintext, is refused; mutual TLS needs the client
certificate."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time

import numpy as np
import pytest
from cryptography import x509  # the dev extra
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import vcid
from vcid.local import LocalDaemon


def _name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Ca:
    def __init__(self, name):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, name, server):
        """(certificate PEM, key PEM) for 127.0.0.1/localhost (a server) or
        a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(name))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _files(tmp_path, name, pair):
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return str(cert), str(key)


@pytest.fixture
def pki(tmp_path):
    ca, clients, other = Ca("server CA"), Ca("client CA"), Ca("someone else")
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    (tmp_path / "clients.pem").write_bytes(clients.pem())
    (tmp_path / "other.pem").write_bytes(other.pem())
    return {
        "ca": str(tmp_path / "ca.pem"),
        "clients": str(tmp_path / "clients.pem"),
        "other": str(tmp_path / "other.pem"),
        "server": _files(tmp_path, "server", ca.leaf("vcid", server=True)),
        "client": _files(tmp_path, "client", clients.leaf("trainer", server=False)),
    }


def _daemon(vcid_command, tmp_path, pki):
    cert, key = pki["server"]
    return LocalDaemon(vcid_command, data_dir=tmp_path / "data",
                       extra_args=["--tls-cert", cert, "--tls-key", key], tls_ca=pki["ca"])


def test_monitor_and_client_over_tls(vcid_command, tmp_path, pki, run_id, monkeypatch):
    for name in ("VCID_TLS_CA", "VCID_TLS_CLIENT_CERT", "VCID_TLS_CLIENT_KEY", "VCID_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with _daemon(vcid_command, tmp_path, pki) as d:
        url = f"https://{d.address}"
        rng = np.random.default_rng(0)
        x = rng.normal(size=(60, 4))
        y = np.arange(60) % 3
        with vcid.Monitor(run_id, 3, 4, address=url, tls_ca=pki["ca"],
                          connect_timeout=10) as mon:
            assert mon.address == url
            mon.push(x, y)
            result = mon.close_epoch()
        assert result.samples == 60
        # The same from the environment, read back with a Client.
        monkeypatch.setenv("VCID_TLS_CA", pki["ca"])
        with vcid.Client(url) as client:
            history = client.history(run_id)
        assert [r.samples for r in history] == [60]
        assert history[0].vci == pytest.approx(result.vci, rel=1e-12)
        monkeypatch.delenv("VCID_TLS_CA")

        # Another CA: the handshake fails; the error names TLS.
        with pytest.raises(vcid.VcidError, match="TLS") as err:
            vcid.Client(url, tls_ca=pki["other"], connect_timeout=2)
        assert err.value.code == "UNAVAILABLE"
        # Plaintext to a TLS daemon: no answer.
        with pytest.raises(vcid.VcidError) as err:
            vcid.Client(f"http://{d.address}", connect_timeout=2)
        assert err.value.code == "UNAVAILABLE"
        # An http:// address with TLS files is a contradiction.
        with pytest.raises(vcid.ArgumentError, match="https://"):
            vcid.Client(f"http://{d.address}", tls_ca=pki["ca"])
        # A client certificate without its key.
        with pytest.raises(vcid.ArgumentError, match="tls_client_key"):
            vcid.Client(url, tls_ca=pki["ca"], tls_client_cert=pki["client"][0])


def test_mutual_tls_needs_the_client_certificate(vcid_command, tmp_path, pki, monkeypatch):
    for name in ("VCID_TLS_CA", "VCID_TLS_CLIENT_CERT", "VCID_TLS_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    cert, key = pki["server"]
    d = LocalDaemon(vcid_command, data_dir=tmp_path / "data",
                    extra_args=["--tls-cert", cert, "--tls-key", key,
                                "--tls-client-ca", pki["clients"]])
    # Its readiness probe cannot pass without a client certificate: run the
    # process directly and wait for gRPC with one.
    proc = subprocess.Popen(d.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"https://{d.address}"
        client_cert, client_key = pki["client"]
        deadline = time.monotonic() + 30
        while True:
            try:
                client = vcid.Client(url, tls_ca=pki["ca"], tls_client_cert=client_cert,
                                     tls_client_key=client_key, connect_timeout=3)
                break
            except vcid.VcidError:
                assert time.monotonic() < deadline, "no answer with a client certificate"
                time.sleep(0.1)
        with client:
            assert client.runs() == []
        # The same daemon without the client certificate: refused.
        with pytest.raises(vcid.VcidError) as err:
            vcid.Client(url, tls_ca=pki["ca"], connect_timeout=2)
        assert err.value.code == "UNAVAILABLE"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
