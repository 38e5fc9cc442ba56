"""Builds the img2img server from settings: provider, runtime, service, servicer."""

from __future__ import annotations

from typing import Any

from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img import SERVICE_NAME, convert
from kiln_img2img.config import Img2ImgSettings
from kiln_img2img.providers import RUNS_LOCALLY, create_provider
from kiln_img2img.service import Img2ImgService
from kiln_img2img.servicer import Img2ImgServicer
from kiln_runtime.device import CPU
from kiln_runtime.provider import Provider
from kiln_runtime.server import KilnServer, build_runtime, choose_service_device


def create_server(settings: Img2ImgSettings) -> KilnServer:
    """Everything wired, nothing bound: call `start()` (tests) or run `serve()` (main)."""
    section = settings.img2img
    device = choose_service_device("img2img", section) if section.provider in RUNS_LOCALLY else CPU
    provider = create_provider(settings, device)
    runtime = build_runtime(
        name="img2img",
        service_full_name=SERVICE_NAME,
        kiln=settings,
        settings=settings.img2img,
        provider=provider,
        job_messages=convert.JOB_MESSAGES,
    )

    def with_metrics(provider: Provider[Any, Any]) -> Provider[Any, Any]:
        # The diffusers provider counts VAE re-decodes and compile fallbacks on the server's metrics,
        # which exist only once the runtime does (duck-typed: this module must not import torch).
        attach = getattr(provider, "attach_metrics", None)
        if attach is not None:
            attach(runtime.metrics)
        return provider

    with_metrics(provider)
    servicer = Img2ImgServicer(Img2ImgService(runtime, section.diffusers))
    return KilnServer(
        runtime,
        kiln=settings,
        service_full_name=SERVICE_NAME,
        register=lambda server: pb_grpc.add_Img2ImgProviderServicer_to_server(servicer, server),
        # SIGHUP reads the environment and .env again, so a new model id or revision takes effect.
        reload_provider=lambda: with_metrics(create_provider(type(settings)(), device)),
    )
