"""The package's imports point down the layers of docs/architecture.md and never close a loop.

The layers are read from the "## Layers" list of docs/architecture.md (the one place they are
written), the imports from the source with ``ast``: module-level and function-local ones,
absolute (``segdistill.x``) and relative, ``from . import x`` resolved to the submodule ``x``.
An import that points to a higher layer is reported with its file, line and both layers; a
loop of package modules importing each other is reported as the chain of modules.

Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first, so such an import is
also an edge to those packages (except the importer's own parents, which are already being
initialised when it runs), as Python executes it.
"""
from __future__ import annotations

import ast
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set

from conftest import REPO

PACKAGE = "segdistill"
PACKAGE_DIR = os.path.join(REPO, "projects", PACKAGE)
ARCHITECTURE_DOC = os.path.join(REPO, "docs", "architecture.md")


# ---------------------------------------------------------------------------------------------
# The checker (also run on synthetic packages below, to show that it can fail)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported package module
    path: str  # the importing file
    line: int
    text: str  # the import statement as written
    local: bool  # inside a function


def parse_layers(doc_text: str) -> List[List[str]]:
    """The modules of each layer, bottom first, from the "## Layers" section: a numbered list
    whose items start with the layer's modules in backticks, then a colon and what lives there."""
    section = re.search(r"^## Layers\s*$(.*?)(?=^## |\Z)", doc_text, flags=re.M | re.S)
    if section is None:
        raise ValueError("docs/architecture.md has no '## Layers' section")
    layers = []
    for item in re.findall(r"^\d+\.\s+(.*)$", section.group(1), flags=re.M):
        head = item.split(":", 1)[0]
        names = re.findall(r"`([A-Za-z_][\w.]*)`", head)
        if not names:
            raise ValueError(f"A '## Layers' item names no module in backticks before its colon: {item!r}")
        layers.append(names)
    if not layers:
        raise ValueError("The '## Layers' section of docs/architecture.md lists no layer")
    return layers


def package_modules(package_dir: str, package: str) -> Dict[str, str]:
    """{dotted module name: file} of every module of the package (``__init__`` = the package)."""
    modules = {}
    for folder, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, package_dir)
        prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
        for f in sorted(files):
            if f.endswith(".py"):
                name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                modules[name] = os.path.join(folder, f)
    return modules


def _function_local_nodes(tree: ast.AST) -> Set[int]:
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local.update(id(n) for n in ast.walk(node) if n is not node)
    return local


def read_imports(modules: Dict[str, str], package: str) -> List[Import]:
    """Every import of a package module by a package module (module-level and function-local)."""
    found = []
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
        local = _function_local_nodes(tree)
        is_package = os.path.basename(path) == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # ``from p import x``: the submodule p.x when there is one, else a name of p
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            else:
                continue
            text = ast.get_source_segment(source, node) or ""
            for target in dict.fromkeys(targets):
                if target == package or target.startswith(package + "."):
                    found.append(Import(name, target, path, node.lineno, " ".join(text.split()), id(node) in local))
    return found


def layer_of(module: str, layers: Sequence[Sequence[str]], package: str) -> Optional[int]:
    """Index of ``module``'s layer: the layer naming it or its closest listed parent package.
    The package itself (its ``__init__``) belongs only to a layer that names it exactly."""
    best, best_len = None, -1
    for i, names in enumerate(layers):
        for n in names:
            if module == n or (n != package and module.startswith(n + ".")):
                if len(n) > best_len:
                    best, best_len = i, len(n)
    return best


