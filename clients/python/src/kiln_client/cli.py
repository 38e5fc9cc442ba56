"""``kiln``: run img2img and mesh jobs, and ask a server or the gateway how it is, from a shell.

    kiln img2img photo.jpg --prompt "a watercolor fox" --steps 30 -o fox.png
    kiln mesh fox.png -o fox.glb --resolution 256
    kiln info
    kiln health --service mesh
    kiln img2img photo.jpg -p "a fox" --detach && kiln jobs watch JOB_ID -o fox.png
    kiln jobs list --state running

``--target`` (or ``KILN_TARGET``) names a model server or the gateway (default the gateway of
``make up``). Progress goes to stderr; ``--json`` prints every event to stdout as one JSON object
per line. Failures print one line and exit with ``10 + <gRPC status code>`` (see ``EXIT_CODES``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from kiln.common.v1 import service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img_pb
from kiln_client._base import DEFAULT_MAX_MESSAGE_BYTES
from kiln_client._cli_io import SERVICES, LocalError, Output, connect, follow, write_artifact
from kiln_client._cli_jobs import add_jobs_command, detach
from kiln_client._download import write_atomically
from kiln_client._img2img import Img2ImgClient, Img2ImgOptions, img2img_result
from kiln_client._mesh import MeshClient, MeshOptions, mesh_result
from kiln_client.errors import KilnError
from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES

DEFAULT_TARGET = "localhost:8080"
EXIT_OK = 0
EXIT_LOCAL_ERROR = 1  # a local file could not be read or written
EXIT_USAGE = 2  # argparse's own
EXIT_INTERRUPTED = 130  # Ctrl-C; a job this run started is cancelled on the server
#: A failed call exits with 10 + its status code: 13 invalid argument, 14 deadline exceeded,
#: 15 not found, 18 resource exhausted (busy), 19 failed precondition, 23 internal,
#: 24 unavailable, 25 data loss (checksum mismatch).
EXIT_CODES: dict[grpc.StatusCode, int] = {
    code: 10 + int(code.value[0]) for code in grpc.StatusCode if code is not grpc.StatusCode.OK
}


def _error_line(error: KilnError, target: str, timeout: float | None) -> str:
    """One line a person can act on."""
    code = error.code
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay_s is not None:
        # The caller's own limits (its job quota, the gateway's request rate) are not "busy".
        if error.reason in ("QUOTA", "RATE_LIMITED"):
            return f"limit reached [{error.reason}], retry in {max(1, round(error.retry_delay_s))} s: {error.message}"
        return f"server busy, retry in {max(1, round(error.retry_delay_s))} s ({error.message})"
    if (
        code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        and error.reason != "LINK_NOT_VALID"
    ):
        return f"{error.message} (--api-key / KILN_API_KEY, or --token / KILN_TOKEN)"
    if code is grpc.StatusCode.UNAVAILABLE and error.reason in ("", "SHUTTING_DOWN"):
        # No reason: the connection. Other reasons (REPLICA_LOST, STORAGE_UNAVAILABLE) say more below.
        return f"cannot use {target}: {error.message} (is the stack running? `make up`, or set --target)"
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return f"{target} does not serve this call ({error.message}): point --target at that service or the gateway"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        return f"no result within {timeout:g} s (--timeout): {error.message}"
    if code is grpc.StatusCode.INVALID_ARGUMENT and error.field_violations:
        fields = "; ".join(f"{field}: {description}" for field, description in error.field_violations)
        return f"invalid request: {fields}"
    reason = f" [{error.reason}]" if error.reason else ""
    return f"{code.name.lower().replace('_', ' ')}{reason}: {error.message}"


def _error_json(error: KilnError) -> dict[str, Any]:
    return {
        "error": {
            "code": error.code.name,
            "message": error.message,
            "reason": error.reason,
            "field_violations": [{"field": f, "description": d} for f, d in error.field_violations],
            "retry_delay_s": error.retry_delay_s,
        }
    }


def _read_image(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as error:
        raise LocalError(f"cannot read {path}: {error.strerror or error}") from error


def _output_path(given: str | None, image: str, suffix: str) -> Path:
    path = Path(given) if given else Path(f"{Path(image).stem if image != '-' else 'kiln'}-kiln{suffix}")
    if not path.parent.is_dir():
        raise LocalError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def _img2img(args: argparse.Namespace, out: Output) -> int:
    image = _read_image(args.image)
    suffix = ".jpg" if args.format == "jpeg" else f".{args.format}"
    path = _output_path(args.output, args.image, suffix)
    options: Img2ImgOptions = {"scheduler": args.scheduler, "output_format": args.format}
    for key, value in (
        ("negative_prompt", args.negative_prompt),
        ("strength", args.strength),
        ("steps", args.steps),
        ("guidance", args.guidance),
        ("seed", args.seed),
    ):
        if value is not None:
            options[key] = value  # type: ignore[literal-required]
    preview_path = path.with_name(f"{path.stem}.preview.webp")
    if args.preview:
        options["preview_every"] = args.preview

    def save_preview(event: Message) -> None:
        if event.WhichOneof("event") == "progress" and event.progress.HasField("preview"):  # type: ignore[attr-defined]
            write_atomically(preview_path, event.progress.preview.data)  # type: ignore[attr-defined]

    if args.detach:
        options["on_disconnect"] = "DETACH"
    started = time.monotonic()
    with connect(args, Img2ImgClient) as client:
        assert isinstance(client, Img2ImgClient)
        events = client.generate(image, prompt=args.prompt, **options)
        if args.detach:
            return detach(client, events, out, args)
        result = img2img_result(follow(events, out, save_preview if args.preview else None))
        write_artifact(client, result.artifact, result.image, path)
    out.say(
        f"wrote {path} ({result.width}x{result.height}, seed {result.seed}, "
        f"{time.monotonic() - started:.1f} s)" + (f"; latest preview {preview_path}" if args.preview else "")
    )
    return EXIT_OK


def _mesh(args: argparse.Namespace, out: Output) -> int:
    image = _read_image(args.image)
    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else "glb")
    if fmt not in ("glb", "obj", "ply"):
        raise LocalError(f"cannot tell the mesh format from {args.output!r}: use --format glb|obj|ply")
    path = _output_path(args.output, args.image, f".{fmt}")
    options: MeshOptions = {"output_format": fmt, "bake_texture": args.bake_texture}
    if args.resolution is not None:
        options["mc_resolution"] = args.resolution
    if args.no_remove_bg:
        options["remove_background"] = "NEVER"
    if args.texture_resolution is not None:
        options["texture_resolution"] = args.texture_resolution
    if args.detach:
        options["on_disconnect"] = "DETACH"
    started = time.monotonic()
    with connect(args, MeshClient) as client:
        assert isinstance(client, MeshClient)
        events = client.generate(image, **options)
        if args.detach:
            return detach(client, events, out, args)
        result = mesh_result(follow(events, out))
        write_artifact(client, result.artifact, result.data, path)
    out.say(
        f"wrote {path} ({result.vertex_count} vertices, {result.face_count} faces, {time.monotonic() - started:.1f} s)"
    )
    return EXIT_OK


def _residency(model: service_info_pb2.ModelInfo) -> str:
    """Whether the weights are in memory, and what keep-alive will do, in one line."""
    state = "loaded" if model.loaded else "unloaded (the next job loads it)"
    if model.HasField("last_load_duration"):
        state += f", last load {model.last_load_duration.ToTimedelta().total_seconds():.1f} s"
    if not model.HasField("keep_alive"):
        return f"{state}, stays loaded"
    keep_alive = model.keep_alive.ToTimedelta().total_seconds()
    return f"{state}, unloads {f'after {keep_alive:g} s idle' if keep_alive else 'after each job'}"


def _selected(args: argparse.Namespace) -> list[str]:
    return list(SERVICES) if args.service == "all" else [args.service]


def _info(args: argparse.Namespace, out: Output) -> int:
    answered = 0
    for name in _selected(args):
        _, client_type = SERVICES[name]
        with connect(args, client_type) as client:
            try:
                info = client.get_info()  # type: ignore[attr-defined]
            except KilnError as error:
                if args.service == "all" and error.code is grpc.StatusCode.UNIMPLEMENTED:
                    out.say(f"{name}: not served at {args.target}")
                    continue
                raise
        answered += 1
        if out.json:
            print(json.dumps({"service": name, **json_format.MessageToDict(info)}), file=out.stdout, flush=True)
            continue
        model, limits = info.model, info.limits
        readiness = service_info_pb2.Readiness.Name(model.readiness).removeprefix("READINESS_").lower()
        reason = f" ({model.readiness_reason})" if model.readiness_reason else ""
        print(
            f"{name}: {readiness}{reason}\n"
            f"  model     {model.model_id or '-'} {model.model_revision[:12]} via {model.provider}\n"
            f"  device    {model.device} {model.dtype}\n"
            f"  load      {limits.running}/{limits.max_concurrency} running, "
            f"{limits.queued}/{limits.max_queue} queued\n"
            f"  memory    {_residency(model)}",
            file=out.stdout,
        )
    if answered == 0:
        raise KilnError(f"no Kiln service answered at {args.target}", code=grpc.StatusCode.UNIMPLEMENTED)
    return EXIT_OK


def _health_of(args: argparse.Namespace, name: str) -> str | None:
    """SERVING, NOT_SERVING, ... from grpc.health.v1, or None when the service is not there.

    Where the target has no health service (the gateway routes only Kiln's services), the
    GetInfo readiness stands in for it.
    """
    grpc_name, client_type = SERVICES[name]
    with connect(args, client_type) as client:
        try:
            return client.check_health(grpc_name)
        except KilnError as error:
            if error.code is grpc.StatusCode.NOT_FOUND:
                return None
            if error.code is not grpc.StatusCode.UNIMPLEMENTED:
                raise
        try:
            info = client.get_info()  # type: ignore[attr-defined]
        except KilnError as error:
            if error.code is grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
        ready = info.model.readiness == service_info_pb2.READINESS_READY
        return "SERVING" if ready else "NOT_SERVING"


def _health(args: argparse.Namespace, out: Output) -> int:
    statuses = {name: _health_of(args, name) for name in _selected(args)}
    present = {name: status for name, status in statuses.items() if status is not None}
    for name, status in statuses.items():
        if out.json:
            print(json.dumps({"service": name, "status": status or "NOT_FOUND"}), file=out.stdout, flush=True)
        else:
            print(f"{name}: {status or f'not served at {args.target}'}", file=out.stdout)
    if not present:
        return EXIT_CODES[grpc.StatusCode.NOT_FOUND]
    if any(status != "SERVING" for status in present.values()):
        return EXIT_CODES[grpc.StatusCode.UNAVAILABLE]
    return EXIT_OK


def _enum_choices(enum: Any, prefix: str) -> list[str]:
    """The enum's names as lower-case choices (new server enums appear after regenerating)."""
    names: list[str] = enum.keys()
    return [name.removeprefix(prefix).lower() for name in names if not name.endswith("_UNSPECIFIED")]


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--target",
        default=os.environ.get("KILN_TARGET", DEFAULT_TARGET),
        help="server or gateway host:port (env KILN_TARGET; default %(default)s)",
    )
    group.add_argument("--timeout", type=float, default=None, help="deadline in seconds for each call")
    group.add_argument(
        "--retries", type=int, default=2, help="retries while the server is full or draining, or unreachable"
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    group.add_argument("--ca-file", help="PEM root certificate(s) for TLS (implies --tls)")
    group.add_argument(
        "--api-key",
        default=os.environ.get("KILN_API_KEY"),
        help="API key of a gateway that checks keys, sent as `authorization: Bearer <key>` (env KILN_API_KEY)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("KILN_TOKEN"),
        help="bearer token (a JWT) of a gateway that checks tokens, sent as `authorization: Bearer <token>` "
        "(env KILN_TOKEN); not together with --api-key",
    )
    group.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest message received (artifacts above it come in chunks); keep it equal to the server's "
        "max_message_bytes (default %(default)s)",
    )
    group.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="the server's image limit (`kiln info`: maxImageBytes); the send cap follows it (default %(default)s)",
    )
    group.add_argument("--json", action="store_true", help="print events/answers to stdout as JSON lines")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``kiln`` argument parser."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln from the command line: img2img, image-to-mesh, jobs by id, service info and health.",
        epilog="Exit status: 0 success, 1 local file problem, 2 usage, 130 interrupted, "
        "10+<gRPC code> for a failed call (13 invalid argument, 14 deadline, 15 not found, 18 busy, "
        "23 internal, 24 unavailable, 25 checksum mismatch).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    img2img = commands.add_parser("img2img", parents=[common], help="turn an image and a prompt into a new image")
    img2img.add_argument("image", help="input image file (PNG, JPEG, WebP), or - for stdin")
    img2img.add_argument("-p", "--prompt", required=True, help="what the new image should show")
    img2img.add_argument("-o", "--output", help="output file (default <image>-kiln.<format>)")
    img2img.add_argument("--negative-prompt", help="what it should not show")
    img2img.add_argument("--strength", type=float, help="how far to move from the input, in (0, 1]")
    img2img.add_argument("--steps", type=int, help="denoising steps for strength 1")
    img2img.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    img2img.add_argument("--seed", type=int, help="random seed (the summary prints the one used)")
    img2img.add_argument(
        "--scheduler",
        default="euler",
        choices=_enum_choices(img2img_pb.Scheduler, "SCHEDULER_"),
        type=str.lower,
    )
    img2img.add_argument(
        "--format", default="png", choices=_enum_choices(img2img_pb.ImageFormat, "IMAGE_FORMAT_"), type=str.lower
    )
    img2img.add_argument(
        "--preview",
        type=int,
        nargs="?",
        const=5,
        metavar="N",
        help="ask for a preview every N steps (default 5) and keep the latest in <output>.preview.webp",
    )
    img2img.set_defaults(run=_img2img)

    mesh = commands.add_parser("mesh", parents=[common], help="turn an image of an object into a 3D mesh")
    mesh.add_argument("image", help="input image file, or - for stdin")
    mesh.add_argument("-o", "--output", help="output file; its suffix picks the format (default <image>-kiln.glb)")
    mesh.add_argument("--format", choices=["glb", "obj", "ply"], type=str.lower, help="mesh file format")
    mesh.add_argument("--resolution", type=int, help="marching-cubes grid resolution per axis")
    mesh.add_argument("--no-remove-bg", action="store_true", help="keep the background (input already cut out)")
    mesh.add_argument("--bake-texture", action="store_true", help="bake colours into a UV texture (GLB)")
    mesh.add_argument("--texture-resolution", type=int, help="baked texture size in pixels")
    mesh.set_defaults(run=_mesh)
    for command in (img2img, mesh):
        command.add_argument(
            "--detach",
            action="store_true",
            help="submit, print the job id and exit; the job runs on (`kiln jobs watch JOB_ID` follows it)",
        )
        # Ctrl-C closes the stream, and the client cancels a job it started (CancelJob): a dropped
        # connection is resumed instead, so only a person's Ctrl-C stops the work.
        command.set_defaults(interrupted="interrupted; the job was cancelled")

    for name, run, text in (
        ("info", _info, "describe the model, readiness and load of each service"),
        ("health", _health, "gRPC health of each service (exit 0 when all serve)"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("--service", choices=["all", *SERVICES], default="all")
        command.set_defaults(run=run, interrupted="interrupted")
    add_jobs_command(commands, common)
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``kiln``; returns the exit status.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.
        stdout: Where results and ``--json`` lines go; default ``sys.stdout``.
        stderr: Where progress and errors go; default ``sys.stderr``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_key and args.token:
        # The environment counts too: KILN_API_KEY with --token is as ambiguous as both flags.
        parser.error("give --api-key (KILN_API_KEY) or --token (KILN_TOKEN), not both")
    if args.ca_file:
        args.tls = True
    out = Output(json=args.json, quiet=args.quiet, stdout=stdout or sys.stdout, stderr=stderr or sys.stderr)
    try:
        status: int = args.run(args, out)
        return status
    except KilnError as error:
        if out.json:
            print(json.dumps(_error_json(error)), file=out.stdout, flush=True)
        print(f"kiln: {_error_line(error, args.target, args.timeout)}", file=out.stderr, flush=True)
        return EXIT_CODES.get(error.code, EXIT_LOCAL_ERROR)
    except LocalError as error:
        print(f"kiln: {error}", file=out.stderr, flush=True)
        return EXIT_LOCAL_ERROR
    except ValueError as error:  # an enum name the server does not know
        print(f"kiln: {error}", file=out.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"kiln: {args.interrupted}", file=out.stderr, flush=True)
        return EXIT_INTERRUPTED


def run() -> None:
    """Console-script entry point."""
    try:
        sys.exit(main())
    except BrokenPipeError:
        # The reader went away (`kiln info | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)


if __name__ == "__main__":
    run()
