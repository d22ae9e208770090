"""The package's layers, read from its own imports: imports run down only, capability packages do not import
each other, and no module imports itself back through others (a circle).

Each module belongs to one layer (the longest entry of :data:`LAYERS` that names it or a package above it);
a module may import modules of its own layer and of the layers below it, never above. Two layers are made of
peers that must not import each other: the capabilities (guest, console, storage, net, monitoring, and later
the ones the next issues add) and the two faces (mcp, web); they meet in the layer above them (vm.manager for
the capabilities, app for the faces).

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "qemu_mcp_http"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Bottom to top. Names are modules or packages relative to the package; a longer name wins over a shorter one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "config", "version", "observability", "cpu")),
    # What a VM definition and a console are made of, with no I/O: the capabilities' pure parsers and builders.
    # They sit below the VM core because the definition holds their values (ports, network, cloud-init).
    (
        "values",
        (
            "net.ports",
            "guest.cloudinit",
            "guest.sha512crypt",
            "console.text",
            "console.keys",
            "console.links",
            "monitoring.parse",
        ),
    ),
    ("hosts", ("hosts",)),
    ("fleet", ("fleet",)),
    ("access", ("access",)),
    ("vm core", ("vm",)),
    ("capabilities", ("guest", "console", "storage", "net", "monitoring")),
    (
        "vm operations",
        ("vm.manager", "vm.create", "vm.power", "vm.delete", "vm.modify", "vm.cleanup", "migrate", "supervise"),
    ),
    ("faces", ("mcp", "web")),
    ("entry", ("__init__", "__main__", "app", "cli", "check")),
)
#: Layers whose packages are peers: a module there imports its own package's modules, not another package's.
PEERS = {"capabilities", "faces"}


def all_modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to it (``vm.spec``; a package by its name)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = all_modules()


def layer_of(module: str) -> tuple[int, str, str]:
    """``(rank, layer, the entry that placed it)``."""
    best: tuple[int, int, str, str] | None = None
    for rank, (layer, names) in enumerate(LAYERS):
        for name in names:
            placed = module == name or module.startswith(name + ".")
            if placed and (best is None or len(name) > best[0]):
                best = (len(name), rank, layer, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it (or its package) to LAYERS")
    return best[1], best[2], best[3]


def imports_of(module: str) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` for every import of a module of this package by ``module``."""
    path = MODULES[module]
    return imports_in(module, path.read_text(), is_package=path.name == "__init__.py")


def imports_in(module: str, source: str, *, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """The imports of this package's modules in ``source``, the text of ``module``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if module == "__init__":
        package = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield node.lineno, _known(alias.name.removeprefix(PACKAGE).lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module.removeprefix(PACKAGE).lstrip(".")
            else:
                continue
            for alias in node.names:
                # ``from . import x`` names a module when there is one of that name, else an attribute.
                candidate = f"{target}.{alias.name}" if target else alias.name
                yield node.lineno, (candidate if candidate in MODULES else _known(target))


def _known(module: str) -> str:
    """The module itself, or the package ``__init__`` for the package root."""
    return module or "__init__"


def test_every_module_is_placed() -> None:
    """A module nobody placed would slip past the rule: each must fall under an entry of LAYERS."""
    for module in MODULES:
        layer_of(module)


def wrong_imports(module: str, imports: Iterator[tuple[int, str]]) -> list[str]:
    """What breaks the rule among ``imports`` of ``module``, one line each."""
    rank, layer, entry = layer_of(module)
    own_package = entry.split(".")[0]
    wrong = []
    for line, target in imports:
        target_rank, target_layer, target_entry = layer_of(target)
        if target_rank > rank:
            wrong.append(f"line {line}: {target} ({target_layer}) is above {module} ({layer})")
        elif target_rank == rank and layer in PEERS and target_entry.split(".")[0] != own_package:
            wrong.append(f"line {line}: {target} is a peer package of {module} ({layer}); meet a layer above")
    return wrong


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down(module: str) -> None:
    """No import reaches a higher layer, nor a peer package of the capabilities or of the faces."""
    wrong = wrong_imports(module, imports_of(module))
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    """No module imports itself back through others (Tarjan's strongly connected components)."""
    graph = {module: sorted({target for _, target in imports_of(module) if target != module}) for module in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_the_rule_catches_what_it_must() -> None:
    """The walker reads relative and absolute imports at any depth, inside functions too, and reports an upward
    import, a peer capability, and a peer face; an import of a lower layer passes."""
    source = (
        "from ..mcp.server import build_mcp\n"
        "def f():\n    from qemu_mcp_http.console import serial\n"
        "from ..vm.spec import VMDefinition\n"
    )
    wrong = wrong_imports("storage.example", imports_in("storage.example", source))
    assert [w.split(":")[0] for w in wrong] == ["line 1", "line 3"], wrong
    assert "above" in wrong[0] and "peer package" in wrong[1]
    assert wrong_imports("web.example", imports_in("web.example", "from ..mcp import context\n"))
