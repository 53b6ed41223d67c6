"""The package's import graph, read from the source with `ast`: no cycles, no import of a higher layer.

Every import statement counts, wherever it is (module top, inside a function, under
TYPE_CHECKING): a lazy import is still a dependency. Layers as in the project's rules (lower
never imports higher; a module may import its own layer):

    config, tokenize -> data -> convert -> model -> evaluate, train.losses, train.step, train.baselines
      -> parallel, checkpoint, cache -> train.pipeline (and the rest of train/)
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "bld_scale"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Longest matching name wins ("bld_scale.train.step" before "bld_scale.train"); the package
# itself ("bld_scale", its __init__) matches only exactly: it re-exports convert and tokenize.
LAYERS = {
    "bld_scale.config": 0,
    "bld_scale.demo": 0,
    "bld_scale.tokenize": 0,
    "bld_scale.data": 1,
    "bld_scale.convert": 2,
    "bld_scale": 2,
    "bld_scale.model": 3,
    "bld_scale.evaluate": 4,
    "bld_scale.train.losses": 4,
    "bld_scale.train.step": 4,
    "bld_scale.train.baselines": 4,
    "bld_scale.parallel": 5,
    "bld_scale.checkpoint": 5,
    "bld_scale.cache": 5,
    "bld_scale.train": 6,
}

# Inside convert: the shared primitives, then the modes (neither imports the other), then the
# one module that chooses between them.
CONVERT_LAYERS = {
    "bld_scale.convert.byte_rows": 0,
    "bld_scale.convert.running_sums": 1,
    "bld_scale.convert.tree_forward": 1,
    "bld_scale.convert.triton_sums": 1,
    "bld_scale.convert.backends": 2,
    "bld_scale.convert.exact_contexts": 2,
    "bld_scale.convert.one_pass": 3,
    "bld_scale.convert.exact": 3,
    "bld_scale.convert.shard_plan": 1,
    "bld_scale.convert.shard_rows": 3,
    "bld_scale.convert.shard_exact": 4,
    "bld_scale.convert.sequence_parallel": 5,
    "bld_scale.convert.dispatch": 6,
    "bld_scale.convert": 7,
}


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[str]:
    """Absolute names of everything `module` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names += [f"{source}.{alias.name}" for alias in node.names] + [source]
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from pkg import sub` counts as `pkg.sub`)."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(module, path):
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            if name in modules:
                edges.add(name)
            elif name.rpartition(".")[0] not in modules:  # `from pkg import sub` adds pkg.sub too
                raise AssertionError(f"{module} imports {name}, which is not a module of {PACKAGE}")
        # `from pkg.mod import thing` lists pkg.mod.thing and pkg.mod: keep only real modules
        graph[module] = {m for m in edges if m != module}
    return graph


def layer_of(module: str, table: dict[str, int]) -> int | None:
    best = None
    for name, layer in table.items():
        if module == name or (name != PACKAGE and module.startswith(name + ".")):
            if best is None or len(name) > len(best[0]):
                best = (name, layer)
    return None if best is None else best[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    # known edges, so that a parser that finds nothing cannot pass the tests below
    assert "bld_scale.convert.running_sums" in graph["bld_scale.convert.exact"]
    assert "bld_scale.convert.exact" in graph["bld_scale.convert.dispatch"]
    assert "bld_scale.tokenize.token_bytes" in graph["bld_scale.data.batch"]
    assert "bld_scale.parallel.engines" in graph["bld_scale.train.pipeline"]  # a lazy import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if layer_of(m, LAYERS) is None]
    assert not missing, f"modules without a layer (add them to LAYERS in {__file__}): {missing}"


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    bad = [f"{m} (layer {layer_of(m, LAYERS)}) imports {t} (layer {layer_of(t, LAYERS)})"
           for m, targets in sorted(graph.items()) for t in sorted(targets)
           if layer_of(t, LAYERS) is not None and layer_of(m, LAYERS) is not None
           and layer_of(t, LAYERS) > layer_of(m, LAYERS)]
    assert not bad, "\n".join(bad)


def test_convert_modes_import_only_the_primitives():
    graph = import_graph()
    convert = {m: t for m, t in graph.items() if m == "bld_scale.convert" or m.startswith("bld_scale.convert.")}
    missing = [m for m in convert if m not in CONVERT_LAYERS]
    assert not missing, f"convert modules without a layer in CONVERT_LAYERS: {missing}"
    bad = [f"{m} imports {t}" for m, targets in sorted(convert.items()) for t in sorted(targets)
           if t in CONVERT_LAYERS and CONVERT_LAYERS[t] >= CONVERT_LAYERS[m] and t != m]
    assert not bad, "\n".join(bad)
