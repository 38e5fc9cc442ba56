"""TLS and mutual TLS for a model server's gRPC port (`server.tls_*` settings).

With `tls_cert_file` and `tls_key_file` the gRPC port speaks TLS only; with `tls_client_ca_file`
as well, the handshake requires a client certificate issued by that CA (in a deployment: the
gateway's), so nothing else on the network can call the server directly. The metrics port stays
plaintext HTTP on its own port: Prometheus scrapes it, and it carries no job data.

The files are read once at startup. A missing or unreadable file stops the server with a message
that names the setting and the file, rather than grpc's later, vaguer handshake failures.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from kiln_runtime.settings import ServerSettings


class TlsFileError(RuntimeError):
    """A TLS file named in the settings cannot be used."""


def _read_pem(path: Path, setting: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsFileError(
            f"cannot read {setting} {path}: {error.strerror or error}; fix the path or unset the setting"
        ) from error
    if marker not in data:
        # grpc would only fail at the first handshake, with an error that names no file.
        raise TlsFileError(f"{setting} {path} holds no PEM {marker.decode().strip('-').lower()}")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """The credentials of the gRPC port, or None for plaintext (no certificate configured).

    Raises:
        TlsFileError: A configured file is missing, unreadable or not PEM.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert = _read_pem(settings.tls_cert_file, "server.tls_cert_file", b"-----BEGIN CERTIFICATE")
    key = _read_pem(settings.tls_key_file, "server.tls_key_file", b"PRIVATE KEY-----")
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = _read_pem(settings.tls_client_ca_file, "server.tls_client_ca_file", b"-----BEGIN CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def describe(settings: ServerSettings) -> str:
    """How the gRPC port is protected, for the startup log line."""
    if not settings.tls_enabled:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"
