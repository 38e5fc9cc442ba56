"""Authentication at the gateway: API keys or JWTs, the principal header, service access.

Stub: the auth work fills this module. `render.py` calls these hooks; keep their signatures.
"""

from __future__ import annotations

from typing import Any

from .settings import GatewaySettings


def http_filters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Filters placed after grpc_web and before the rate limit and the transcoder."""
    return []


def apply_to_routes(settings: GatewaySettings, routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjust the rendered routes (open static files, the signed-link route, per-service access)."""
    return routes
