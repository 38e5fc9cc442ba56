"""Builds the mesh server from settings: provider, runtime, service, servicer."""

from __future__ import annotations

from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from kiln_mesh import SERVICE_NAME, convert
from kiln_mesh.config import MeshSettings
from kiln_mesh.providers import RUNS_LOCALLY, create_provider
from kiln_mesh.service import MeshService
from kiln_mesh.servicer import MeshServicer
from kiln_runtime.device import CPU
from kiln_runtime.server import KilnServer, build_runtime, choose_service_device


def create_server(settings: MeshSettings) -> KilnServer:
    """Everything wired, nothing bound: call `start()` (tests) or run `serve()` (main)."""
    section = settings.mesh
    device = choose_service_device("mesh", section) if section.provider in RUNS_LOCALLY else CPU
    provider = create_provider(settings, device)
    runtime = build_runtime(
        name="mesh",
        service_full_name=SERVICE_NAME,
        kiln=settings,
        settings=settings.mesh,
        provider=provider,
        job_messages=convert.JOB_MESSAGES,
    )
    servicer = MeshServicer(MeshService(runtime))
    return KilnServer(
        runtime,
        kiln=settings,
        service_full_name=SERVICE_NAME,
        register=lambda server: pb_grpc.add_MeshProviderServicer_to_server(servicer, server),
        # SIGHUP reads the environment and .env again, so a new model id or revision takes effect.
        reload_provider=lambda: create_provider(type(settings)(), device),
    )
