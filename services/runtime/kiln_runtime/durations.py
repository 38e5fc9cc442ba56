"""Durations as people write them in settings: seconds, or Ollama-style strings ("5m", "1h30m").

Ollama's `keep_alive` takes Go's `time.ParseDuration` syntax (a sequence of number+unit pairs,
units ns, us, ms, s, m, h) or a number of seconds, and a negative value means "forever".
pydantic parses timedeltas from numbers and ISO 8601 ("PT5M") but not "5m", and a library for
this one grammar would weigh more than the regular expression below.
"""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_EXAMPLES = 'a number of seconds or a duration such as "30s", "5m", "1h" or "1h30m"'


def parse_keep_alive(value: object) -> float | None:
    """Turn a keep-alive setting into seconds; None means "stay loaded".

    Args:
        value: None or "" (unset: stay loaded), a number of seconds, or a string: a number of
            seconds ("300") or Go/Ollama duration syntax ("30s", "5m", "1h30m", "1.5h").
            Negative values mean "stay loaded", as in Ollama.

    Returns:
        The duration in seconds (0 = unload after each job), or None to stay loaded.

    Raises:
        ValueError: The value is not a duration; the message shows what is accepted.
    """
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int; "true" is not a duration
        raise ValueError(f"keep_alive must be {_EXAMPLES}, not {value!r}")
    if isinstance(value, int | float):
        return _checked(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"keep_alive must be {_EXAMPLES}, not {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    try:
        return _checked(float(text), value)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    position, total = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(body):
        raise ValueError(f"keep_alive must be {_EXAMPLES}; {value!r} is not one")
    return _checked(sign * total, value)


def _checked(seconds: float, original: object) -> float | None:
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"keep_alive must be a finite duration, not {original!r}")
    return None if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way the setting accepts them ("0s", "90s", "5m", "1h30m")."""
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
