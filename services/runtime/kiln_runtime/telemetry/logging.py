"""Process-wide logging: JSON lines for machines, a plain format for people.

Request, job and RPC identifiers travel in context variables that the gRPC interceptor and the
job runner set; every record logged while they are set carries them, so no call site has to
pass them along. Call `configure_logging` once, early in `__main__`.
"""

from __future__ import annotations

import contextvars
import importlib
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_job_id", default=None)
rpc_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_rpc", default=None)

# The key under which call sites pass structured fields: logger.info("...", extra={"kiln": {...}}).
# One namespaced attribute, rather than arbitrary `extra` keys, because `logging` refuses keys
# that collide with LogRecord attributes ("message", "args", ...) and because it tells us exactly
# which attributes are ours to serialize.
EXTRA_KEY = "kiln"

_CORE_KEYS = frozenset({"ts", "level", "logger", "message", "exception", "stack"})


def _context_fields() -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, var in (("request_id", request_id_var), ("job_id", job_id_var), ("rpc", rpc_var)):
        value = var.get()
        if value is not None:
            fields[key] = value
    return fields


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, EXTRA_KEY, None)
    return dict(extra) if isinstance(extra, dict) else {}


def _utc_iso(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line.

    Keys: `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`; `request_id`,
    `job_id` and `rpc` when their context variables are set; the fields of
    `extra={"kiln": {...}}` at top level (they may override the context identifiers, e.g. a job
    logged from outside its request, but never the four core keys); `exception` and `stack` as
    text when present. Values JSON cannot encode are written with `str()`.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context_fields())
        entry.update({k: v for k, v in _extra_fields(record).items() if k not in _CORE_KEYS})
        # Cached on the record like logging.Formatter does, so several handlers format it once.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines: UTC time, level, logger, message, then context and extra fields.

    Example: `2025-01-01T12:00:00.000Z INFO kiln.jobs: job started [request_id=r1 job_id=j1] steps=8`.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_iso(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        context = _context_fields()
        extra = _extra_fields(record)
        for key in ("request_id", "job_id", "rpc"):
            if key in extra:
                context[key] = str(extra.pop(key))
        if context:
            line += " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]"
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure_logging(level: str, fmt: Literal["json", "text"]) -> None:
    """Configure the root logger for this process; calling it again reconfigures, never stacks.

    Every handler already on the root logger is removed (a library's `basicConfig`, an earlier
    call) and one `StreamHandler` on stderr is installed, so each record is written exactly once.

    Args:
        level: Root level name: "DEBUG", "INFO", "WARNING" or "ERROR" (case-insensitive).
        fmt: "json" for one JSON object per line, "text" for people.

    Raises:
        ValueError: `level` or `fmt` is not a known name.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        # A StreamHandler's close() leaves the stream open; this only releases handler resources.
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)


def redact(value: str) -> str:
    """Hide a secret for logs: "****" plus its last four characters if it is long enough.

    Short secrets are fully masked because four characters of an eight-character token reveal
    half of it.

    Args:
        value: The secret (token, key, password).

    Returns:
        "****" + the last 4 characters when `value` has more than 8 characters, else "****".
    """
    return "****" + value[-4:] if len(value) > 8 else "****"


def adopt_library_logging() -> None:
    """Route diffusers' and transformers' logs through our handler and silence their progress bars.

    Both libraries install their own stderr handler and stop propagation, and draw tqdm bars
    while loading; a server's log must stay one JSON object per line. Call this before the
    libraries' heavier modules are imported, since some messages are emitted at import time.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers"):
        try:
            library = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
