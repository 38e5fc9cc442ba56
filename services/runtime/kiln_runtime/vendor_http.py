"""What every vendor HTTP provider shares: one client per provider, cancellable calls, short excerpts.

Vendor providers run blocking in a worker thread. Each provider sends its calls to a
`VendorClient`: one httpx client on one event-loop thread, so jobs reuse keep-alive connections
(and TLS sessions) instead of each opening its own. `guarded` cuts a request off when the job is
cancelled or an overall deadline passes: cutting it off is what makes httpx close the
connection, so the vendor sees the client leave instead of finishing work nobody will read.
"""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import httpx

from kiln_runtime.provider import RunContext

POLL_S = 0.05  # how quickly a cancelled job lets go of the connection
EXCERPT_CHARS = 200

T = TypeVar("T")


class CallTimedOut(Exception):
    """The whole call outlived its timeout (httpx's own timeouts bound each phase only)."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle costs ~0.1 s, and sharing is safe."""
    return httpx.create_ssl_context()


class VendorClient:
    """One httpx client on one event-loop thread, shared by every job of a provider.

    `run` is called from worker threads and blocks until its coroutine finishes on the shared
    loop; the coroutine runs in a copy of the caller's context, so its log lines keep the request
    and job ids. The thread and client start with the first call and end in `close`; a call
    after `close` starts them again, because the model manager closes an idle provider and later
    loads the same object again.
    """

    def __init__(self, name: str, *, timeout_s: float) -> None:
        self._name = name
        self._timeout = httpx.Timeout(timeout_s)
        self._lock = threading.Lock()  # start, submit and close never interleave
        self._session: _Session | None = None
        self._finalizer: weakref.finalize[[], VendorClient] | None = None

    def run(self, call: Callable[[httpx.AsyncClient], Coroutine[Any, Any, T]]) -> T:
        """Run `call(client)` on the shared loop and return its result (or raise its error)."""
        with self._lock:
            if self._session is None:
                self._session = _Session(self._name, self._timeout)
                # A backstop for a provider dropped without `close`: its sockets still get closed.
                self._finalizer = weakref.finalize(self, self._session.stop)
                self._finalizer.atexit = False
            # Submitted under the lock: a concurrent `close` then sees the task and cancels it,
            # instead of stopping the loop with the call never scheduled and its caller waiting.
            future = asyncio.run_coroutine_threadsafe(call(self._session.client), self._session.loop)
        return future.result()

    def close(self) -> None:
        """Cancel calls still running, close the client's connections and stop the thread."""
        with self._lock:
            session, self._session = self._session, None
            if session is not None and self._finalizer is not None and self._finalizer.detach():
                session.stop()
                session.thread.join()


class _Session:
    """An event loop on its own thread and the client that lives on it."""

    def __init__(self, name: str, timeout: httpx.Timeout) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(timeout=timeout, verify=tls_context())
        # A daemon: a provider nobody closed must not keep the process alive at exit.
        self.thread = threading.Thread(target=self._serve, name=f"kiln-{name}-http", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self) -> None:
        """Cancel the calls still running, close the client, then stop the loop (without waiting)."""
        done = asyncio.run_coroutine_threadsafe(self._shut_down(), self.loop)
        done.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))

    async def _shut_down(self) -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        await self.client.aclose()


async def guarded(work: Coroutine[Any, Any, T], ctx: RunContext, *, timeout_s: float | None = None) -> T:
    """Await `work`, cutting it off when the job is cancelled or `timeout_s` has passed.

    Cut off through an anyio cancel scope, not `Task.cancel`: httpcore shields its connection
    cleanup from anyio cancellation only, and a cleanup cut short leaves the connection in the
    shared pool open and marked busy, so the vendor never sees the client leave.

    Raises:
        Cancelled: The job was cancelled.
        CallTimedOut: `timeout_s` passed first.
    """
    with anyio.CancelScope(deadline=math.inf if timeout_s is None else anyio.current_time() + timeout_s) as scope:
        watcher = asyncio.create_task(_cancel_with(ctx, scope))
        try:
            return await work
        finally:
            watcher.cancel()
    ctx.check_cancelled()
    raise CallTimedOut


async def _cancel_with(ctx: RunContext, scope: anyio.CancelScope) -> None:
    """Cancel `scope` once the job is cancelled (a flag set from another thread, hence the polling)."""
    while not ctx.cancelled:  # noqa: ASYNC110 - a threading.Event, not an asyncio one
        await asyncio.sleep(POLL_S)
    scope.cancel()


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Vendor text for a human message: whitespace collapsed, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
