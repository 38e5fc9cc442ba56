"""Kiln's Envoy gateway: settings, config rendering and a process launcher.

Import it as `gateway.kiln_gateway` with the repository root on `sys.path` (pytest's rootdir,
or `python -m gateway.kiln_gateway` run from the root); the package uses relative imports
only, so `kiln_gateway` with `gateway/` on the path works too.
"""

from .launcher import Envoy, EnvoyError, envoy_binary, validate_config
from .render import SERVICES, render_config
from .settings import GatewaySettings

__all__ = ["SERVICES", "Envoy", "EnvoyError", "GatewaySettings", "envoy_binary", "render_config", "validate_config"]
