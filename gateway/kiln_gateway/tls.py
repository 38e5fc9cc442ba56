"""TLS on the public listener (ALPN h2, http/1.1) and towards the model servers (optionally mutual).

Both sides read PEM files named in `GatewayTlsSettings`; Envoy loads them when the config loads,
so a renewed certificate needs a gateway restart (or a hot restart). TLS 1.2 is the floor on both
sides: older versions have no AEAD ciphers and browsers dropped them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from .envoy_types import typed
from .settings import GatewaySettings

TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "envoy.extensions.transport_sockets.tls.v3."
#: Browsers get HTTP/2 (one connection, many streams) and everything else falls back to
#: HTTP/1.1; the listener's codec stays AUTO and follows what ALPN chose.
DOWNSTREAM_ALPN = ["h2", "http/1.1"]
#: grpcio servers speak HTTP/2 only and refuse a TLS handshake that offers no h2.
UPSTREAM_ALPN = ["h2"]
TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_2"}


def _certificate(cert: Path, key: Path) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(cert.resolve())},
        "private_key": {"filename": str(key.resolve())},
    }


def _socket(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"name": TLS_SOCKET, "typed_config": typed(_TLS_TYPES + type_name, **fields)}


def downstream_transport_socket(settings: GatewaySettings) -> dict[str, Any] | None:
    """The listener's transport socket, or None for plaintext.

    With TLS on, the listener has only this filter chain, so a plaintext request to the port
    fails the handshake: nothing is served unencrypted, not even a redirect.
    """
    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    return _socket(
        "DownstreamTlsContext",
        common_tls_context={
            "tls_params": TLS_PARAMS,
            "alpn_protocols": DOWNSTREAM_ALPN,
            "tls_certificates": [_certificate(tls.cert_file, tls.key_file)],
        },
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _upstream_hosts(settings: GatewaySettings, cluster: str) -> list[str]:
    upstreams = settings.img2img_upstreams if cluster == "img2img" else settings.mesh_upstreams
    hosts: list[str] = []
    for address in upstreams:
        host = address.rpartition(":")[0].strip("[]")
        if host not in hosts:
            hosts.append(host)
    return hosts


def _san_matcher(name: str) -> dict[str, Any]:
    return {"san_type": "IP_ADDRESS" if _is_ip(name) else "DNS", "matcher": {"exact": name}}


def upstream_transport_socket(settings: GatewaySettings, cluster: str) -> dict[str, Any] | None:
    """A model cluster's transport socket, or None for plaintext.

    The server certificate must chain to `upstream_ca_file` and name `upstream_server_name`, or
    by default one of the cluster's upstream hosts (a DNS name, or an IP address as an IP SAN):
    a certificate from the right CA for another host is refused. SNI is sent for a DNS name only
    (SNI carries no IP addresses). Health checks use the same socket, so a replica whose
    certificate fails verification is also marked unhealthy.
    """
    tls = settings.tls
    if tls.upstream_ca_file is None:
        return None
    names = [tls.upstream_server_name] if tls.upstream_server_name else _upstream_hosts(settings, cluster)
    common: dict[str, Any] = {
        "tls_params": TLS_PARAMS,
        "alpn_protocols": UPSTREAM_ALPN,
        "validation_context": {
            "trusted_ca": {"filename": str(tls.upstream_ca_file.resolve())},
            "match_typed_subject_alt_names": [_san_matcher(name) for name in names],
        },
    }
    if tls.upstream_client_cert_file is not None and tls.upstream_client_key_file is not None:
        common["tls_certificates"] = [_certificate(tls.upstream_client_cert_file, tls.upstream_client_key_file)]
    dns_names = [name for name in names if not _is_ip(name)]
    sni = {"sni": dns_names[0]} if len(dns_names) == 1 and len(names) == 1 else {}
    return _socket("UpstreamTlsContext", common_tls_context=common, **sni)
