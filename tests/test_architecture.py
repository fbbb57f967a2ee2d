"""Boundaries the layout promises, checked on the source: docs and schema agree, imports stay in their rooms."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from geostore.store import schema

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path, *, typing_only: bool = True) -> set[str]:
    """Modules a file imports, at module level or inside functions; `typing_only=False` leaves out the
    `if TYPE_CHECKING:` blocks (annotations, never run). `from a import b` counts `a` and `a.b`."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not typing_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit_node(stmt)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        visit(node)

    visit(ast.parse(path.read_text()))
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_readme_documents_the_schema():
    """The README's store-layout table lists the format-2 parameters of the modular-addition family's 1-layer
    transformer (as its parameter table gives them), every analysis array, the metrics, the split and the
    probe; its groups are the family's."""
    import numpy as np

    from geostore.family.modular_addition import MODULAR_ADDITION, model_config

    readme = (ROOT / "README.md").read_text()
    flat = " ".join(readme.split())  # list items wrap across lines
    rows = dict(re.findall(r"^\| `(\w+)` \| `\(([^)]*)\)`", readme, re.M))
    model = MODULAR_ADDITION.model(model_config(7))
    table = model.table
    assert f"(format version {schema.FORMAT_VERSION})" in readme
    for parameter in table.parameters:
        assert rows.get(parameter.name) == ", ".join((schema.EPOCH_DIM, *parameter.dims)), parameter.name
    for name, dims in schema.ANALYSIS_ARRAYS.items():
        assert rows.get(name) == ", ".join(dims), name
    for name in schema.METRICS:
        assert f"`{name}`" in readme
    _, split_dims = MODULAR_ADDITION.split(model, np.arange(3))
    assert f"`{schema.SPLIT}` | `({', '.join(split_dims)})`" in readme
    assert f"`{schema.PROBE}` | `({', '.join(schema.PROBE_DIMS)})`" in readme
    for group, names in table.groups.items():
        if group != "all":
            assert f"`{group}` ({', '.join(f'`{n}`' for n in names)})" in flat, group
    for attribute in ("geostore", "family", "model_config", "parameters", "task", "sources"):
        assert f"`{attribute}` (" in flat, attribute


def test_library_never_imports_qt_and_viewer_reads_only_the_public_api():
    for path in modules("geostore"):
        qt = {m for m in imports_of(path) if m.split(".")[0] in ("PySide6", "pyqtgraph")}
        assert not qt, f"{path} imports {qt}"
    for path in modules("viewer"):
        private = {m for m in imports_of(path) if m.startswith(("geostore.store", "geostore.sources", "zarr"))}
        assert not private, f"{path} reads the store past the public API: {private}"


def test_only_the_store_package_touches_zarr_and_only_sources_know_file_formats():
    for path in modules("geostore"):
        imported = {m.split(".")[0] for m in imports_of(path)}
        if "store" not in path.relative_to(ROOT / "geostore").parts:
            assert "zarr" not in imported, path
    for path in modules("geostore"):
        if "sources" in path.parts:
            continue
        text = path.read_text()
        assert "torch.load(" not in text and "safe_open(" not in text, path


def test_the_import_graph_follows_the_layout_table():
    """No cycles between `geostore/store/` modules (imports that run, at any depth of a function); the store
    imports of the family layer only `family.base` (the parameter table: no model building, no torch); the
    numerical `analysis/` modules import no store and no family module but the fast-loss lookup."""
    store = {module_name(p): p for p in modules("geostore/store")}
    graph = {name: {m for m in imports_of(path, typing_only=False) if m in store and m != name}
             for name, path in store.items()}
    for name in graph:  # depth-first search for a path back to `name`
        seen, stack = set(), list(graph[name])
        while stack:
            current = stack.pop()
            assert current != name, f"import cycle through {name} in geostore/store/"
            if current not in seen:
                seen.add(current)
                stack.extend(graph[current])
    for name, path in store.items():
        family = {m for m in imports_of(path, typing_only=False) if m.startswith("geostore.family")}
        builders = {m for m in family if not m.startswith("geostore.family.base")}
        assert not builders, f"{name} imports {builders}: building models belongs to the family layer"
    for path in modules("geostore/analysis"):  # a model brings its own fast loss (`Model.fast_loss`)
        found = {m for m in imports_of(path, typing_only=False) if m.startswith(("geostore.store", "geostore.family"))}
        assert not found, f"{path} imports {found}: the numerical layer knows models only through the protocol"
