"""The layering ARCHITECTURE.md promises, checked from the source: core/ has no
import cycle (function-local imports included: a local import only hides one),
imports no UI and no front end, and no module in it grows past one job's size."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

CORE = ROOT / "core"
MAX_LINES = 400
FRONT_ENDS = ("gradio", "cli", "demo_app", "app", "train", "predict", "export", "deploy", "scripts", "bench")


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(core modules, other top-level packages) that `path` imports anywhere in its body."""
    internal, external = set(), set()
    tree = ast.parse(path.read_text(), str(path))
    # `if TYPE_CHECKING:` imports never run: annotations only, not a dependency at import time.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for b in block.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "core" and len(parts) > 1:
                    internal.add(parts[1])
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 1 or parts[:1] == ["core"]:
                rest = parts[1:] if node.level == 0 else parts
                if rest:  # from .x import y / from core.x import y
                    internal.add(rest[0])
                else:  # from . import x, y
                    internal.update(a.name for a in node.names)
            elif node.level == 0:
                external.add(parts[0])
    return {m for m in internal if (CORE / f"{m}.py").is_file()} - {path.stem}, external


def core_graph() -> dict[str, set[str]]:
    return {p.stem: imports(p)[0] for p in sorted(CORE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_sees_local_imports_and_cycles(tmp_path):
    # the checker itself: a function-local import counts, and a cycle through it is found
    (tmp_path / "m.py").write_text("import torch\n\n\ndef f():\n    from .checkpoint import load_file\n"
                                   "    from . import config, models\n    import gradio as gr\n")
    assert imports(tmp_path / "m.py") == ({"checkpoint", "config", "models"}, {"torch", "gradio"})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_has_no_import_cycle():
    cycle = find_cycle(core_graph())
    assert cycle is None, "import cycle in core/: " + " -> ".join(cycle)


def test_core_imports_no_ui_and_no_front_end():
    for p in sorted(CORE.glob("*.py")):
        wrong = sorted(imports(p)[1] & set(FRONT_ENDS))
        assert not wrong, f"core/{p.name} imports {wrong}: core is the library layer under the CLI and the app"


def test_every_core_module_is_one_screenful_of_jobs():
    sizes = {p.name: len(p.read_text().splitlines()) for p in CORE.glob("*.py")}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"core/ modules over {MAX_LINES} lines (split them along their seams): {too_long}"


def defined_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_name_core_imports_from_core_exists():
    # a function-local `from .x import name` fails only when that function runs: after a move, check them all here
    missing = []
    for p in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                target = CORE / f"{node.module}.py"
                missing += [f"core/{p.name}:{node.lineno} {a.name} from core.{node.module}" for a in node.names
                            if a.name not in defined_names(target)]
    assert not missing, missing
