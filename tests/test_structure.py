"""The package's shape: no import cycle, every module importable on its own, no function too long to read."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import iedp

PACKAGE = Path(iedp.__file__).parent
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Every module under ``iedp/`` by dotted name (a package by its own name, from its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The iedp modules that ``name`` imports anywhere in its file (function-level imports included).

    ``from a.b import c`` counts ``a.b`` and, when ``c`` is a module, ``a.b.c`` too. The ``__init__`` of a parent
    package that Python runs on the way is not counted: that is not an import the module wrote (the isolation
    test below catches what it breaks).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {module for module in found if module in modules and module != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "iedp.pretrain.pipeline" in graph["iedp.weights.resolve"], "function-level imports count"
    assert _cycles(graph) == [], "modules that import each other, directly or through others"


# Forks one child per module after the heavy third-party libraries are imported once, so each child imports its
# iedp module with no other iedp module loaded, as `python -c "import iedp.x.y"` would, in a fraction of the time.
_ISOLATION_SCRIPT = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    import numpy, PIL.Image, safetensors.torch, torch, yaml  # noqa
    import diffusers.loaders.single_file_utils, diffusers.optimization  # noqa
    from accelerate import Accelerator  # noqa
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection  # noqa
    failures = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failures.append(name)
    print("FAILED:", " ".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def test_every_module_imports_in_isolation() -> None:
    names = sorted(_modules())
    result = subprocess.run(
        [sys.executable, "-c", _ISOLATION_SCRIPT, *names],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def test_task_table_matches_the_config_task_names() -> None:
    from iedp.config import TASKS as CONFIG_TASKS
    from iedp.models.tasks import TASKS

    assert tuple(TASKS) == CONFIG_TASKS, (
        "a task needs its entry in models/tasks.py and its name in config.TASKS"
    )


def _long_functions(limit: int) -> list[str]:
    """``path:line name (N lines)`` of every function or method under ``iedp/`` longer than ``limit`` lines
    (from its ``def`` line, decorators excluded, to its last line, docstring included)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    where = path.relative_to(PACKAGE.parent)
                    found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines() -> None:
    assert _long_functions(MAX_FUNCTION_LINES) == [], "split these into named helpers"
    assert _long_functions(40), "the walker finds functions"


def test_cli_parser_does_not_import_the_models() -> None:
    """`iedp --help` and option errors answer in about a second: building the parser must not import diffusers or
    transformers (seconds), which the commands import when they run."""
    script = "import sys; from iedp.cli import build_parser; build_parser(); print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_library_chatter_is_quieted_below_debug_level() -> None:
    import logging

    from iedp.logs import quiet_libraries

    quiet_libraries()
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("accelerate.checkpointing").getEffectiveLevel() == logging.WARNING
    assert (
        logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    )  # a line per request of iedp serve
