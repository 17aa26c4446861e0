"""Structure figures of the code base: per package, the largest module and class, the
project imports made inside functions, and the import cycles; plus where trial user
attributes are written and read.

    uv run python benchmarks/structure.py [ROOT]      # ROOT defaults to this checkout

Cycles are strongly connected components of the module import graph, counting imports
inside functions too (they only hide a cycle from the interpreter, not from a reader).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("engine", "workers", "search")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported(node: ast.AST, here: str, known: dict[str, Path]) -> list[str]:
    """Project modules an import statement names (``from a import b`` may name module a.b)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level:
        base = here.rsplit(".", node.level)[0]
        mod = f"{base}.{node.module}" if node.module else base
        names = [mod] + [f"{mod}.{a.name}" for a in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != here and name.split(".")[0] in PACKAGES:
            out.append(name)
    return out


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, int]]:
    """The import graph, and per module the count of project imports inside functions."""
    known = modules(root)
    edges: dict[str, set[str]] = defaultdict(set)
    inside: dict[str, int] = defaultdict(int)
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(node, name, known):
                        inside[name] += 1
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _imported(node, name, known)
                # a package's __init__ re-exporting its own modules is not a cycle
                edges[name].update(t for t in targets if not t.startswith(name + ".")
                                   or not path.name == "__init__.py")
    return edges, inside


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def largest(root: Path) -> dict[str, tuple[tuple[int, str], tuple[int, str]]]:
    """Per package: (lines, module) of the largest module and (lines, class) of the largest class."""
    best: dict[str, tuple[tuple[int, str], tuple[int, str]]] = {}
    for name, path in modules(root).items():
        pkg = name.split(".")[0]
        text = path.read_text()
        mod = (len(text.splitlines()), str(path.relative_to(root)))
        cls = max(((n.end_lineno - n.lineno + 1, f"{name}.{n.name}")
                   for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ClassDef)),
                  default=(0, "-"))
        m0, c0 = best.get(pkg, ((0, "-"), (0, "-")))
        best[pkg] = (max(m0, mod), max(c0, cls))
    return best


def user_attr_sites(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per module: the sites that write a trial's user attributes (``set_user_attr`` on a
    trial, ``user_attrs=`` when enqueuing or creating one) and that read ``user_attrs`` of a
    trial. Study-level attributes (a receiver named ``*study*``) are not counted."""
    writes: dict[str, int] = defaultdict(int)
    reads: dict[str, int] = defaultdict(int)
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("set_user_attr", "set_trial_user_attr") \
                    and "study" not in ast.unparse(node.func.value):
                writes[name] += 1
            elif isinstance(node, ast.Attribute) and node.attr == "user_attrs" \
                    and "study" not in ast.unparse(node.value):
                reads[name] += 1
            elif isinstance(node, ast.keyword) and node.arg == "user_attrs":
                writes[name] += 1
    return writes, reads


def main(root: Path) -> None:
    edges, inside = graph(root)
    loops = cycles(edges)
    big = largest(root)
    print("| package | largest module | largest class | imports inside functions | import cycles |")
    print("|---|---|---|---|---|")
    for pkg in PACKAGES:
        (ml, mn), (cl, cn) = big[pkg]
        n_inside = sum(v for k, v in inside.items() if k.split(".")[0] == pkg)
        n_cycles = sum(1 for c in loops if c[0].split(".")[0] == pkg)
        print(f"| {pkg} | {mn} ({ml}) | {cn} ({cl}) | {n_inside} | {n_cycles} |")
    for c in loops:
        print("cycle:", " <-> ".join(c))
    writes, reads = user_attr_sites(root)
    print(f"trial user attributes written at {sum(writes.values())} sites in {len(writes)} "
          f"modules; read at {sum(reads.values())} sites in {len(reads)} modules")
    for name in sorted(set(writes) | set(reads)):
        print(f"  {name}: {writes.get(name, 0)} writes, {reads.get(name, 0)} reads")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
