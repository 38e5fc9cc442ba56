"""What every vendor HTTP provider shares: one TLS context, cancellable calls, short excerpts.

Vendor providers run blocking in a worker thread, each call on a private asyncio loop with
httpx. `guarded` races the request against the job's cancel flag and an overall deadline:
cancelling the request task is what makes httpx close the connection, so the vendor sees the
client leave instead of finishing work nobody will read.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Coroutine
from typing import Any, TypeVar

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


async def guarded(work: Coroutine[Any, Any, T], ctx: RunContext, *, timeout_s: float | None = None) -> T:
    """Await `work` as a task, checking for cancellation and the deadline every `POLL_S`."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    task = asyncio.create_task(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            ctx.check_cancelled()
            if deadline is not None and loop.time() >= deadline:
                raise CallTimedOut
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let httpx close the socket before the loop goes away
        if not task.cancelled():
            task.exception()  # mark it retrieved; the outcome was handled or superseded


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Vendor text for a human message: whitespace collapsed, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
