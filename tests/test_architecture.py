"""The package's layout: layers that import downward only, no import cycle (function-level imports
included), no module too long, import-light modules that stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wilke_lib"
MAX_LINES = 420  # "about 400": a module above it must say why in its docstring ("longer than" ...)

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "results", "code_version", "registry", "hparams", "schedule", "profiles", "sources",
              "reported")),
    ("model", ("arch", "tokens", "models", "generation", "metrics")),
    ("data", ("counterfact", "second_moments")),
    ("editors", ("editors", "editors.*", "editing")),
    ("protocol", ("lifelong", "lifelong.*")),
    ("organisms", ("organisms", "organisms.*")),
    ("analyses", ("analysis", "analysis.*", "experiments", "claims", "ladder")),
    ("book and commands", ("book", "present", "headline", "run_matrix", "bench", "bench.*", "organisms.__main__",
                           "")),
)
"""The layers of docs/design.md, lowest first: a module may import from its own layer and the layers below
only. Names are relative to `wilke_lib` ("" is the package root, which wires the synthetic world in as the
source "toy-world", `wilke_lib.sources`); "pkg.*" is every module of a package, a module named exactly
takes precedence (`organisms.__main__`, a command, sits at the top)."""

COMPATIBILITY: dict[tuple[str, str], str] = {}
"""The upward imports allowed, each with its reason: old names kept for importers that cannot change yet."""

NEVER = {"editors": ("organisms", "analysis", "experiments", "present", "book", "claims", "ladder", "run_matrix",
                     "bench", "lifelong")}
"""What a layer must never reach, not even through the modules it imports (the layers say it; this says it
by name)."""

IMPORT_LIGHT = ("wilke_lib.registry", "wilke_lib.hparams", "wilke_lib.profiles", "wilke_lib.schedule",
                "wilke_lib.sources", "wilke_lib.code_version")
"""Modules that import without torch (tables of sizes, the registry, settings), so that a listing is fast."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The wilke_lib modules `path` imports anywhere in its body (not only at the top)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            # `from pkg import submodule` depends on the submodule; `from pkg import name`, on pkg
            names = submodules if all(m in known for m in submodules) else [node.module] + submodules
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int:
    """The index in `LAYERS` of a module of the package; KeyError for a module no layer names."""
    name = module.removeprefix("wilke_lib").removeprefix(".")
    exact = {entry: i for i, (_, entries) in enumerate(LAYERS) for entry in entries if not entry.endswith(".*")}
    if name in exact:
        return exact[name]
    packages = [(entry[:-2], i) for i, (_, entries) in enumerate(LAYERS) for entry in entries if entry.endswith(".*")]
    for package, i in sorted(packages, key=lambda item: -len(item[0])):
        if name.startswith(package + "."):
            return i
    raise KeyError(module)


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_module_has_a_layer():
    missing = []
    for name in modules():
        try:
            layer_of(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"modules in no layer of LAYERS (add them, and to docs/design.md): {missing}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer than its own, except those `COMPATIBILITY` allows (a
    module in no layer is `test_every_module_has_a_layer`'s to report)."""
    upward = []
    for module, imported in sorted(graph.items()):
        if not _has_layer(module):
            continue
        for other in sorted(o for o in imported if _has_layer(o)):
            if layer_of(other) > layer_of(module) and (module, other) not in COMPATIBILITY:
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {other} "
                              f"({LAYERS[layer_of(other)][0]})")
    return upward


def test_layers_import_downward_only():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"wilke_lib.second_moments": {"wilke_lib.organisms.world", "wilke_lib.arch"}}) == [
        "wilke_lib.second_moments (data) imports wilke_lib.organisms.world (organisms)"]
    assert upward_imports({"wilke_lib.experiments": {"wilke_lib.editing", "wilke_lib.claims"}}) == []
    assert layer_of("wilke_lib.editors.rome") < layer_of("wilke_lib.organisms.world") < layer_of("wilke_lib.experiments")
    assert layer_of("wilke_lib.organisms.__main__") == len(LAYERS) - 1 == layer_of("wilke_lib")
    assert layer_of("wilke_lib.profiles") == 0 and layer_of("wilke_lib.second_moments") < layer_of("wilke_lib.editors.cache")


def test_editors_never_reach_the_layers_above():
    graph = import_graph()
    bad = []
    for layer, forbidden in NEVER.items():
        for module in graph:
            if not _has_layer(module) or LAYERS[layer_of(module)][0] != layer:
                continue
            for other in sorted(reachable(graph, module)):
                name = other.removeprefix("wilke_lib.")
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{module} reaches {other}")
    assert not bad, bad


def test_import_light_modules_need_no_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in IMPORT_LIGHT)
            + "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            + "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "wilke_lib.editing" in graph and "wilke_lib.editors" in graph["wilke_lib.editing"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_is_too_long_without_a_reason():
    long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and "longer than" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{name} ({text.count(chr(10))} lines)")
    assert not long, f"modules over {MAX_LINES} lines without a reason in their docstring: {long}"


def test_no_loader_can_run_code_from_a_file():
    """Caches are JSON, JSON lines or safetensors: no pickle, no torch.load without weights_only=True."""
    bad = []
    for name, path in modules().items():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if ("read_pickle" in line or "pickle.load" in line or "to_pickle" in line
                    or ("torch.load(" in line and "weights_only=True" not in line)):
                bad.append(f"{name}:{number}: {line.strip()}")
    assert not bad, bad
