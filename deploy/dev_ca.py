"""A local development certificate authority for TLS between browser, gateway and model servers.

`make up KILN_TLS=dev` (deploy/local_stack.py) and the TLS tests use it: one CA, then a server
certificate for the gateway (`localhost`, `127.0.0.1`), one per model server, and a client
certificate the gateway presents to the servers when mutual TLS is on. Keys are EC P-256, written
with mode 0600. Never for production: there, certificates come from a real CA (Kubernetes
Secrets, cert-manager).

To trust the CA in a browser or the system store, see README.md ("TLS"); `python -m
deploy.dev_ca FOLDER` creates the CA and a gateway certificate by hand.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: How long development certificates stay valid; browsers accept at most 398 days for a leaf.
VALID_DAYS = 365
CA_NAME = "Kiln development CA"


@dataclass(frozen=True)
class CertFiles:
    """A PEM certificate and its PEM private key."""

    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 from the start: a key must never be readable by others, not even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    # A minute back: a clock a little behind on the verifying side must not see "not yet valid".
    return now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=VALID_DAYS)


def make_ca(folder: Path, *, name: str = CA_NAME) -> CertFiles:
    """Create a CA (ca.pem, ca.key) in `folder`, or return the one already there."""
    folder.mkdir(parents=True, exist_ok=True)
    files = CertFiles(folder / "ca.pem", folder / "ca.key")
    if files.cert.is_file() and files.key.is_file():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(ca: CertFiles, folder: Path, name: str, *, hosts: list[str] | None = None, client: bool = False) -> CertFiles:
    """Issue `<name>.pem` and `<name>.key` in `folder`, signed by `ca`.

    Args:
        ca: The CA from `make_ca`.
        folder: Where the two files go.
        name: File stem and common name.
        hosts: DNS names and IP addresses the certificate is valid for (a server certificate);
            default localhost and 127.0.0.1.
        client: Issue a client certificate (mutual TLS) instead of a server one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key} is not an EC key made by make_ca")
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if not client:
        names = _alt_names(hosts if hosts is not None else ["localhost", "127.0.0.1"])
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    files = CertFiles(folder / f"{name}.pem", folder / f"{name}.key")
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.dev_ca", description=__doc__)
    parser.add_argument("folder", type=Path, help="where ca.pem, ca.key, gateway.pem and gateway.key go")
    parser.add_argument("--host", action="append", help="a name or address for the gateway certificate")
    args = parser.parse_args(argv)
    ca = make_ca(args.folder)
    gateway = issue(ca, args.folder, "gateway", hosts=args.host or None)
    print(f"CA {ca.cert}\ngateway certificate {gateway.cert}, key {gateway.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
