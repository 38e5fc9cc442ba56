"""The repository stands on its own: no tracked file points at notes or folders outside it.

A clone is all a user has. A comment that sends the reader to a notes folder next to the
repository, or a path of the machine the code was written on, is a dead end for everyone else:
such facts belong, in words, where they are used or under `docs/`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A notes folder beside the repository, or a development machine's home or work folder. The
#: pieces are joined here so that this file does not itself contain what it looks for (other
#: checks scan the tracked files for the same text). Container paths are the project's own:
#: the images' home `/home/kiln`, `/etc/kiln`.
_NOTES = "shared" + "/" + "notes"
_SIBLING = ".." + "/" + "shared"
_MACHINE = ("/" + "work", "/" + "Users")
FOREIGN = re.compile(
    rf"{re.escape(_SIBLING)}\b|\b{re.escape(_NOTES)}\b|(?:{'|'.join(map(re.escape, _MACHINE))})/\w"
    r"|/home/(?!kiln\b)\w"
)
#: Files that hold other projects' text verbatim (the lock's URLs and hashes).
SKIPPED = {"uv.lock", "package-lock.json"}


def _tracked_text_files() -> list[Path]:
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    )
    files = []
    for name in listed:
        if not name or Path(name).name in SKIPPED:
            continue
        path = ROOT / name
        if path.is_file():
            files.append(path)
    return files


def test_no_tracked_file_refers_outside_the_repository() -> None:
    found = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary (images, the descriptor set)
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if FOREIGN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "files refer to places outside the repository:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_is_for() -> None:
    home = "/" + "home/alice/x"
    for line in (f"see {_SIBLING}/envoy.md", f"spec in {_NOTES}/x.md", f"{_MACHINE[0]}/main/gateway", home):
        assert FOREIGN.search(line), line
    for line in ("WORKDIR /home/kiln", "/etc/kiln/auth", "the shared store", "teamwork/notes"):
        assert not FOREIGN.search(line), line
