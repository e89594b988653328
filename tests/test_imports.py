"""The package's import graph has no cycle (every import counts, also those inside functions)."""

import ast
from pathlib import Path

import accuquant

ROOT = Path(accuquant.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from . import x`` counts as importing
    submodule ``x`` when there is one, else the package)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in files:
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                edges.update(subs)
                if len(subs) < len(node.names):
                    edges.add(target)
        # importing a.b.c runs the packages a and a.b first
        edges |= {".".join(e.split(".")[:k]) for e in edges for k in range(2, e.count(".") + 1)}
        graph[name] = edges - {name} - {p for p in _parents(name)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_is_complete_enough_to_mean_something():
    graph = import_graph()
    assert "accuquant.methods" in graph["accuquant.api"]
    assert "accuquant.methods.accuquant" in graph["accuquant.methods"]  # the package imports what it registers
    assert "accuquant.calibrate.protocol" in graph["accuquant.methods.per_step"]
    assert "accuquant.calibrate" in graph["accuquant.methods.per_step"]  # a submodule's import runs its package
    assert sum(len(v) for v in graph.values()) > 50


def test_the_package_is_shaped_by_its_subpackages():
    """At most about a dozen modules at the top, none over 400 lines (each concept has an owner)."""
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 12, top
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} >= {
        "models", "quant", "backends", "calibrate", "methods", "io", "eval", "cli"}
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


BANNED_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}


def unsafe_loads(source: str) -> list[int]:
    """Lines of ``source`` that could run code when a file is read: an import of pickle (or
    its wrappers), ``torch.load``, ``allow_pickle`` not ``False``, ``use_safetensors=False``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if node.func.attr == "load" and ast.unparse(node.func.value) == "torch":
                lines.append(node.lineno)
            if kw.get("allow_pickle", "False") != "False" or kw.get("use_safetensors") == "False":
                lines.append(node.lineno)
    return lines


def test_nothing_runs_code_on_load():
    """Saved files are safetensors and JSON only: no module of the package can unpickle."""
    probe = ("import pickle\nfrom joblib import load\ntorch.load('m.pt')\nnp.load('a.npy', allow_pickle=True)\n"
             "M.from_pretrained('d', use_safetensors=False)\nnp.load('a.npy')\nsafetensors.torch.load_file('f')\n")
    assert unsafe_loads(probe) == [1, 2, 3, 4, 5]
    offenders = {str(p.relative_to(ROOT)): unsafe_loads(p.read_text()) for p in ROOT.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
