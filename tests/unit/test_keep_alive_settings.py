"""`keep_alive`: seconds or Ollama-style durations, from the environment, with readable errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln_img2img.config import Img2ImgSettings
from kiln_runtime.durations import format_duration, parse_keep_alive
from kiln_runtime.settings import RuntimeSettings


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        (90, 90.0),
        (2.5, 2.5),
        ("300", 300.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("2m30s", 150.0),
        (" 5m ", 300.0),
        ("-1", None),  # Ollama: negative = stay loaded
        ("-5m", None),
        (-1, None),
    ],
)
def test_parse_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["forever", "5 minutes", "5x", "m", "1h30", "h1", "1e400", "nan", True, [5]])
def test_nonsense_is_rejected_with_the_accepted_forms(value: object) -> None:
    with pytest.raises(ValidationError) as raised:
        RuntimeSettings(keep_alive=value)
    message = str(raised.value)
    assert "keep_alive" in message
    assert "finite" in message or '"5m"' in message


def test_unset_means_stay_loaded() -> None:
    assert RuntimeSettings().keep_alive is None


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_IMG2IMG__RUNTIME__KEEP_ALIVE", "5m")
    assert Img2ImgSettings(_env_file=None).img2img.runtime.keep_alive == 300.0  # type: ignore[call-arg]
    monkeypatch.setenv("KILN_IMG2IMG__RUNTIME__KEEP_ALIVE", "0")
    assert Img2ImgSettings(_env_file=None).img2img.runtime.keep_alive == 0.0  # type: ignore[call-arg]
    monkeypatch.setenv("KILN_IMG2IMG__RUNTIME__KEEP_ALIVE", "soon")
    with pytest.raises(ValidationError, match="keep_alive"):
        Img2ImgSettings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (45, "45s"), (90, "90s"), (300, "5m"), (5400, "1h30m")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_keep_alive(text) == seconds
