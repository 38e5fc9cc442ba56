"""TLS on the public listener (ALPN h2, http/1.1) and towards the model servers (optionally mutual).

Stub: the edge work fills this module. `render.py` calls these hooks; keep their signatures.
"""

from __future__ import annotations

from typing import Any

from .settings import GatewaySettings


def downstream_transport_socket(settings: GatewaySettings) -> dict[str, Any] | None:
    """The listener's transport socket, or None for plaintext."""
    return None


def upstream_transport_socket(settings: GatewaySettings, cluster: str) -> dict[str, Any] | None:
    """A model cluster's transport socket, or None for plaintext."""
    return None
