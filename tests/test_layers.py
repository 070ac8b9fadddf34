"""The import rule: each layer of blockfs imports only from the layers below it.

From the top down: ``cli`` (the command), ``daemon`` (the life of a mount), ``fs`` (the FUSE
operations) and ``fuseloop`` (the FUSE request loop that calls them), ``control`` (the virtual files), ``jobs``, ``export``, ``info``, ``mapping`` and
``imagespec``, ``nodes``, and at the bottom ``config``, ``values`` and ``errors``, which
any layer may use. Every import counts,
also those inside functions and under ``TYPE_CHECKING``: a circle that only type checkers see is
still a circle in the design. Only ``fs.py``, ``fuseloop.py`` and ``daemon.py`` may import
pyfuse3.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "blockfs"

#: layer of each top-level name under blockfs (higher may import lower, never the reverse)
LAYERS = {
    "errors": 0,
    "values": 0,
    "config": 0,
    "nodes": 1,
    "imagespec": 2,
    "export": 2,
    "info": 2,
    "mapping": 2,
    "jobs": 3,
    "control": 4,
    "fs": 5,
    "fuseloop": 5,
    "daemon": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": 0,  # the package face: its version, nothing else
}
PYFUSE3_ALLOWED = {"blockfs.fs", "blockfs.fuseloop", "blockfs.daemon"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> list[str]:
    """Every module ``path`` imports, absolute, wherever the import statement stands."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.append(mod)
            # ``from blockfs import fs`` imports the module blockfs.fs
            if mod == "blockfs":
                found.extend(
                    f"blockfs.{alias.name}"
                    for alias in node.names
                    if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                )
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "blockfs":
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[top]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_name_has_a_layer() -> None:
    tops = {_module_name(p).split(".")[1] for p in MODULES if _module_name(p) != "blockfs"}
    assert tops <= set(LAYERS), f"give these a layer: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    me = _module_name(path)
    my_layer = _layer(me)
    assert my_layer is not None
    up = []
    for mod in _imports(path):
        if mod == "pyfuse3" or mod.startswith("pyfuse3."):
            if me not in PYFUSE3_ALLOWED:
                up.append(f"{mod} (only fs.py and daemon.py talk to FUSE)")
            continue
        layer = _layer(mod)
        if layer is not None and layer > my_layer:
            up.append(f"{mod} (layer {layer} > {my_layer})")
    assert not up, f"{me} imports upward: {', '.join(up)}"


def test_jobs_never_import_the_mount() -> None:
    """The job seam: a job sees the mount only through the interface defined in jobs/."""
    for path in (PACKAGE / "jobs").rglob("*.py"):
        for mod in _imports(path):
            for banned in ("blockfs.fs", "blockfs.control", "blockfs.daemon", "blockfs.cli"):
                assert mod != banned and not mod.startswith(banned + "."), (
                    f"{_module_name(path)} imports {mod}"
                )


def test_the_checker_sees_hidden_and_relative_imports() -> None:
    """An upward import inside a function, or spelled relatively, is still seen."""
    base = PACKAGE / "nodes" / "base.py"
    src = "def f():\n    from blockfs.daemon import Daemon\nfrom ..control import tree\n"
    assert {"blockfs.daemon", "blockfs.control"} <= set(_imports(base, src))
    assert _layer("blockfs.daemon") > _layer("blockfs.nodes.base")  # type: ignore[operator]
