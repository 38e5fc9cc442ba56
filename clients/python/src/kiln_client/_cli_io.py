"""What every ``kiln`` command shares: where output goes, connecting, following a job's stream.

Kept apart from the commands (`cli`, `_cli_jobs`) so that each command module imports it
rather than each other.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from kiln_client import _stream
from kiln_client._download import write_atomically
from kiln_client._img2img import Img2ImgClient
from kiln_client._jobs import JobsClient
from kiln_client._mesh import MeshClient
from kiln_client._progress import ProgressView
from kiln_client.errors import KilnError

AnyClient = JobsClient[Any, Any, Any]

#: Each service's command name → its gRPC service name and client.
SERVICES: dict[str, tuple[str, type[AnyClient]]] = {
    "img2img": ("kiln.img2img.v1.Img2ImgProvider", Img2ImgClient),
    "mesh": ("kiln.mesh.v1.MeshProvider", MeshClient),
}


class LocalError(Exception):
    """A problem on this machine (input unreadable, output folder missing)."""


@dataclass
class Output:
    """Where the command writes: events and results (stdout) and people (stderr)."""

    json: bool
    quiet: bool
    stdout: TextIO
    stderr: TextIO

    def event(self, message: Message) -> None:
        if self.json:
            self.json_line(json_format.MessageToDict(message, always_print_fields_with_no_presence=True))

    def json_line(self, fields: dict[str, Any]) -> None:
        print(json.dumps(fields, separators=(",", ":")), file=self.stdout, flush=True)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stderr, flush=True)


def connect(args: argparse.Namespace, client_type: type[AnyClient]) -> AnyClient:
    """A client of ``client_type`` for the connection options of the command line."""
    credentials = None
    if args.ca_file:
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.ca_file).read_bytes())
        except OSError as error:
            raise LocalError(f"cannot read --ca-file {args.ca_file}: {error.strerror or error}") from error
    return client_type(
        args.target,
        timeout=args.timeout,
        tls=args.tls,
        credentials=credentials,
        api_key=args.api_key,
        token=args.token,
        retries=args.retries,
        max_message_bytes=args.max_message_bytes,
        max_image_bytes=args.max_image_bytes,
    )


def follow(events: Generator[Message], out: Output, on_event: Callable[[Message], None] | None = None) -> Any:
    """Drive a stream: progress view, --json lines, chunk reassembly; returns the collected job.

    The stream is closed on the way out, whatever the way: after Ctrl-C that is what cancels a
    job ``generate`` started (``watch_job`` only stops watching).
    """
    view = ProgressView(out.stderr, enabled=not (out.quiet or out.json))
    collector = _stream.Collector()
    try:
        for event in events:
            out.event(event)
            view.update(event)
            if on_event is not None:
                on_event(event)
            if (collected := collector.add(event)) is not None:
                return collected
    finally:
        view.close()
        events.close()
    raise KilnError("stream ended without a result")


def write_artifact(client: AnyClient, artifact: Any, data: bytes | None, path: Path) -> Path:
    """Write an artifact's bytes in hand, or download them (verified either way)."""
    try:
        if data is not None:
            return write_atomically(path, data)
        return client.download(artifact, path)
    except OSError as error:
        raise LocalError(f"cannot write {path}: {error.strerror or error}") from error
