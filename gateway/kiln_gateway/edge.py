"""Rate limits and hardening of the public listener.

Stub: the edge work fills this module. `render.py` calls these hooks; keep their signatures.
"""

from __future__ import annotations

from typing import Any

from .settings import GatewaySettings


def http_filters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Filters placed after the auth filters (the principal header is set) and before the transcoder."""
    return []


def apply_to_routes(settings: GatewaySettings, routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjust the rendered routes (rate-limit actions, security headers on the page)."""
    return routes


def connection_manager_fields(settings: GatewaySettings) -> dict[str, Any]:
    """Extra HttpConnectionManager fields (remote address, path normalisation, header limits)."""
    return {}


def bootstrap_fields(settings: GatewaySettings) -> dict[str, Any]:
    """Extra bootstrap fields (the overload manager)."""
    return {}
