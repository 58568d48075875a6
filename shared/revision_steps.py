"""What of the repository's own code a revision runs beyond its file, for its pin
(shared/revision_pins.py): the steps it imports from a module of the repository
(shared/migration_steps.py: `index_parked_inbox_rows`, ...), and, within each step's module, every
module-level function, class or constant a step names, and those name, and so on
(`create_index_concurrently`, `_drop_if_invalid`, `_CREATE_NOTIFY_FUNCTION`): each by its dotted
name, with its source text (from its first decorator to its last line, line ends as `\\n`).

Found by reading the files (`ast`), nothing imported: a name taken from the module
(`from shared.migration_steps import index_parked_inbox_rows`) or read off it
(`migration_steps.index_parked_inbox_rows`, `shared.migration_steps.index_parked_inbox_rows`).
What a step imports itself (SQLAlchemy, Alembic, shared.db's `limit_lifted`) is how it runs, not
what it makes, and is not followed."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import NamedTuple


def steps_run_by(revision: Path, root: Path) -> dict[str, str]:
    """The source text of each definition of the repository (under `root`) that the revision file
    `revision` runs, by its dotted name (`shared.migration_steps.index_parked_inbox_rows`)."""
    tree = ast.parse(revision.read_text(encoding="utf-8"), filename=str(revision))
    steps: dict[str, str] = {}
    for module, name in sorted(_names_taken_from_modules(tree)):
        path = _module_file(module, root)
        if path is not None:
            definitions = _module_definitions(path.read_text(encoding="utf-8"))
            for reached in _closure(definitions, name):
                steps[f"{module}.{reached}"] = definitions[reached].source
    return steps


def _names_taken_from_modules(tree: ast.Module) -> set[tuple[str, str]]:
    """Each (module, name) the revision's code takes a name from: imported from the module, or
    read as an attribute of it (a module imported whole, or imported from its package)."""
    taken: set[tuple[str, str]] = set()
    modules_by_alias: dict[str, str] = {}  # a dotted name in the revision -> the module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                taken.add((node.module, alias.name))
                modules_by_alias[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                # (`import a.b` binds `a`; its names are read as `a.b.name`.)
                modules_by_alias[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node.value)
            if dotted in modules_by_alias:
                taken.add((modules_by_alias[dotted], node.attr))
    return taken


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for the expression `a.b.c` made of names alone; None for any other."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head is not None else None
    return None


def _module_file(module: str, root: Path) -> Path | None:
    """The file of `module` under `root`, when it is one of the repository's; None for another's
    (alembic, sqlalchemy) or for a name that is no module (a step taken from its module)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


class _Definition(NamedTuple):
    """A module-level definition: its source text, and the names its code reads."""

    source: str
    names: frozenset[str]


@functools.lru_cache(maxsize=32)
def _module_definitions(text: str) -> dict[str, _Definition]:
    """Each module-level function, class and assigned name of the module whose text is `text`."""
    lines = text.splitlines(keepends=True)
    definitions = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound = [node.name]
        elif isinstance(node, ast.Assign):
            bound = [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound = [node.target.id]
        else:
            continue
        first = min([node.lineno] + [decorator.lineno
                                     for decorator in getattr(node, "decorator_list", [])])
        source = "".join(lines[first - 1:node.end_lineno])
        names = frozenset(name.id for name in ast.walk(node) if isinstance(name, ast.Name))
        for name in bound:
            definitions[name] = _Definition(source, names)
    return definitions


def _closure(definitions: dict[str, _Definition], name: str) -> list[str]:
    """`name` (when the module defines it) and every module-level definition it reaches by name,
    sorted."""
    reached: set[str] = set()
    waiting = [name]
    while waiting:
        current = waiting.pop()
        if current in reached or current not in definitions:
            continue
        reached.add(current)
        waiting.extend(definitions[current].names - reached)
    return sorted(reached)
