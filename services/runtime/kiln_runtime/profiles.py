"""Named presets chosen by `KILN_PROFILE`: they change defaults, never what an operator set.

`laptop` is for one machine whose GPU shares the system memory (a 16 GB Apple Silicon Mac):
both servers load their model on the first request instead of at startup, unload it after
five idle minutes (the default Ollama users know), and run one job at a time; img2img slices
attention on every device. SD1.5 (about 4.3 GB in float32) and TripoSR (about 1.7 GB) then
occupy memory only while they are in use. `tiny` is applied by `make up` (deploy/local_stack.py):
it points both servers at generated test models.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from kiln_runtime.settings import ServiceSettings

LAPTOP_KEEP_ALIVE_S = 300.0
LAPTOP_RUNTIME: Mapping[str, object] = {
    "keep_alive": LAPTOP_KEEP_ALIVE_S,
    "load_on_startup": False,
    "max_concurrency": 1,
}


def fill_unset(model: BaseModel, values: Mapping[str, object]) -> None:
    """Set each field of `model` that the settings sources did not set explicitly.

    pydantic records the fields a model was given (`model_fields_set`); one that was not
    given holds its default, which a profile may replace.
    """
    for name, value in values.items():
        if name not in model.model_fields_set:
            setattr(model, name, value)


def apply_laptop_profile(section: ServiceSettings) -> None:
    """The `laptop` profile's runtime defaults for one model server's section."""
    fill_unset(section.runtime, LAPTOP_RUNTIME)
