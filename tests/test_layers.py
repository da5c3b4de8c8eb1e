"""The package's layers depend one way (docs/architecture.md): no import cycle, no module importing one
above it, no function-local import of a package module to dodge a cycle, and every module importable
first in a fresh interpreter.

The graph is read from the sources with `ast`, so it covers every module whether or not its optional
dependencies are installed here.
"""
import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the package lives in the repository (kernels/ and csrc/ install inside it).
PACKAGE_DIRS = {"lvrpo_fast": ROOT / "lvrpo_fast", "lvrpo_fast.kernels": ROOT / "kernels",
                "lvrpo_fast.csrc": ROOT / "csrc"}

# Lower layers first. A module may import modules of its own layer or below, never above.
LAYERS = [
    ("contract", ["lvrpo_fast.contract", "lvrpo_fast.options", "lvrpo_fast.chunking", "lvrpo_fast.packing", "lvrpo_fast.testing",
                  "lvrpo_fast.csrc", "lvrpo_fast.backends", "lvrpo_fast.vocab_parallel"]),
    ("kernels and checks", ["lvrpo_fast.kernels", "lvrpo_fast.kernels.*", "lvrpo_fast.validate"]),
    ("backends and the oracle", ["lvrpo_fast.backends.triton", "lvrpo_fast.backends.cpp", "lvrpo_fast.reference"]),
    ("fused autograd", ["lvrpo_fast.fused", "lvrpo_fast.fused.*"]),
    ("dispatch", ["lvrpo_fast.dispatch"]),
    ("public ops", ["lvrpo_fast.logprobs", "lvrpo_fast.grpo_loss", "lvrpo_fast.linear_grpo_loss",
                    "lvrpo_fast.advantages", "lvrpo_fast.process_advantages"]),
    ("modules", ["lvrpo_fast.modules"]),
    ("users of the API", ["lvrpo_fast", "lvrpo_fast.integrations", "lvrpo_fast.integrations.*", "lvrpo_fast.train",
                          "lvrpo_fast.train.*"]),
]

# Function-local imports of package modules that are deliberate, each with its reason (none today).
LOCAL_IMPORT_ALLOWED = {}


def _modules():
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") for p in parts) or "__pycache__" in parts:
                continue
            if package == "lvrpo_fast" and parts and parts[0] in ("kernels", "csrc"):
                continue
            name = ".".join([package, *parts])
            found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for rank, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                best = rank
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it in one")
    return best


def _resolve(module: str, path: Path, node) -> list:
    """Package modules an import statement loads (a `from X import a` of a submodule a loads X.a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "lvrpo_fast"]
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "lvrpo_fast":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _imports():
    """{module: [(imported module, line, function-local?)]}."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        local = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        local.add(id(inner))
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, path, node):
                    if target != module and target in MODULES:
                        edges.append((target, node.lineno, id(node) in local))
        graph[module] = edges
    return graph


GRAPH = _imports()


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, edges in GRAPH.items():
        for target, line, _ in edges:
            if _layer(target) > _layer(module):
                bad.append(f"{module}:{line} imports {target} ({LAYERS[_layer(module)][0]} -> "
                           f"{LAYERS[_layer(target)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_function_local_import_of_a_package_module():
    bad = [f"{module}:{line} imports {target} inside a function"
           for module, edges in GRAPH.items() for target, line, local in edges
           if local and (module, target) not in LOCAL_IMPORT_ALLOWED]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    state, stack = {}, []

    def visit(module):
        state[module] = "active"
        stack.append(module)
        for target, _, _ in GRAPH[module]:
            if state.get(target) == "active":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module)


def _import_fresh(module):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                            timeout=300)
    return module, result.returncode, result.stderr.strip().splitlines()[-1:] if result.stderr else []


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other of the package: a cycle, or a module relying on another
    having been imported first, fails here even where the static graph above cannot see it (an
    importlib call). Importing any submodule runs lvrpo_fast/__init__.py first, so the order only
    differs for `lvrpo_fast` itself and the modules it does not load (kernels, backends, integrations,
    the trainer): those are the ones imported first, each in its own interpreter. Optional third-party
    dependencies that are not installed are a skip, not a failure."""
    listing = subprocess.run([sys.executable, "-c", "import sys, lvrpo_fast; print(' '.join(sorted(sys.modules)))"],
                             capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    loaded = set(listing.stdout.split())
    # Importing the package loads neither triton nor the compiler: a CPU-only user pays for neither, and
    # a test harness can still choose Triton's interpreter after importing lvrpo_fast.
    assert "triton" not in loaded and "torch._dynamo" not in loaded
    modules = ["lvrpo_fast"] + sorted(m for m in MODULES if m not in loaded)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_import_fresh, modules))
    failures = []
    for module, code, last in results:
        if code == 0:
            continue
        message = last[0] if last else ""
        missing = re.search(r"No module named '([^']+)'", message)
        if missing and not missing.group(1).startswith("lvrpo_fast"):
            continue  # an optional dependency (trl, verl, peft, ...) absent here
        failures.append(f"{module}: {message}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("module", ["lvrpo_fast.contract", "lvrpo_fast.testing", "lvrpo_fast.chunking"])
def test_leaves_import_nothing_of_the_package(module):
    assert not GRAPH[module] or all(_layer(t) == 0 for t, _, _ in GRAPH[module]), GRAPH[module]
    if module in ("lvrpo_fast.contract", "lvrpo_fast.testing"):
        assert not GRAPH[module], f"{module} must import nothing of the package: {GRAPH[module]}"
