"""Which gateway replica runs a job: the session header, remembered per job id.

Behind the gateway several replicas of a service share the traffic; a running job lives on one
of them. Envoy's ``stateful_session`` filter names that replica in an ``x-kiln-session``
response header, and routes a request that carries the same header back to it. The clients
remember the value from a job's first response and send it on GetJob, WatchJob and CancelJob of
that job. Talking to a server directly there is no such header, and nothing is sent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

SESSION_HEADER = "x-kiln-session"
"""The gateway's session header: the response names the replica, a request sends it back."""

DEFAULT_CAPACITY = 1024
"""Jobs whose session a client remembers; the least recently used are forgotten first."""


def session_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The session header's value in a call's initial metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == SESSION_HEADER:
            return value.decode() if isinstance(value, bytes) else value
    return None


class JobSessions:
    """Job id → the gateway's session value, at most ``capacity`` of them (least recently used go).

    Thread-safe: a blocking client may be shared by threads.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._values: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> str | None:
        """The remembered session of ``job_id``, or None (not seen, or not through a gateway)."""
        with self._lock:
            value = self._values.get(job_id)
            if value is not None:
                self._values.move_to_end(job_id)
            return value

    def remember(self, job_id: str, value: str | None) -> None:
        """Remember ``value`` for ``job_id`` (None and empty values are ignored)."""
        if not job_id or not value:
            return
        with self._lock:
            self._values[job_id] = value
            self._values.move_to_end(job_id)
            while len(self._values) > self._capacity:
                self._values.popitem(last=False)

    def note(self, job_id: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Remember the session header of a response about ``job_id``, if it has one.

        The gateway sends a new value when the replica changed (the old one is gone and another
        answered from the shared store), so the latest answer wins.
        """
        self.remember(job_id, session_of(metadata))

    def metadata(self, job_id: str, base: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """``base`` plus the session header of ``job_id`` when one is known."""
        value = self.get(job_id)
        pairs = tuple(pair for pair in base if pair[0] != SESSION_HEADER)
        return (*pairs, (SESSION_HEADER, value)) if value is not None else tuple(base)

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
