"""Job ids come from python-ulid and stay what stored job folders already are.

Ids written before the library (26 upper-case Crockford digits, 48-bit time then 80 random
bits) must still validate and list, and a library id must read back through the library.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from ulid import ULID

from kiln_runtime.storage import InvalidArtifactId, LocalArtifactStore, new_job_id, validate_job_id

# An id as the hand-written generator the library replaced wrote them (from 2024-06-12).
OLD_STYLE = "01J06G5N1RX8YQ2W7TMK3B9VDE"


def test_ids_are_canonical_ulids_that_carry_the_time() -> None:
    before = time.time()
    job_id = new_job_id()
    after = time.time()
    parsed = ULID.from_str(job_id)
    assert str(parsed) == job_id, "the canonical (upper-case) spelling, as folders are named"
    assert before - 0.001 <= parsed.timestamp <= after + 0.001


def test_ids_made_in_one_millisecond_do_not_give_each_other_away() -> None:
    # The library's default generator counts up within a millisecond; ours draws fresh bits.
    values = sorted(int(ULID.from_str(new_job_id())) for _ in range(2000))
    assert len(set(values)) == len(values)
    assert all(b - a != 1 for a, b in itertools.pairwise(values))


def test_ids_stored_before_the_library_still_validate_and_list(tmp_path: Path) -> None:
    assert validate_job_id(OLD_STYLE) == OLD_STYLE
    assert ULID.from_str(OLD_STYLE).datetime.year == 2024
    store = LocalArtifactStore(tmp_path)
    store.put(OLD_STYLE, "image.png", b"png", media_type="image/png")
    new = new_job_id()
    store.put(new, "image.png", b"png", media_type="image/png")
    assert sorted(store.job_ids()) == [OLD_STYLE, new], "old and new folders sort by creation time"


@pytest.mark.parametrize(
    "job_id",
    [
        OLD_STYLE.lower(),  # the library parses it, but it would name a second folder
        "8" + OLD_STYLE[1:],  # more than 128 bits: no ULID starts above 7
        "Z" * 26,
    ],
)
def test_spellings_the_library_or_no_ulid_allows_are_refused(job_id: str) -> None:
    with pytest.raises(InvalidArtifactId):
        validate_job_id(job_id)
