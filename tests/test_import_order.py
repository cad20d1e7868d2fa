"""No module imports one above it: the floors of ARCHITECTURE.md "Import order" hold."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "wsda_jax")


def read_floors(text: str) -> dict[str, int]:
    """`| N | `mod`, `pkg.*` |` rows of the "Import order" table -> {pattern: floor}."""
    section = text.split("## Import order", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for floor, modules in re.findall(r"^\| (\d+) \| (.+) \|$", section, flags=re.MULTILINE):
        for pattern in re.findall(r"`([\w.*]+)`", modules):
            floors[pattern] = int(floor)
    return floors


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    """The floor of a module (without the `wsda_jax.` prefix): its own row, else the row
    of its nearest enclosing `pkg.*`."""
    if module in floors:
        return floors[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 0, -1):
        pattern = ".".join(parts[:end]) + ".*"
        if pattern in floors:
            return floors[pattern]
    return floors.get(parts[0] + ".*") if len(parts) == 1 else None


def package_modules() -> dict[str, str]:
    """{module name without `wsda_jax.`: file} for every module of the package."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:
                modules[".".join(parts)] = path
    return modules


def imported_modules(path: str, known: set[str]) -> set[str]:
    """The package modules that a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            if not name.startswith("wsda_jax."):
                continue
            name = name[len("wsda_jax.") :]
            # `from wsda_jax.data import pipeline` names a module; `from wsda_jax.x import f`
            # a function of module x: keep the longest known module.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def floors():
    with open(os.path.join(ROOT, "ARCHITECTURE.md")) as f:
        return read_floors(f.read())


def test_every_module_has_a_floor(floors):
    missing = [m for m in sorted(package_modules()) if floor_of(m, floors) is None]
    assert not missing, f"modules without a floor in ARCHITECTURE.md 'Import order': {missing}"


def test_no_module_imports_one_above_it(floors):
    modules = package_modules()
    upward = []
    for module, path in sorted(modules.items()):
        own = floor_of(module, floors)
        for imported in sorted(imported_modules(path, set(modules))):
            if imported == module or module.startswith(imported + "."):
                continue  # A package's own __init__ (e.g. data.builders for its modules).
            if floor_of(imported, floors) > own:
                upward.append(
                    f"{module} (floor {own}) imports {imported} "
                    f"(floor {floor_of(imported, floors)})"
                )
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(floors, tmp_path):
    """The walk finds function-level imports and the floors rank them (a self-check)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from wsda_jax import train\n    return train\n")
    assert imported_modules(str(module), set(package_modules())) == {"train"}
    assert floor_of("train", floors) > floor_of("losses", floors)
    assert floor_of("tools.browse", floors) > floor_of("data.pipeline", floors)
