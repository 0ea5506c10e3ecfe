"""The code's layout holds: packages import one way only, no module imports itself back, nothing points at a
document outside the repository, cli.py stays thin."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "pipeline", "synthetic", "train", "eval", "experiments")
# what each package may import (besides itself), as its __init__ says
ALLOWED = {
    "core": set(),
    "pipeline": {"core"},
    "synthetic": {"core", "pipeline"},
    "train": {"core", "pipeline"},
    "eval": {"core", "pipeline", "train"},
    "experiments": {"core", "pipeline", "synthetic", "train", "eval"},
}


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for package in PACKAGES
        for p in (ROOT / package).glob("*.py")
    }


def imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def test_packages_import_one_way():
    bad = []
    for name, path in modules().items():
        package = name.split(".")[0]
        for target in imports(path):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                bad.append(f"{name} imports {target}")
    assert not bad


def test_no_import_cycle():
    mods = modules()
    graph = {name: {t for t in imports(path) if t in mods and t != name} for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            assert visit(name, []) is None


def test_nothing_points_outside_the_repository():
    files = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".md", ".toml", ".sh")
        and ".venv" not in p.parts
        and p != Path(__file__).resolve()
    ]
    outside = ("DESIGN section", "DESIGN.md", "../shared", "DESIGN 6")  # the old design document's names
    hits = [str(p.relative_to(ROOT)) for p in files if any(word in p.read_text() for word in outside)]
    assert not hits


def test_cli_is_thin_and_every_package_says_what_it_holds():
    assert len((ROOT / "cli.py").read_text().splitlines()) < 150
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "Imports" in doc, package
