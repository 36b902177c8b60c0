"""Test certificates and SuperNode keys for the deployment tests, made with the
``cryptography`` package (a Flower dependency) as docs/deployment.md makes them with
``openssl`` and ``ssh-keygen``: a CA, a server certificate for 127.0.0.1 signed by it,
and one ECDSA P-384 key pair per SuperNode in OpenSSH format. Process handling lives in
``fedsim.engine.flower_runtime.LocalSuperLink``."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedsim.engine.flower_runtime import TLSFiles


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def make_tls_files(folder: Path, host: str = "127.0.0.1", days: int = 2) -> TLSFiles:
    """A CA (``ca.crt``) and a server certificate for ``host`` (``server.crt``,
    ``server.key``) signed by it; the server certificate names ``host`` as an IP SAN."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key, serialization.PrivateFormat.TraditionalOpenSSL)
    return files


@dataclass(frozen=True)
class NodeKey:
    private: Path  # for flower-supernode --auth-supernode-private-key
    public: Path  # for flwr supernode register


def make_node_key(folder: Path, name: str) -> NodeKey:
    """An ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(folder / name, folder / f"{name}.pub")
    _write_key(pair.private, key, serialization.PrivateFormat.OpenSSH)
    pair.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return pair
