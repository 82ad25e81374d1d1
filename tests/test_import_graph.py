"""No import cycles among microvmm's modules (issue 16): the graph of every
`import microvmm...` / `from microvmm... import` in the package, built with
ast (nothing is imported), has no cycle. Imports under `if TYPE_CHECKING:`
are left out (they never run); deferred imports inside functions count: a
cycle through them still ties the modules together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "microvmm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The microvmm modules `path` imports (a package import counts as its __init__)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def target(module: str) -> str | None:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(filter(None, (target(alias.name) for alias in child.names)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    hit = full if full in modules else target(base)
                    if hit:
                        found.add(hit)
            visit(child)
    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dependency in sorted(graph.get(module, ())):
            # a package's __init__ importing its own submodules is no cycle
            # in the sense that matters here (they load in order)
            if module.startswith(dependency + ".") or dependency.startswith(module + "."):
                continue
            if state.get(dependency) == 1:
                return stack[stack.index(dependency):] + [dependency]
            if dependency not in state:
                cycle = visit(dependency)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "microvmm.vmm" in graph["microvmm.cli"]  # a deferred import inside a function
    assert "microvmm.run.outcome" in graph["microvmm.vmm"]
    assert "microvmm.virtio_console.backends" in graph["microvmm.virtio_console.device"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_microvmm_is_in_an_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_of_microvmm_imports():
    """Each module imports on its own: a moved module that an import still
    names by its old place (e.g. a relative `from .osthread import`) fails
    here rather than in whatever test first needs it."""
    import importlib
    failed = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "guestbuild/guest" in path.as_posix() or path.name == "__main__.py":
            continue
        name = _module_name(path)
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 (every failure is reported)
            failed[name] = repr(err)
    assert not failed, failed
