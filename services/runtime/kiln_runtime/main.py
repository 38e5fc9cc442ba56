"""The process entry point both servers share: settings once, logging, run until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from kiln_runtime.server import KilnServer, serve
from kiln_runtime.settings import KilnSettings
from kiln_runtime.telemetry.logging import configure_logging

SettingsT = TypeVar("SettingsT", bound=KilnSettings)

log = logging.getLogger("kiln")


def run_main(settings_type: type[SettingsT], create: Callable[[SettingsT], KilnServer], *, section: str) -> None:
    """Build settings, configure logging, create and serve; exit 2 on a configuration error."""
    # OpenMP's default busy-wait makes torch 10x slower on shared cores; callers may override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        settings = settings_type()
    except ValidationError as err:
        print(f"kiln-{section}: invalid settings (KILN_... environment or .env):\n{err}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    # SecretStr fields dump masked, so the whole configuration can be logged.
    log.info("settings: %s", json.dumps(settings.model_dump(mode="json"), sort_keys=True))

    async def create_and_serve() -> None:
        # The server binds to the running loop, so it is created inside it.
        await serve(create(settings))

    try:
        asyncio.run(create_and_serve())
    except (RuntimeError, ValueError) as err:
        log.error("kiln-%s cannot start: %s", section, err)
        raise SystemExit(2) from None
