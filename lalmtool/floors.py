"""The package's floors, computed from its imports: a module that imports no other module of
the package stands on floor 0, any other one floor above the highest module it imports at
load time (imports inside functions, which load on use, are left out). ``python3 -m
lalmtool.floors`` prints them; docs/architecture.md holds that output, and a test keeps the
two the same.
"""
from __future__ import annotations

import ast
import os
import sys

PACKAGE = os.path.dirname(os.path.abspath(__file__))


def modules() -> dict[str, str]:
    """Module name (``models.whisper``) → its file, for every module of the package."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")) and d != "testing")
        for f in sorted(files):
            if f.endswith(".py") and f != "__main__.py":
                rel = os.path.relpath(os.path.join(folder, f), PACKAGE)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__").removesuffix("__init__") or "__init__"] = \
                    os.path.join(folder, f)
    return found


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports at load time (module level)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name.split(".")[:-1] if not path.endswith("__init__.py") else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package[: len(package) - node.level + 1]
        stem = [*base, *(node.module.split(".") if node.module else [])]
        for alias in node.names:
            for target in (".".join([*stem, alias.name]), ".".join(stem)):
                if target in known and target != name:
                    found.add(target)
                    break
    return found


def floors() -> dict[str, int]:
    """Module → its floor."""
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    floor: dict[str, int] = {}

    def of(m: str, path: tuple = ()) -> int:
        if m in path:
            raise ValueError(f"an import cycle: {' -> '.join([*path, m])}")
        if m not in floor:
            floor[m] = 1 + max((of(d, (*path, m)) for d in graph[m]), default=-1)
        return floor[m]

    for m in graph:
        of(m)
    return floor


def diagram(width: int = 92) -> str:
    """The floors, top floor first, one line (wrapped) per floor."""
    by_floor: dict[int, list[str]] = {}
    for m, f in floors().items():
        if m != "__init__":
            by_floor.setdefault(f, []).append(m)
    lines = []
    for f in sorted(by_floor, reverse=True):
        line, head = f"floor {f}:", f"floor {f}:"
        for m in sorted(by_floor[f]):
            if len(line) + 1 + len(m) > width:
                lines.append(line)
                line = " " * len(head)
            line += " " + m
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(diagram() + "\n")
