"""The package's shape, read from its imports (ast): no import cycle, and no module importing from a later layer."""

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tune_xray"
# after the trials, each a stage over the experiment record; `predict` and `train` are command lines of their own
STEPS = ["costs", "repeat", "ensemble", "cv", "external", "report", "predict", "train"]

# lowest first; a module may import from its own layer and those before it. A subpackage is one unit.
LAYERS = [
    ["record", "driver"],  # the shared names, a trial's status rule, the record's words; the driver's state
    ["config", "credentials", "metrics", "explain", "figures", "request", "addresses"],  # none later (request: a
    # search's choices; addresses: where the MLflow UI shows it)
    ["cluster", "data", "augment", "models", "space", "weights", "command"],  # Ray clusters, data, views, backbones
    # (and their pretrained files), search-space files, the files a study draws, the search's command line
    ["phases"],  # SSL and supervised training
    ["trial", "serving"],  # one Tune trial; a fine-tuned ensemble as a model
    ["pyfunc_model"],  # that model as MLflow's models-from-code
    ["experiment", "asha", "searcher"],  # the experiment directory; ASHA's rules; the Optuna searcher
    ["tracking"],  # MLflow: a trial's runs
    ["registry"],  # MLflow: the search's models registered
    ["summary", "selection"],  # what a search ended with; ensemble selection (the search's and the folds')
    ["rerun"],  # finalists run again beside the search: what the repeats and the cross-validation share
    STEPS,  # the steps after the search, siblings: none imports another
    ["pipeline"],  # search → costs → repeats → ensemble → cross-validation → external record → report
    ["search"],  # the command line
]


def _modules() -> dict[str, Path]:
    """`tune_xray.data.cache` → its file (a package: its __init__.py)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports (anywhere in it: a deferred import inside a function counts)."""
    modules, graph = _modules(), {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "tune_xray"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "tune_xray":
                    module = node.module
                else:
                    continue
                # `from . import scan` names a module; `from .config import merge` a name in one
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _unit(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_no_import_cycle():
    graph = import_graph()
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' → '.join(err.args[1])}")


def test_no_import_from_a_later_layer():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    graph = import_graph()
    units = {_unit(m) for m in graph} - {"tune_xray"}
    assert units == set(layer), f"without a layer: {sorted(units - set(layer))}; gone: {sorted(set(layer) - units)}"
    upward = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
              if a != "tune_xray" and layer[_unit(b)] > layer[_unit(a)]]
    assert not upward, "an import from a later layer: " + "; ".join(sorted(upward))


def test_the_steps_after_the_search_are_siblings():
    """Cost re-measurement, repeats, the ensemble, cross-validation, the external record and the report read the
    experiment and import no other step (what two share lives below them: selection, rerun, the record)."""
    graph = import_graph()
    crossing = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                      if _unit(a) in STEPS and _unit(b) in STEPS and _unit(a) != _unit(b))
    assert not crossing, "; ".join(crossing)


def test_no_private_module_of_a_dependency_is_imported():
    """A dependency's private modules (`timm.models._manipulate`) move between releases without notice: the package
    imports what its dependencies export."""
    private = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            private += [f"{name} imports {m}" for m in modules
                        if m.split(".")[0] != "tune_xray" and any(p[:1] == "_" != p[1:2] for p in m.split("."))]
    assert not private, "; ".join(private)


def test_the_reports_rooms_stand_apart_and_stay_small():
    """`report/`: each room (study and data, search, model, explanation, record, cost and CV) makes its numbers and
    draws its section from its own module and the shared `common`; only the package itself (report_data, render)
    puts the rooms together. No module over 400 lines."""
    graph, package = import_graph(), "tune_xray.report"
    rooms = {m for m in graph if m.startswith(package + ".") and m != f"{package}.__main__"}
    assert {m.rsplit(".", 1)[1] for m in rooms} == {"common", "study", "search", "model", "explanation", "record",
                                                     "cost"}
    crossing = {room: sorted(t for t in graph[room] if t.startswith(package) and t != f"{package}.common")
                for room in rooms}
    assert not any(crossing.values()), crossing
    sizes = {path.name: len(path.read_text().splitlines()) for path in (PACKAGE / "report").glob("*.py")}
    assert max(sizes.values()) <= 400, sizes
