"""``kiln jobs list|get|watch|cancel``, and ``--detach`` of ``kiln img2img`` and ``kiln mesh``.

    kiln img2img photo.jpg -p "a fox" --detach      # prints the job id, exits; the job runs on
    kiln jobs watch JOB_ID -o fox.png              # progress, then the result written
    kiln jobs get JOB_ID
    kiln jobs cancel JOB_ID
    kiln jobs list --state running --state queued

A job id does not say which service ran it: without ``--service`` a command asks img2img, then
mesh. Through a gateway with several replicas, ``--session`` (printed by ``--detach``) routes the
calls to the replica that runs the job; a finished job is readable from any of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Generator, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from kiln.common.v1 import job_pb2
from kiln_client._cli_io import SERVICES, AnyClient, LocalError, Output, connect, follow, write_artifact
from kiln_client._jobs import TERMINAL_STATES, state_name
from kiln_client._progress import stage_name
from kiln_client.errors import KilnError, error_from_status

EXIT_OK = 0
#: When a job is not found by one service, the next one is asked (`--service` not given).
_TRY_NEXT_SERVICE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED})


def detach(client: AnyClient, events: Generator[Message], out: Output, args: argparse.Namespace) -> int:
    """Read a submitted job's stream up to ``accepted``, print its id and leave it running.

    The request asked for ``DISCONNECT_POLICY_DETACH``, so closing the stream leaves the job be.
    stdout gets the job id alone (``JOB=$(kiln img2img ... --detach)``); stderr the command that
    follows it, with the gateway's session when there is one.
    """
    job_id = ""
    with contextlib.closing(events):
        for event in events:
            out.event(event)
            if event.WhichOneof("event") == "accepted":
                job_id = event.accepted.job_id  # type: ignore[attr-defined]
                break
    if not job_id:
        raise KilnError("the stream ended before the job was accepted")
    session = client.sessions.get(job_id)
    if out.json:
        out.json_line({"detached": {"jobId": job_id, "service": args.command, "session": session or ""}})
    else:
        print(job_id, file=out.stdout, flush=True)
    follow_up = f"kiln jobs watch {job_id} --service {args.command} --target {args.target}"
    out.say(f"job {job_id} runs on; follow it with: {follow_up}" + (f" --session {session}" if session else ""))
    return EXIT_OK


@contextlib.contextmanager
def _job_client(args: argparse.Namespace) -> Iterator[tuple[str, AnyClient, Any]]:
    """The service that knows ``args.job_id`` (``--service``, else the first that does), its client, the job."""
    names = [args.service] if args.service else list(SERVICES)
    not_here: KilnError | None = None  # why the job is not there, should no service have it
    for name in names:
        with connect(args, SERVICES[name][1]) as client:
            client.sessions.remember(args.job_id, args.session)
            try:
                job = client.get_job(args.job_id)
            except KilnError as error:
                if len(names) == 1 or error.code not in _TRY_NEXT_SERVICE:
                    raise
                # "Not found" says more than "this target does not serve that service".
                if not_here is None or error.code is grpc.StatusCode.NOT_FOUND:
                    not_here = error
                continue
            yield name, client, job
            return
    assert not_here is not None
    raise not_here


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _detail(job: Any) -> str:
    """What a job is doing or what came of it, in a few words."""
    status = job.status
    if status.state == job_pb2.JOB_STATE_QUEUED:
        return f"position {status.queue_position}"
    if status.state == job_pb2.JOB_STATE_RUNNING and status.HasField("progress"):
        progress = status.progress
        step = f" {progress.step}/{progress.total_steps}" if progress.total_steps else ""
        return f"{stage_name(progress.stage)}{step} {progress.fraction:.0%}"
    if status.HasField("error"):
        return str(status.error.message)
    if job.HasField("result") and job.result.artifacts:
        artifact = job.result.artifacts[0]
        return f"{artifact.id} ({artifact.size_bytes} bytes)"
    return ""


def _job_json(service: str, job: Message) -> dict[str, Any]:
    return {"service": service, **json_format.MessageToDict(job)}


def _list(args: argparse.Namespace, out: Output) -> int:
    names = list(SERVICES) if args.service == "all" else [args.service]
    shown = 0
    for name in names:
        with connect(args, SERVICES[name][1]) as client:
            try:
                jobs = client.list_jobs(states=args.state or (), page_size=args.page_size)
                for job in jobs:
                    if args.limit and shown >= args.limit:
                        break
                    shown += 1
                    if out.json:
                        out.json_line(_job_json(name, job))
                    else:
                        status = job.status
                        print(
                            f"{status.job_id}  {name:<7}  {state_name(status.state):<9}  "
                            f"{_time(status.create_time)}  {_detail(job)}".rstrip(),
                            file=out.stdout,
                        )
            except KilnError as error:
                if args.service == "all" and error.code is grpc.StatusCode.UNIMPLEMENTED:
                    out.say(f"{name}: not served at {args.target}")
                    continue
                raise
    if not shown:
        out.say("no jobs")
    return EXIT_OK


def _describe(service: str, job: Any, out: Output) -> None:
    """Print a job: as JSON with --json, else a few aligned lines."""
    if out.json:
        out.json_line(_job_json(service, job))
        return
    status = job.status
    request = json_format.MessageToDict(job.request)
    lines = [
        f"job {status.job_id} ({service})",
        f"  state     {state_name(status.state)}" + (f": {_detail(job)}" if _detail(job) else ""),
        f"  created   {_time(status.create_time)}, started {_time(status.start_time)}, ended {_time(status.end_time)}",
        f"  request   {json.dumps(request, separators=(', ', ': '))}",
    ]
    if status.HasField("error"):
        lines.append(f"  error     {error_from_status(status.error)}")
    for artifact in job.result.artifacts if job.HasField("result") else ():
        lines.append(f"  artifact  {artifact.id} {artifact.media_type} {artifact.size_bytes} bytes {artifact.uri}")
    if status.expire_time.seconds:
        lines.append(f"  kept to   {_time(status.expire_time)}")
    print("\n".join(lines), file=out.stdout, flush=True)


def _get(args: argparse.Namespace, out: Output) -> int:
    with _job_client(args) as (service, _, job):
        _describe(service, job, out)
    return EXIT_OK


def _cancel(args: argparse.Namespace, out: Output) -> int:
    with _job_client(args) as (service, client, job):
        ended = job.status.state in TERMINAL_STATES
        if not ended:
            job = client.cancel_job(args.job_id)  # idempotent: sending it for an ended job changes nothing
            ended = job.status.state != job_pb2.JOB_STATE_CANCELLED  # it ended on its own meanwhile
    if out.json:
        out.json_line(_job_json(service, job))
    else:
        verdict = f"had already ended: {state_name(job.status.state)}" if ended else "cancelled"
        print(f"job {args.job_id} {verdict}", file=out.stdout, flush=True)
    return EXIT_OK


def _watch(args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    with _job_client(args) as (_, client, _job):
        collected = follow(client.watch_job(args.job_id, after=args.after), out)
        artifact = collected.artifact
        path = Path(args.output) if args.output else Path(f"{args.job_id}{Path(artifact.id).suffix}")
        if not path.parent.is_dir():
            raise LocalError(f"cannot write {path}: folder {path.parent} does not exist")
        # A job watched long after it ended may have had its retained bytes compacted away: the
        # artifact is then downloaded from storage, like any result delivered by reference.
        write_artifact(client, artifact, collected.data, path)
    out.say(f"wrote {path} ({artifact.size_bytes} bytes, {time.monotonic() - started:.1f} s)")
    return EXIT_OK


def add_jobs_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kiln jobs`` and its subcommands to the ``kiln`` parser's ``commands``."""
    jobs = commands.add_parser("jobs", help="list, look up, watch and cancel jobs by id")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="recent jobs, newest first")
    listing.add_argument("--service", choices=["all", *SERVICES], default="all")
    listing.add_argument(
        "--state",
        action="append",
        type=str.lower,
        choices=[state_name(value) for value in job_pb2.JobState.values() if value],
        help="only jobs in this state (repeat for several)",
    )
    listing.add_argument("--limit", type=int, default=20, help="show at most N jobs (0: all; default %(default)s)")
    listing.add_argument("--page-size", type=int, default=0, help="jobs per ListJobs call (default the server's)")
    listing.set_defaults(run=_list, interrupted="interrupted")

    for name, run, text, interrupted in (
        ("get", _get, "a job's state, request and result", "interrupted"),
        ("watch", _watch, "follow a job to its end and write its result", "stopped watching; the job runs on"),
        ("cancel", _cancel, "cancel a queued or running job", "interrupted"),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("job_id", metavar="JOB_ID", help="the id `kiln img2img --detach` printed")
        action.add_argument("--service", choices=list(SERVICES), help="the job's service (default: ask each)")
        action.add_argument(
            "--session", help="the gateway session printed with the job id (reaches the replica that runs it)"
        )
        action.set_defaults(run=run, interrupted=interrupted)
    watch = actions.choices["watch"]
    watch.add_argument("--after", type=int, default=0, help="skip the events up to this sequence number")
    watch.add_argument("-o", "--output", help="where to write the result (default <job id>.<its suffix>)")