def _edges(imports: Sequence[Import], modules: Dict[str, str]) -> Dict[str, Dict[str, Import]]:
    """module -> {imported module: the first import that makes the edge}, with the implicit
    edges to the imported module's parent packages (not the root, not the importer's parents)."""
    graph: Dict[str, Dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        parts = imp.target.split(".")
        own_parents = {".".join(imp.module.split(".")[:k]) for k in range(1, imp.module.count(".") + 2)}
        for k in range(1, len(parts) + 1):
            t = ".".join(parts[:k])
            if t not in modules or t == imp.module:
                continue
            if t == imp.target or (k > 1 and t not in own_parents):
                graph[imp.module].setdefault(t, imp)
    return graph


def _cycles(graph: Dict[str, Dict[str, Import]]) -> List[List[str]]:
    """One loop per strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    loops = []
    for comp in components:  # a shortest loop through the component's first module
        members, start = set(comp), comp[0]
        paths = {start: [start]}
        queue = [start]
        loop = None
        while queue and loop is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    loop = paths[v] + [start]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        loops.append(loop)
    return loops


def check_package(package_dir: str, package: str, layers: Sequence[Sequence[str]]) -> List[str]:
    """Every problem of the package's import graph, one readable line each (empty: none)."""
    modules = package_modules(package_dir, package)
    imports = read_imports(modules, package)
    problems = []

    def where(imp: Import) -> str:
        rel = os.path.relpath(imp.path, os.path.dirname(package_dir))
        return f"{rel}:{imp.line}: {imp.text!r}" + (" (function-local)" if imp.local else "")

    def describe(i: Optional[int]) -> str:
        return f"layer {i + 1} ({', '.join(layers[i])})"

    for m in modules:
        if layer_of(m, layers, package) is None:
            problems.append(f"{m} is in no layer: add it (or its package) to the '## Layers' list")
    for imp in imports:
        src, dst = layer_of(imp.module, layers, package), layer_of(imp.target, layers, package)
        if imp.target not in modules:
            problems.append(f"{where(imp)} imports {imp.target}, which is no module of the package")
        elif src is not None and dst is not None and dst > src:
            problems.append(f"{where(imp)} points up: {imp.module} in {describe(src)} imports {imp.target} "
                            f"in {describe(dst)}")
    graph = _edges([i for i in imports if i.target in modules], modules)
    for loop in _cycles(graph):
        steps = [f"{a} -> {b} ({where(graph[a][b])})" for a, b in zip(loop, loop[1:])]
        problems.append("import cycle " + " -> ".join(loop) + ":\n    " + "\n    ".join(steps))
    return problems


def function_local_imports(package_dir: str, package: str) -> List[str]:
    modules = package_modules(package_dir, package)
    return [f"{os.path.relpath(i.path, os.path.dirname(package_dir))}:{i.line}: {i.text!r}"
            for i in read_imports(modules, package) if i.local]


# ---------------------------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------------------------
def _layers():
    with open(ARCHITECTURE_DOC, encoding="utf-8") as f:
        return parse_layers(f.read())


def test_layers_are_documented():
    layers = _layers()
    names = [n for layer in layers for n in layer]
    assert len(names) == len(set(names)), f"a module is listed twice in docs/architecture.md's Layers: {names}"
    assert PACKAGE in names, "the package's own __init__ needs a layer (the top one)"
    assert layers[-1] == [PACKAGE], "the package's __init__ (import = registration) is the top layer"


def test_imports_point_down_without_cycles():
    problems = check_package(PACKAGE_DIR, PACKAGE, _layers())
    assert not problems, "Imports against the layers of docs/architecture.md:\n" + "\n".join(problems)


def test_no_function_local_import_of_the_package():
    """A function-local import hides an edge of the graph from a reader (it is what used to hide
    the cycles): the package's own modules are imported at module level. (Heavy or optional
    third-party modules may still be imported where they are used.)"""
    local = function_local_imports(PACKAGE_DIR, PACKAGE)
    assert not local, "Function-local imports of package modules (import them at module level):\n" + "\n".join(local)


# ---------------------------------------------------------------------------------------------
# The checker fails where it should: a synthetic package
# ---------------------------------------------------------------------------------------------
def _write_package(root, files: Dict[str, str]) -> str:
    pkg = os.path.join(str(root), "toy")
    for rel, text in files.items():
        path = os.path.join(pkg, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
    return pkg


TOY_DOC = """\
# Toy

## Layers

1. `toy.low`: the bottom
2. `toy.mid`, `toy.side`: the middle (`toy.low` below it)
3. `toy.top`: the top
4. `toy`: the package

## Another section

1. `toy.unrelated`: not a layer
"""


def test_checker_parses_the_layers_section():
    assert parse_layers(TOY_DOC) == [["toy.low"], ["toy.mid", "toy.side"], ["toy.top"], ["toy"]]


def test_checker_accepts_a_clean_package(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "from . import top\n",
        "low/__init__.py": "from .core import x\n",
        "low/core.py": "x = 1\n",
        "mid/__init__.py": "from ..low import x\nfrom .a import y\n",
        "mid/a.py": "from toy.low.core import x\ny = x\n",
        "side.py": "def f():\n    from .mid import y\n    return y\n",
        "top.py": "from . import mid, side\n",
    })
    layers = parse_layers(TOY_DOC)
    assert check_package(pkg, "toy", layers) == []
    assert function_local_imports(pkg, "toy") == ["toy/side.py:2: 'from .mid import y'"]


def test_checker_reports_an_upward_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/core.py": "import os\n\n\ndef f():\n    from ..top import z  # hidden in a function\n    return z\n",
        "mid/__init__.py": "",
        "top.py": "z = 1\n",
    })
    problems = check_package(pkg, "toy", parse_layers(TOY_DOC))
    assert len(problems) == 1, problems
    assert problems[0] == (
        "toy/low/core.py:5: 'from ..top import z' (function-local) points up: toy.low.core in layer 1 (toy.low) "
        "imports toy.top in layer 3 (toy.top)"
    )


def test_checker_reports_a_cycle_inside_a_layer(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "mid/__init__.py": "from . import a\n",
        "mid/a.py": "from .b import g\n\n\ndef f():\n    return g()\n",
        "mid/b.py": "def g():\n    from toy.mid import a\n    return a\n",
    })
    problems = check_package(pkg, "toy", parse_layers(TOY_DOC))
    assert len(problems) == 1, problems
    assert problems[0].startswith("import cycle toy.mid.a -> toy.mid.b -> toy.mid.a:")
    assert "toy/mid/b.py:2: 'from toy.mid import a' (function-local)" in problems[0]


def test_checker_reports_a_cycle_through_a_package_init(tmp_path):
    # mid.a imports low.core, which runs low/__init__ first; that imports mid.a back
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "from ..mid import a\n",
        "low/core.py": "",
        "mid/__init__.py": "",
        "mid/a.py": "import toy.low.core\n",
    })
    problems = check_package(pkg, "toy", parse_layers(TOY_DOC))
    assert any(p.startswith("toy/low/__init__.py:1: 'from ..mid import a' points up") for p in problems), problems
    assert any(p.startswith("import cycle toy.low -> toy.mid.a -> toy.low:") for p in problems), problems


def test_checker_reports_a_module_outside_every_layer(tmp_path):
    pkg = _write_package(tmp_path, {"__init__.py": "", "low/__init__.py": "", "extra.py": ""})
    assert check_package(pkg, "toy", parse_layers(TOY_DOC)) == [
        "toy.extra is in no layer: add it (or its package) to the '## Layers' list"
    ]
