"""The one helper every part of the rendered Envoy config uses for typed extension configs."""

from __future__ import annotations

from typing import Any


def typed(type_name: str, **fields: Any) -> dict[str, Any]:
    """A `typed_config` value: `@type` from the proto's full name, then its fields."""
    return {"@type": f"type.googleapis.com/{type_name}", **fields}
