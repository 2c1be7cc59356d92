"""The code's layout: no import cycle, no upward import, no module importing main.py, modest file and function
sizes, few late imports (each with its reason), and no comparison against a dataset's name outside the registry."""
from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"tests", "data", "logs", "runs", "venv", ".venv", "__pycache__"}
DATASET_NAMES = {"mitstates", "fashion200k", "fashionIQ", "css3d", "cirr", "synthetic", "triplets"}

# Layers, top to bottom: a module imports only modules of its own layer or of layers below it. A package is placed
# by its top-level name; every module must be placed.
LAYERS = (
    ("entry points", {"main", "retrieve", "benchmark", "benchmarks", "sweep", "report", "reporting", "demo", "index_bench", "tools"}),
    ("wiring", {"factory", "config", "training", "sgd_step", "cuda_graph", "interrupts", "selection", "runlog",
                "cirr_submission", "console", "hparams_session", "retrieve_queries", "retrieve_outputs"}),
    ("evaluation", {"test_retrieval", "encoding", "protocols", "visualize"}),
    ("data and models", {"datasets", "retrieval_datasets", "synthetic", "image_cache", "gallery",
                         "img_text_composition_models", "text_model", "torch_functions", "checkpoint",
                         "checkpoint_settings", "checksums", "published", "gallery_index", "feature_store", "ann"}),
    ("foundations", {"errors", "seeding", "distributed", "progress", "provenance"}),
)


def _sources() -> dict[str, tuple[str, str]]:
    """{module name: (path relative to the root, source)} of the project's modules outside tests/."""
    found = {}
    for folder, subs, files in os.walk(ROOT):
        subs[:] = [s for s in subs if not s.startswith(".") and s not in SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)
                name = rel[:-3].replace(os.sep, ".")
                name = name[: -len(".__init__")] if name.endswith(".__init__") else name
                found[name] = (rel, open(os.path.join(folder, f), encoding="utf-8").read())
    return found


SOURCES = _sources()


def _resolve(target: str) -> str | None:
    while target and target not in SOURCES:
        target = target.rpartition(".")[0]
    return target or None


def _imports(name: str, tree: ast.AST) -> set[str]:
    out = set()
    is_pkg = SOURCES[name][0].endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_pkg and node.level == 1 else parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]
        else:
            continue
        out |= {t for t in map(_resolve, targets) if t and t != name}
    return out


GRAPH = {name: _imports(name, ast.parse(src)) for name, (_, src) in SOURCES.items()}


def _layer(name: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if name in members or name.split(".")[0] in members:
            return i
    raise AssertionError(f"module {name} is in no layer: add it to LAYERS in tests/test_layout.py")


def test_every_module_is_in_a_layer():
    assert all(_layer(name) >= 0 for name in GRAPH)


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(v, path):
        state[v] = 1
        for w in sorted(GRAPH[v]):
            if state.get(w) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(w):] + [w]))
            if w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(GRAPH):
        if v not in state:
            visit(v, [v])


def test_no_module_imports_main_and_no_upward_import():
    assert [m for m, ts in GRAPH.items() if "main" in ts] == []
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, ts in GRAPH.items() for t in ts if _layer(t) < _layer(m)]
    assert upward == []


def test_sizes():
    assert [f"{rel} {src.count(chr(10))}" for rel, src in SOURCES.values() if src.count("\n") > 600] == []
    long = [f"{rel}:{node.name} {node.end_lineno - node.lineno + 1}"
            for rel, src in SOURCES.values() for node in ast.walk(ast.parse(src))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "parser" not in node.name
            and node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def test_late_imports_of_own_modules_are_few_and_explained():
    own = {n.split(".")[0] for n in SOURCES}
    late = []
    for rel, src in SOURCES.values():
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else node.module or ""]
                else:
                    continue
                if any(n == "." or n.split(".")[0] in own for n in names):
                    said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    late.append((f"{rel}:{node.lineno}", said))
    late = sorted(set(late))
    assert len(late) <= 8, late
    assert [where for where, said in late if not said] == [], "a late import needs a comment saying why"


def test_dataset_names_are_compared_only_in_the_registry():
    where = defaultdict(int)
    for rel, src in SOURCES.values():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                     for o in node.ops):
                values = [node.left, *node.comparators]
                values = [e for v in values for e in (v.elts if isinstance(v, (ast.Tuple, ast.List, ast.Set)) else [v])]
                if any(isinstance(v, ast.Constant) and v.value in DATASET_NAMES for v in values):
                    where[rel] += 1
    assert sum(where.values()) <= 2 and all("registry" in rel for rel in where), dict(where)


def test_every_module_is_named_in_the_readme_code_map():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index("## How the code is laid out")
    section = readme[start: readme.index("\n## ", start + 3)]
    missing = [rel for rel, _ in SOURCES.values()
               if not rel.endswith("__init__.py") and f"`{rel.replace(os.sep, '/')}`" not in section]
    assert missing == []
