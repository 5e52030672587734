"""The package's import contract, read from the source (no import is executed).

The packages of ``malora_dist`` stand in layers, from the process runtime at the bottom to the
commands at the top (docs/ARCHITECTURE.md, "The package in layers"). A module may import its own
package and the packages of lower layers, never a higher one and never a package beside it in the
same layer; inside a package the modules import each other without circles. Imports sit at the top
of the file; one inside a function is allowed only for an optional dependency (the reason is named
in OPTIONAL below) or inside ``try`` / ``if TYPE_CHECKING``, so no deferred import hides a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "malora_dist"

# Bottom to top. Packages in one tuple are independent of each other.
LAYERS = (
    ("runtime",),  # device, backend, launch environment, process groups, logging
    ("config",),  # every config section's dataclass and the loader
    ("models",),  # the frozen base and its tensor-parallel form
    ("adapters",),  # the layer's parts, the variants, the fused kernels
    ("parallel",),  # gradient reduction, expert placement, sharded adapter files
    ("data",),  # records → prompts → tokens → packed, mixed batches
    ("train",),  # the trainer, its loop, checkpoints
    ("inference", "peft_method"),  # a trained adapter at a layout, decoding; the mixtures as a PEFT method
    ("evaluation",),  # scoring held-out tasks; lm-eval's model type
    ("export",),  # checkpoints → PEFT-format adapter directories with model cards
    ("analysis",),  # what the experts learned, routing by task, parameter counts
    ("plan", "sweep"),  # planning a run at scale; grids of runs
    ("commands",),  # argument parsing only: one module per console command
)
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}

# Imported inside the function that needs them, because they are optional installs.
OPTIONAL = {
    "matplotlib": "the plots (pip install 'malora_dist[plots]'); everything else runs without it",
    "peft": "the PEFT method (pip install 'malora_dist[peft]')",
    "lm_eval": "lm-evaluation-harness (pip install 'malora_dist[eval]')",
    "pynvml": "GPU telemetry, on machines with an NVIDIA driver",
    "torch.utils.tensorboard": "train.tensorboard: true only (needs the tensorboard package)",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, node, whether it is deferred: inside a function and not guarded)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def placement(node) -> bool:
        in_function = False
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.Try) or (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
                return False
            in_function |= isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        return in_function

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node, placement(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (ruff's TID252 forbids them)"
            names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            found += [(name, node, placement(node)) for name in names or [node.module]]
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent)) if path.is_relative_to(PACKAGE.parent) else str(path)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def test_every_package_has_a_layer():
    packages = {_package(name) for name in MODULES} - {""}
    assert packages <= set(LAYER_OF), f"packages with no layer in LAYERS: {sorted(packages - set(LAYER_OF))}"
    loose = sorted(name for name in MODULES if name.count(".") == 1 and MODULES[name].name != "__init__.py"
                   and _package(name) not in LAYER_OF)
    assert not loose, f"modules at the package root (put each in the package of its layer): {loose}"


def test_no_import_reaches_up_or_sideways():
    wrong = []
    for name, path in MODULES.items():
        here = _package(name)
        for target, node, _ in _imports(path):
            there = _package(target) if target.startswith("malora_dist.") else None
            if there and here and there != here and LAYER_OF[there] >= LAYER_OF[here]:
                wrong.append(f"{_shown(path)}:{node.lineno}: {here} (layer {LAYER_OF[here]}) "
                             f"imports {target} (layer {LAYER_OF[there]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_circles_between_modules():
    edges = _edges()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
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

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_imports_inside_functions_are_optional_dependencies():
    deferred = []
    for name, path in MODULES.items():
        for target, node, inside in _imports(path):
            if inside and not any(target == o or target.startswith(o + ".") for o in OPTIONAL):
                deferred.append(f"{_shown(path)}:{node.lineno}: {target}")
    assert not deferred, ("imports inside functions (move them to the top of the file, or name the optional "
                          "dependency and why in OPTIONAL):\n" + "\n".join(deferred))


def _runs_as_a_script(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    tests = [ast.unparse(node.test) for node in tree.body if isinstance(node, ast.If)]
    return any("__name__" in test and "__main__" in test for test in tests)


def test_command_lines_live_in_commands():
    """Each command line is a module of commands/ (argument parsing only, the work in the library)."""
    scripts = sorted(name for name, path in MODULES.items() if _runs_as_a_script(path) and _package(name) != "commands")
    assert not scripts, f"modules with a command line outside malora_dist/commands: {scripts}"
    commands = [name for name in MODULES if _package(name) == "commands" and not name.endswith("commands")]
    assert commands and all(_runs_as_a_script(MODULES[name]) for name in commands)


def test_the_circle_check_sees_a_circle(tmp_path, monkeypatch):
    """A module of data/ that imports one which imports it back is reported."""
    records = tmp_path / "records.py"
    records.write_text(MODULES["malora_dist.data.records"].read_text() + "\nimport malora_dist.data.pipeline\n")
    monkeypatch.setitem(MODULES, "malora_dist.data.records", records)
    with pytest.raises(AssertionError, match="malora_dist.data.pipeline"):
        test_no_circles_between_modules()


@pytest.mark.parametrize("module", ["malora_dist.train.trainer", "malora_dist.runtime.groups"])
def test_the_contract_sees_a_violation(module, tmp_path, monkeypatch):
    """The checks are not vacuous: an upward import and a circle written into a copy are found."""
    source = MODULES[module].read_text()
    assert _package(module) in LAYER_OF
    upward = tmp_path / "upward.py"
    upward.write_text(source + "\nfrom malora_dist.commands.train import main\n")
    ups = [t for t, _, _ in _imports(upward) if t.startswith("malora_dist.commands")]
    assert ups and LAYER_OF[_package(ups[0])] > LAYER_OF[_package(module)]
    monkeypatch.setitem(MODULES, module, upward)
    with pytest.raises(AssertionError, match="imports against the layers"):
        test_no_import_reaches_up_or_sideways()
