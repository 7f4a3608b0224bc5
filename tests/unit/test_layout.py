"""The tree's shape: imports flow one way between the package's rooms, with no
circles, and the test tree's module names stay unique.

The rooms of ``smolvm_kernel`` and their levels (docs/architecture.md): a
module may import from its own room or from a room on a lower level, never
from one on its own level or above. Every import counts, also one inside a
function (a lazy import is still a dependency), but one under ``if
TYPE_CHECKING:`` (type hints only, never run).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
PACKAGE = TESTS.parent / "smolvm_kernel"

#: room -> level. A room is a folder of the package, or a module at its top.
LEVELS = {
    # the base everything may use
    "_version": 0, "errors": 0, "paths": 0, "timeline": 0,
    # guest images: recipes, the content-hashed cache, the builder
    "images": 1,
    # what one host keeps: registry, cgroups, network, audit, policy, admission client
    "host": 2,
    # every user-tunable value, checked against the instructor's policy
    "config": 3,
    # transports and framing to the guest
    "channel": 4,
    # VMM drivers
    "backends": 5,
    # the Sandbox API: one running VM, its start, pause, snapshots
    "vm": 6,
    # the relaying kernel, output policy, %smolvm lines, magics, panel, kernelspecs
    "jupyter": 7,
    # many students on one host; kernels on other hosts
    "classroom": 8, "remote": 8,
    # entry points (they may share helpers with each other)
    "cli": 9, "__main__": 9, "__init__": 9, "launch": 9, "gateway": 9,
}
ENTRY = 9


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "smolvm_kernel":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _known(module: str) -> bool:
    base = PACKAGE.parent / Path(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """The smolvm_kernel modules ``path`` imports (submodules resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    here = _module_of(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("smolvm_kernel"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("smolvm_kernel"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if _known(sub) else base)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_of(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_room_has_a_level() -> None:
    rooms = {_room(m) for m in _graph()}
    assert rooms - set(LEVELS) == set(), "a new room needs a level in LEVELS (and docs/architecture.md)"


def test_imports_never_run_to_a_room_on_the_same_level_or_above() -> None:
    bad = []
    for module, targets in sorted(_graph().items()):
        room = _room(module)
        for target in sorted(targets):
            other = _room(target)
            if other is None or other == room or other == "__init__" and target == "smolvm_kernel":
                continue
            if LEVELS[other] >= LEVELS[room] and not LEVELS[room] == LEVELS[other] == ENTRY:
                bad.append(f"{module} (level {LEVELS[room]}) imports {target} (level {LEVELS[other]})")
    assert bad == []


def test_no_import_circles() -> None:
    graph = {m: {t for t in ts if t != m and t != "smolvm_kernel"} for m, ts in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:          # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_no_module_imports_the_guests_code_but_its_wire_format() -> None:
    users = {m: {t for t in _imports_any(p) if t.startswith("smolvm_guest") and t != "smolvm_guest.wire"}
             for p in PACKAGE.rglob("*.py") for m in [_module_of(p)]}
    assert {m: t for m, t in users.items() if t} == {}


def _imports_any(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.update(f"{node.module}.{a.name}" if node.module == "smolvm_guest" else node.module
                       for a in node.names)
    return out


def test_test_module_basenames_are_unique() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_every_guest_module_imports() -> None:
    """Each module of the guest (which no unit test may otherwise import, such as
    the SSH bridge) finds every name it imports: a split that left one behind
    would otherwise show only in a VM."""
    import importlib

    guest = TESTS.parent / "guest"
    for path in sorted(guest.glob("*.py")):
        importlib.import_module(f"smolvm_guest.{path.stem}")


def test_every_module_named_in_a_string_exists() -> None:
    """Code run in another interpreter (``python -c "from smolvm_kernel... import
    kernelspec"``, ``-m smolvm_kernel...``) names modules in strings, which no
    import checks: after a move each such name must still resolve."""
    import importlib
    import re

    named = re.compile(r"from (smolvm_kernel(?:\.\w+)*) import (\w+)|-m (smolvm_kernel(?:\.\w+)*)")
    roots = [PACKAGE, TESTS.parent / "benchmarks", TESTS.parent / "scripts"]
    bad = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".py", "") or not path.is_file() or "__pycache__" in path.parts:
                continue
            text = path.read_text(errors="replace")
            for m in named.finditer(text):
                module, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), None)
                try:
                    mod = importlib.import_module(module)
                    if name is not None and not hasattr(mod, name):
                        importlib.import_module(f"{module}.{name}")
                except ImportError:
                    bad.append(f"{path.relative_to(TESTS.parent)}: {m.group(0)}")
    assert not bad, "names of modules that do not exist:\n" + "\n".join(bad)


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by name: a new room left out of that
    list would be missing from an installed copy (a classroom's venv, a wheel)."""
    import tomllib

    listed = set(tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {_module_of(init) for init in PACKAGE.rglob("__init__.py") if "__pycache__" not in init.parts}
    assert folders - listed == set()
