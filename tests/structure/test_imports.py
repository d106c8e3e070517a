"""Static checks of quantlib's structure: import graph, function-local imports, module size, package root, re-exports.

Pure `ast`/`tokenize` analysis of the source files; quantlib itself is never imported. The repository's top-level
`kernels/` folder is part of `quantlib.kernels` (its `__init__` extends `__path__`), so its files count as
`quantlib.kernels.*` modules."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

PKG = REPO / "quantlib"
MAX_LINES = 450
MAX_LOCAL_IMPORTS = 10
ROOT_FILES = {"__init__.py", "api.py", "errors.py", "__main__.py"}
F401_ALLOWED = {"quantlib/api.py", "quantlib/catalog/__init__.py", "quantlib/kernels/__init__.py"}
DIRECTIVE = re.compile(r"(noqa(:\s*[A-Z]+\d+(\s*,\s*[A-Z]+\d+)*)?|type:\s*ignore(\[[^\]]*\])?|pragma:[^#]*)", re.I)


@dataclass
class Import:
    rel: str             # file, relative to the repository
    line: int
    source: str          # the module the statement is in
    targets: list[str]   # quantlib modules it imports
    base: str            # X in `from X import ...` (resolved if relative)
    names: list[str]     # names after `from X import`
    local: bool          # inside a function or method
    comment: str         # comment on its lines or on a comment line just above ("" if none)
    noqa_f401: bool

    @property
    def where(self) -> str:
        return f"{self.rel}:{self.line}"


def _module_files() -> dict[str, Path]:
    """Module name -> file, for quantlib/**.py and kernels/**.py (as quantlib.kernels.*)."""
    roots = ((PKG, ("quantlib",)), (REPO / "kernels", ("quantlib", "kernels")))
    mods = {}
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            parts = prefix + path.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _module_files()


def _comments(text: str) -> dict[int, str]:
    """Line number -> text of the `#` comment on that line (tokenize, so a `#` inside a string does not count)."""
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT}


def _resolve(name: str) -> str:
    """The longest prefix of a dotted name that is a quantlib module (`import quantlib.a.b` of a typo stays in a)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _imports_of(module: str, path: Path) -> list[Import]:
    text = path.read_text()
    comments, lines = _comments(text), text.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(make(child, local))
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    def make(node: ast.Import | ast.ImportFrom, local: bool) -> Import:
        names, base = [], ""
        if isinstance(node, ast.Import):
            targets = [_resolve(a.name) for a in node.names if a.name.split(".")[0] == "quantlib"]
        else:
            base = node.module or ""
            if node.level:  # relative: `.` is this file's package, each further dot one package up
                base = ".".join(x for x in (package.rsplit(".", node.level - 1)[0], base) if x)
            names = [a.name for a in node.names]
            targets = []
            if base.split(".")[0] == "quantlib":  # `from X import y`: y itself if it is a module, else X
                targets = [f"{base}.{n}" if f"{base}.{n}" in MODULES else _resolve(base) for n in names]
        own = [comments.get(n, "") for n in range(node.lineno, node.end_lineno + 1)]
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        comment = " ".join(c for c in own if c) or (above if above.startswith("#") else "")
        return Import(str(path.relative_to(REPO)), node.lineno, module, sorted(set(targets)), base, names, local,
                      comment, any(re.search(r"noqa:[^#]*F401", c) for c in own))

    visit(ast.parse(text, filename=str(path)), False)
    return found


ALL_IMPORTS = [imp for mod, path in MODULES.items() for imp in _imports_of(mod, path)]
IMPORTS = [imp for imp in ALL_IMPORTS if imp.targets]  # the imports of quantlib modules


def _graph() -> dict[str, dict[str, Import]]:
    """module -> {imported module -> first import statement}. No implicit edges to parent packages."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for imp in IMPORTS:
        for t in imp.targets:
            graph[imp.source].setdefault(t, imp)
    return graph


def _sccs(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's strongly connected components that hold a cycle (recursive: the graph has ~100 nodes)."""
    index, low, stack, out = {}, {}, [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            comp = set()
            while not comp or node not in comp:
                comp.add(stack.pop())
            out.append(comp)

    for node in graph:
        if node not in index:
            visit(node)
    return [c for c in out if len(c) > 1 or next(iter(c)) in graph[next(iter(c))]]


def _shortest_path(graph, comp: set[str], start: str, goal: str) -> list[str]:
    prev, todo = {start: None}, deque([start])
    while todo:
        node = todo.popleft()
        if node == goal:
            break
        for nxt in graph[node]:
            if nxt in comp and nxt not in prev:
                prev[nxt] = node; todo.append(nxt)
    path = [goal]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def test_no_import_cycles():
    # Every cycle is listed through each of its edges: for each edge u -> v inside a strongly connected component,
    # the shortest cycle u -> v -> ... -> u (rotations of the same cycle are shown once).
    graph, cycles, seen = _graph(), [], set()
    for comp in _sccs(graph):
        for u in sorted(comp):
            for v in sorted(graph[u]):
                if v not in comp:
                    continue
                cycle = [u] + (_shortest_path(graph, comp, v, u) if v != u else [u])
                key = frozenset(zip(cycle, cycle[1:]))
                if key in seen:
                    continue
                seen.add(key)
                edges = "\n".join(f"      {a} -> {b}  ({graph[a][b].where})" for a, b in zip(cycle, cycle[1:]))
                cycles.append(f"  {' -> '.join(cycle)}\n{edges}")
    assert not cycles, (f"{len(cycles)} import cycle(s) between quantlib modules. Break each one by moving the shared "
                        "code down into the lower module (or a new module both import), or by passing it in as an "
                        "argument; a function-local import does not break a cycle, it is still an edge:\n"
                        + "\n".join(cycles))


def test_function_local_imports_are_few_and_explained():
    local = [imp for imp in IMPORTS if imp.local]
    print(f"\n{len(local)} function-local import(s) of quantlib modules:")
    for imp in local:
        print(f"  {imp.where}  {imp.source} -> {', '.join(imp.targets)}  {imp.comment or '(NO REASON)'}")
    unexplained = [imp for imp in local if not re.search(r"[A-Za-z]", DIRECTIVE.sub("", imp.comment.lstrip("#")))]
    assert not unexplained, ("function-local imports without a reason: add a one-line `# why` comment on the import "
                             "line or the line just above it (a bare `# noqa` is not a reason), or move the import "
                             "to the top of the module:\n"
                             + "\n".join(f"  {i.where}  {i.source} -> {', '.join(i.targets)}" for i in unexplained))
    assert len(local) <= MAX_LOCAL_IMPORTS, (f"{len(local)} function-local imports of quantlib modules, at most "
                                             f"{MAX_LOCAL_IMPORTS} allowed: move imports to module level (fixing the "
                                             "layering that made them local) until at most that many remain.")


def test_no_module_over_450_lines():
    long = sorted((len(p.read_text().splitlines()), m, p) for m, p in MODULES.items())
    long = [f"  {p.relative_to(REPO)}: {n} lines" for n, m, p in long if n > MAX_LINES]
    assert not long, (f"modules over {MAX_LINES} lines: split each into smaller modules of the same wing by "
                      "responsibility:\n" + "\n".join(long))


def test_package_root_holds_only_the_api():
    extra = sorted(p.name for p in PKG.glob("*.py") if p.name not in ROOT_FILES)
    assert not extra, (f"quantlib/ holds only {sorted(ROOT_FILES)}; move these into the wing (sub-package) they "
                       f"belong to and update their importers: {extra}")


def test_no_reexports_and_no_private_imports_across_modules():
    reexports = [f"  {i.where}" for i in ALL_IMPORTS if i.noqa_f401 and i.rel not in F401_ALLOWED]
    private = [f"  {i.where}  from {i.base} import {n}" for i in IMPORTS for n in i.names
               if n.startswith("_") and not n.endswith("__") and i.targets != [i.source]]
    assert not reexports, ("`# noqa: F401` imports (re-exports) outside quantlib/api.py, quantlib/catalog/__init__.py "
                           "and quantlib/kernels/__init__.py: drop the import and make callers import the name from "
                           "the module that defines it:\n" + "\n".join(reexports))
    assert not private, ("private names imported from another module: make the name public (drop the leading `_`) "
                         "in the module that defines it, or move the caller's code there:\n" + "\n".join(private))


# The wings from the top (the API) down: a module imports only modules of its own wing or of wings below it, so a
# newcomer can read the package bottom-up and a change to a lower wing never needs a higher one.
WING_ORDER = ["api", "jobs", "config", "evaluation", "checkpoint", "kernels", "runner", "solvers", "stats", "access",
              "formats", "transforms", "artifacts", "catalog", "errors"]


def _wing(module: str) -> str:
    parts = module.split(".")
    # the package root (`quantlib`) and its command line (`python -m quantlib`) serve the API
    return "api" if len(parts) == 1 or parts[1] == "__main__" else parts[1]


def test_wings_import_only_downwards():
    wings = {_wing(m) for m in MODULES}
    assert wings <= set(WING_ORDER), f"wings not placed in WING_ORDER: {sorted(wings - set(WING_ORDER))}"
    upward = [f"{imp.where}: {imp.source} ({_wing(imp.source)}) imports {t} ({_wing(t)})"
              for imp in IMPORTS for t in imp.targets
              if WING_ORDER.index(_wing(t)) < WING_ORDER.index(_wing(imp.source))]
    assert not upward, ("imports that point up the wings (" + " > ".join(WING_ORDER) + "); move the imported piece "
                        "down to a wing both can import, or the importer up:\n  " + "\n  ".join(upward))
