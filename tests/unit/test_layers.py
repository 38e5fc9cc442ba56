"""Layering of the service packages: only the bootstrap imports the server.

The bootstrap (`kiln_runtime.bootstrap` and `.server`, and each service's `server.py` and
`__main__.py`) wires everything together; a service, servicer, provider or runtime module that
imported it back would make a cycle and tie the lower layers to the gRPC server. Checked on the
source (every import, also those inside functions), so nothing has to be imported to find them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kiln_runtime": ROOT / "services/runtime/kiln_runtime",
    "kiln_img2img": ROOT / "services/img2img/kiln_img2img",
    "kiln_mesh": ROOT / "services/mesh/kiln_mesh",
}
BOOTSTRAP = frozenset(
    {
        "kiln_runtime.bootstrap",
        "kiln_runtime.server",
        "kiln_img2img.server",
        "kiln_img2img.__main__",
        "kiln_mesh.server",
        "kiln_mesh.__main__",
    }
)


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module `source` imports, anywhere in it; `from a import b` counts as both a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def bootstrap_imports(source: str, module: str, *, is_package: bool = False) -> set[str]:
    return imported_modules(source, module, is_package=is_package) & BOOTSTRAP


def test_no_lower_layer_imports_the_bootstrap() -> None:
    offenders: dict[str, set[str]] = {}
    checked = 0
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            module = module_name(package, folder, path)
            if module in BOOTSTRAP:
                continue
            checked += 1
            found = bootstrap_imports(path.read_text(), module, is_package=path.name == "__init__.py")
            if found:
                offenders[module] = found
    assert checked > 50  # the walk really found the packages
    assert offenders == {}, "only the bootstrap may import these (see kiln_runtime/bootstrap.py)"


@pytest.mark.parametrize(
    "source",
    [
        "from kiln_runtime.server import Runtime",
        "import kiln_runtime.server",
        "from kiln_runtime import server",
        "def later():\n    from kiln_runtime.bootstrap import ServiceSpec",
        "from .server import KilnServer",
    ],
)
def test_the_check_sees_every_form_of_import(source: str) -> None:
    assert bootstrap_imports(source, "kiln_runtime.service") != set()


def test_the_check_lets_lower_modules_through() -> None:
    source = "from kiln_runtime.runtime import Runtime\nfrom kiln_runtime import service_names, servers\n"
    assert bootstrap_imports(source, "kiln_runtime.service") == set()
