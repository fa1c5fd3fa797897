"""The package map of docs/architecture.md, kept by the code: layers import only downwards, no import
circles, project imports at module level (a function-level one says why, with ``# lazy:``), one
``PathLike``.

The rules are read from the source with ``ast`` (nothing is imported), so a violation is reported with
its file and line. Each rule is also run on a planted violation, so a rule that cannot fail is noticed.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slidechat"

#: bottom to top; a package may import its own modules and the packages below it, nothing above
LAYERS: Tuple[str, ...] = ("utils", "wsi", "model", "features", "data", "evaluation", "inference", "engine",
                           "apps", "cli")
RANK: Dict[str, int] = {name: i for i, name in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    """``slidechat.<layer>...`` -> ``<layer>``; the root package itself is ``slidechat``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "slidechat"


def _targets(node: ast.AST, module: str, is_package: bool) -> List[str]:
    """The ``slidechat`` modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        names = [base]
    else:
        return []
    return [n for n in names if n == "slidechat" or n.startswith("slidechat.")]


def project_imports(source: str, module: str, is_package: bool) -> Iterator[Tuple[str, int, bool]]:
    """``(target module, line, at module level)`` for every import of a slidechat module."""
    tree = ast.parse(source)
    in_function: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(sub))
    for node in ast.walk(tree):
        for target in _targets(node, module, is_package):
            yield target, node.lineno, id(node) not in in_function


def layer_violations(source: str, module: str, is_package: bool = False) -> List[str]:
    """Imports that point up (or sideways into an unknown package) from ``module``."""
    own = _layer(module)
    out = []
    for target, line, _ in project_imports(source, module, is_package):
        to = _layer(target)
        if own == "slidechat":  # the root package: the version and start-up quieting only
            ok = to == "utils"
        else:
            ok = to in RANK and own in RANK and RANK[to] <= RANK[own]
        if not ok:
            out.append(f"{module}:{line} imports {target} ({own} -> {to})")
    return out


def lazy_violations(source: str, module: str, is_package: bool = False) -> List[str]:
    """Function-level project imports without a ``# lazy: <why>`` on the line or the line above."""
    lines = source.splitlines()
    out = []
    for target, line, top in project_imports(source, module, is_package):
        if top:
            continue
        here = lines[line - 1]
        above = lines[line - 2] if line >= 2 else ""
        if not re.search(r"#\s*lazy:\s*\S", here) and not re.search(r"^\s*#\s*lazy:\s*\S", above):
            out.append(f"{module}:{line} imports {target} inside a function without '# lazy: <why>'")
    return out


def _sources() -> Iterator[Tuple[Path, str, str, bool]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"


def import_graph() -> Dict[str, Set[str]]:
    """module -> the project modules it imports (any level), resolved to files that exist."""
    modules = {m for _, _, m, _ in _sources()}
    graph: Dict[str, Set[str]] = defaultdict(set)
    for _, src, mod, pkg in _sources():
        for target, _, _ in project_imports(src, mod, pkg):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != mod:
                graph[mod].add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


# ------------------------------------------------------------------------------------------------ the rules
def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), "docs/architecture.md and LAYERS must name every package"


def test_layers_only_point_down():
    bad = [v for _, src, mod, pkg in _sources() for v in layer_violations(src, mod, pkg)]
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_project_imports_are_module_level_or_say_why():
    bad = [v for _, src, mod, pkg in _sources() for v in lazy_violations(src, mod, pkg)]
    assert not bad, "\n".join(bad)


def test_one_pathlike():
    defs = [f"{p.relative_to(ROOT)}" for p, src, _, _ in _sources()
            if re.search(r"^PathLike\s*=", src, re.M) and p.name != "paths.py"]
    assert not defs, "PathLike is defined once, in slidechat/utils/paths.py: " + ", ".join(defs)


def test_architecture_doc_names_every_package_in_order():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    order = [m.group(1) for m in re.finditer(r"^\| *`(\w+)/` *\|", doc, re.M)]
    assert order == list(reversed(LAYERS)), "the layer table of docs/architecture.md, top to bottom"


# ------------------------------------------------------------------------------------------------ the rules can fail
@pytest.mark.parametrize("module,source,expected", [
    ("slidechat.model.x", "from slidechat.data.template import resolve_template\n", "model -> data"),
    ("slidechat.utils.x", "import slidechat.wsi.slide\n", "utils -> wsi"),
    ("slidechat.engine.x", "def f():\n    from slidechat.apps.extract import x  # lazy: nope\n", "engine -> apps"),
    ("slidechat.data.x", "from ..evaluation import mcq\n", "data -> evaluation"),
    ("slidechat", "from slidechat.model import x\n", "slidechat -> model"),
])
def test_a_back_up_arrow_is_caught(module, source, expected):
    found = layer_violations(source, module)
    assert len(found) == 1 and expected in found[0], found


def test_downward_imports_pass():
    src = "from slidechat.utils.errors import SlideChatError\nfrom ..wsi import slide\nimport slidechat.model.x\n"
    assert layer_violations(src, "slidechat.features.x") == []


def test_a_circle_is_caught():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_an_unexplained_function_level_import_is_caught():
    src = ("def f():\n    from slidechat.wsi import slide\n"
           "def g():\n    # lazy: torch is seconds to import and --help must not wait\n    from slidechat.apps import extract\n"
           "def h():\n    from slidechat.apps import chat  # lazy: the web page is optional\n")
    found = lazy_violations(src, "slidechat.cli.x")
    assert len(found) == 1 and ":2 " in found[0], found
