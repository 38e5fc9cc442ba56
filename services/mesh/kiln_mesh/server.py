"""The mesh model server as a declaration; `kiln_runtime.bootstrap` builds it."""

from __future__ import annotations

from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from kiln_mesh import SERVICE_NAME, convert
from kiln_mesh.config import MeshSettings
from kiln_mesh.providers import RUNS_LOCALLY, create_provider
from kiln_mesh.service import MeshService
from kiln_runtime.bootstrap import ServiceSpec

SPEC = ServiceSpec(
    name="mesh",
    full_name=SERVICE_NAME,
    settings_type=MeshSettings,
    create_provider=create_provider,
    runs_locally=RUNS_LOCALLY,
    create_service=lambda runtime, settings: MeshService(runtime),
    job_from_request=convert.job_from_request,
    job_messages=convert.JOB_MESSAGES,
    info_response=pb.GetInfoResponse,
    # Only Kiln's own TripoSR bakes textures; vendors and the fake return what they return.
    parameters=lambda runtime: convert.parameter_ranges(can_bake_texture=runtime.manager.describe().kind == "local"),
    register=pb_grpc.add_MeshProviderServicer_to_server,
)

#: Everything wired, nothing bound: call `start()` (tests) or run `serve()` (main).
create_server = SPEC.create_server
