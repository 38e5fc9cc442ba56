"""Where one job's event stream stands, across the calls that carry it.

A job outlives its connection: when a ``Generate`` stream breaks after ``accepted`` the job runs
on (for the server's grace period, 60 s by default), and ``WatchJob(after_sequence)`` picks the
stream up where it broke. `JobCursor` holds what that needs, for both client kinds: the job id,
the last ``sequence`` passed to the caller (a replayed event at or below it is a duplicate and is
dropped; a jump past the next one is a gap and an error), and how long the stream has been
broken (resuming stops after `RESUME_WINDOW_S`, well inside the server's grace period, so the
caller hears of a lost job while it still could be watched by hand).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from kiln_client.errors import KilnError

RESUME_WINDOW_S = 45.0
"""How long a broken stream is resumed, from the break: less than the servers' default
``jobs.disconnect_grace_s`` (60 s), after which an unwatched job is cancelled."""
RESUME_MAX_DELAY_S = 2.0
"""Longest wait between resume attempts: a restarting gateway is back within seconds."""
_RESUME_BACKOFF_S = 0.2

#: Codes of a stream broken on the way rather than ended by the server, when the status has no
#: ErrorInfo reason (a Kiln server's own statuses have one): a dropped connection (UNAVAILABLE),
#: a reset stream (CANCELLED, INTERNAL, UNKNOWN for RST_STREAM codes), a gateway restarting
#: (ABORTED). Not DEADLINE_EXCEEDED (the caller's own deadline), nor RESOURCE_EXHAUSTED or
#: UNIMPLEMENTED, which a retry would meet again.
_BROKEN_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
    }
)
_TERMINAL = frozenset({"result", "error"})


class JobCursor:
    """One job's position in its event stream: which events the caller has, and whether to resume.

    Args:
        job_id: The job, when known before the first event (``watch_job``); empty for a
            ``Generate`` stream, which learns it from ``accepted``.
        after: The last sequence the caller already has (``watch_job(after=...)``).
        window_s: How long a broken stream is resumed; 0 never resumes.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        job_id: str = "",
        *,
        after: int = 0,
        window_s: float = RESUME_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.last_sequence = after
        self.window_s = window_s
        self.ended = False
        #: False once an event without a sequence arrived (a server from before jobs): such a
        #: stream cannot be resumed, and its events are passed on as they come.
        self.sequenced = True
        #: Events the stream skipped over, right before the terminal event (see `take`).
        self.skipped = 0
        #: Resume attempts made (each a new WatchJob call).
        self.resumes = 0
        self._clock = clock
        self._broken_since: float | None = None
        self._attempt = 0

    @property
    def started(self) -> bool:
        """Whether the job exists for this stream: its id is known (``accepted``, or given)."""
        return bool(self.job_id)

    def take(self, event: Message) -> bool:
        """Account for one received event; True to pass it on, False for a duplicate.

        Raises:
            KilnError: DATA_LOSS: events are missing before this one (a gap in the replay).
        """
        kind = event.WhichOneof("event")
        if kind == "accepted" and not self.job_id:
            self.job_id = getattr(event, "accepted").job_id  # noqa: B009 (generic event type)
        sequence: int = getattr(event, "sequence")  # noqa: B009
        if sequence == 0:
            self.sequenced = False
        elif sequence <= self.last_sequence:
            return False  # a replay overlapping what the caller has: the same event again
        elif sequence > self.last_sequence + 1:
            # Events may be missing only right before the terminal one: a finished job's log is
            # compacted (its chunk events dropped), or a replica that does not hold the job answers
            # from its stored record (accepted and the outcome, nothing between). The outcome is
            # what the caller needs, and missing bytes are fetched from storage; any other hole
            # means events were lost.
            if kind not in _TERMINAL:
                raise KilnError(
                    f"job {self.job_id}: events {self.last_sequence + 1} to {sequence - 1} are missing "
                    f"before event {sequence} ({kind})",
                    code=grpc.StatusCode.DATA_LOSS,
                )
            self.skipped += sequence - self.last_sequence - 1
        if sequence:
            self.last_sequence = sequence
        self._broken_since = None  # progress: a later break gets a full window again
        self._attempt = 0
        self.ended = self.ended or kind in _TERMINAL
        return True

    def resumable(self, error: KilnError) -> bool:
        """Whether a failed call of this job is a broken stream that WatchJob can pick up."""
        if not (self.started and self.sequenced and not self.ended and self.window_s > 0):
            return False
        # A Kiln server's own status carries an ErrorInfo reason and is its verdict on the job
        # (REPLICA_LOST: the replica that ran it is gone); a transport's or proxy's has none. The
        # one reason that still means "try again" is a replica draining (SHUTTING_DOWN).
        if error.code is grpc.StatusCode.UNAVAILABLE:
            return error.reason in ("", "SHUTTING_DOWN")
        return error.code in _BROKEN_CODES and not error.reason

    def resume_delay(self, error: KilnError) -> float | None:
        """Seconds to wait before resuming after ``error``; None when the stream is lost.

        Lost: ``error`` is not a broken stream (`resumable`), or the stream has been broken
        for `window_s` without an event.
        """
        if not self.resumable(error):
            return None
        now = self._clock()
        if self._broken_since is None:
            self._broken_since = now
        waited = now - self._broken_since
        if waited >= self.window_s:
            return None
        delay = _RESUME_BACKOFF_S * 2.0**self._attempt
        if error.retry_delay_s is not None:
            delay = max(delay, error.retry_delay_s)
        self._attempt += 1
        self.resumes += 1
        return min(delay, RESUME_MAX_DELAY_S, self.window_s - waited)
