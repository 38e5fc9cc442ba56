"""One model server from its declaration: each service names what sets it apart, the rest is here.

A service declares a `ServiceSpec` (its name, settings class, provider registry, service
class, generated messages and registration function); `spec.create_server(settings)` wires
device policy, provider, runtime, service and servicer into a `KilnServer`, and `spec.main()`
is the process entry point (`kiln-img2img`, `python -m kiln_mesh`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from pydantic import ValidationError

from kiln_runtime.device import (
    CPU,
    MPS_FALLBACK_ENV,
    DeviceAvailability,
    DeviceChoice,
    choose_device,
    configure_mps_fallback,
    probe_devices,
)
from kiln_runtime.job_api import JobMessages
from kiln_runtime.job_servicer import GeneratingService, ModelServicer
from kiln_runtime.provider import Provider
from kiln_runtime.runtime import Runtime, build_runtime
from kiln_runtime.server import KilnServer, serve
from kiln_runtime.settings import KilnSettings, ServiceSettings
from kiln_runtime.telemetry.logging import configure_logging

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=KilnSettings)


@dataclass(frozen=True)
class ServiceSpec(Generic[SettingsT]):
    """What makes a model server this service and not another.

    The root settings class holds the service's section under the service's name
    (`Img2ImgSettings.img2img`, read from `KILN_IMG2IMG__...`), and that section has a
    `provider` field naming the registry entry.
    """

    #: The settings section, metric namespace, error domain and console script suffix.
    name: str
    #: The gRPC service, e.g. `kiln.img2img.v1.Img2ImgProvider`: health and reflection list it.
    full_name: str
    settings_type: type[SettingsT]
    #: The provider registry: builds the configured provider for the chosen device.
    create_provider: Callable[[SettingsT, DeviceChoice], Provider[Any, Any]]
    #: Provider kinds that run a model in this process, so the device policy applies at startup.
    runs_locally: Collection[str]
    create_service: Callable[[Runtime, SettingsT], GeneratingService]
    #: Proto → domain for Generate (raises InvalidArgument with field violations).
    job_from_request: Callable[[Any], Any]
    job_messages: JobMessages
    #: The generated `GetInfoResponse` class and the `ParameterRanges` it reports.
    info_response: Callable[..., Any]
    parameters: Callable[[Runtime], Any]
    #: The generated `add_<Name>ProviderServicer_to_server`.
    register: Callable[[Any, grpc.aio.Server], None]

    def section(self, settings: SettingsT) -> ServiceSettings:
        """This service's part of the root settings."""
        section = getattr(settings, self.name)
        if not isinstance(section, ServiceSettings):
            raise TypeError(f"{type(settings).__name__}.{self.name} is not a service settings section")
        return section

    def create_server(self, settings: SettingsT) -> KilnServer:
        """Everything wired, nothing bound: call `start()` (tests) or run `serve()` (main)."""
        section = self.section(settings)
        runs_locally = getattr(section, "provider", None) in self.runs_locally
        device = choose_service_device(self.name, section) if runs_locally else CPU
        provider = self.create_provider(settings, device)
        runtime = build_runtime(
            name=self.name,
            service_full_name=self.full_name,
            kiln=settings,
            settings=section,
            provider=provider,
            job_messages=self.job_messages,
        )
        _attach_metrics(provider, runtime)
        servicer = ModelServicer(
            self.create_service(runtime, settings),
            job_from_request=self.job_from_request,
            info_response=self.info_response,
            parameters=self.parameters,
        )

        def reload_provider() -> Provider[Any, Any]:
            # SIGHUP reads the environment and .env again, so a new model id or revision takes effect.
            return _attach_metrics(self.create_provider(type(settings)(), device), runtime)

        return KilnServer(
            runtime,
            kiln=settings,
            service_full_name=self.full_name,
            register=lambda server: self.register(servicer, server),
            reload_provider=reload_provider,
        )

    def main(self) -> None:
        """The process entry point: settings once, logging, serve until SIGTERM; exit 2 on a bad setting."""
        # OpenMP's default busy-wait makes torch 10x slower on shared cores; callers may override.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            settings = self.settings_type()
        except ValidationError as err:
            print(f"kiln-{self.name}: invalid settings (KILN_... environment or .env):\n{err}", file=sys.stderr)
            raise SystemExit(2) from None
        configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
        # SecretStr fields dump masked, so the whole configuration can be logged.
        log.info("settings: %s", json.dumps(settings.model_dump(mode="json"), sort_keys=True))

        async def create_and_serve() -> None:
            # The server binds to the running loop, so it is created inside it.
            await serve(self.create_server(settings))

        try:
            asyncio.run(create_and_serve())
        except (RuntimeError, ValueError) as err:
            log.error("kiln-%s cannot start: %s", self.name, err)
            raise SystemExit(2) from None


def _attach_metrics(provider: Provider[Any, Any], runtime: Runtime) -> Provider[Any, Any]:
    # A provider may count on the server's metrics (the diffusers provider's VAE re-decodes and
    # compile fallbacks), which exist only once the runtime does. Duck-typed: naming the provider
    # class here would import torch before the device policy has set its environment.
    attach = getattr(provider, "attach_metrics", None)
    if attach is not None:
        attach(runtime.metrics)
    return provider


def choose_service_device(name: str, settings: ServiceSettings) -> DeviceChoice:
    """Apply the device policy once at startup; a named device that is missing stops the server."""
    runtime = settings.runtime
    # Before the probe, which is the process's first torch import: torch reads it only then.
    fallback = configure_mps_fallback(runtime.mps_fallback, runtime.device)
    if fallback.value is not None:
        log.info("%s=%s (from the %s)", MPS_FALLBACK_ENV, fallback.value, fallback.source)
    if not fallback.effective:
        log.warning("torch was imported before %s was set; the setting has no effect", MPS_FALLBACK_ENV)
    # Probing imports torch; a CPU-only policy needs no probe.
    available = DeviceAvailability(cuda=False, mps=False) if runtime.device == "cpu" else probe_devices()
    choice = choose_device(runtime.device, runtime.cuda_dtype, available, setting_name=f"{name}.runtime.device")
    log.info("%s device: %s (%s)", name, choice.device, choice.dtype)
    return choice
