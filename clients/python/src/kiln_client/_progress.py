"""The command line's view of a running job: a progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

from typing import Any, TextIO

from google.protobuf import duration_pb2
from google.protobuf.message import Message
from tqdm import tqdm

from kiln.common.v1 import job_pb2

_BAR_UNITS = 1000  # the bar counts thousandths of the server's `fraction`


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def stage_name(stage: int) -> str:
    """``STAGE_REMOVE_BACKGROUND`` → ``remove background``."""
    return job_pb2.Stage.Name(stage).removeprefix("STAGE_").replace("_", " ").lower()


def describe(event: Message) -> str | None:
    """One short line for a lifecycle event (accepted, queued, progress); None for others."""
    kind = event.WhichOneof("event")
    value: Any = getattr(event, kind) if kind else None
    if kind == "accepted":
        return f"accepted job {value.job_id}"
    if kind == "queued":
        eta = f", about {_seconds(value.eta):.0f} s" if value.HasField("eta") else ""
        return f"queued at position {value.position}{eta}"
    if kind == "progress":
        step = f" {value.step}/{value.total_steps}" if value.total_steps else ""
        eta = f", eta {_seconds(value.eta):.1f} s" if value.HasField("eta") else ""
        return f"{stage_name(value.stage)}{step} {value.fraction:.0%}{eta}"
    return None


class ProgressView:
    """Shows a stream's progress on ``stream`` (stderr): a tqdm bar on a terminal, lines elsewhere.

    Args:
        stream: Where to draw; normally ``sys.stderr``, so stdout stays for ``--json`` output.
        enabled: False shows nothing (``--quiet``, ``--json``).
    """

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self._stream = stream
        self._enabled = enabled
        self._bar: tqdm[Any] | None = None
        if enabled and stream.isatty():
            self._bar = tqdm(
                total=_BAR_UNITS,
                file=stream,
                bar_format="{desc} |{bar}| {percentage:3.0f}% {postfix}",
                leave=False,
            )

    def update(self, event: Message) -> None:
        """Reflect one event."""
        if not self._enabled:
            return
        line = describe(event)
        if line is None:
            return
        if self._bar is None:
            print(line, file=self._stream, flush=True)
            return
        kind = event.WhichOneof("event")
        if kind == "progress":
            progress = event.progress  # type: ignore[attr-defined]
            self._bar.set_description_str(stage_name(progress.stage))
            step = f"step {progress.step}/{progress.total_steps}" if progress.total_steps else ""
            eta = f"eta {_seconds(progress.eta):.1f}s" if progress.HasField("eta") else ""
            self._bar.set_postfix_str(" ".join(filter(None, (step, eta))), refresh=False)
            self._bar.n = round(progress.fraction * _BAR_UNITS)
            self._bar.refresh()
        else:
            self._bar.set_description_str(line)
            self._bar.refresh()

    def close(self) -> None:
        """Remove the bar (the final summary line is printed by the caller)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
