"""The package's layering, read from the source with `ast` (imports inside functions included): no import
cycles, and no edge the design forbids (docs/architecture.md, "Layers")."""
import ast
import os

from conftest import ROOT

PKG = os.path.join(ROOT, "tinyfusion")
COMMANDS = {"prune", "finetune", "train", "sample", "evaluate", "compare", "convert", "extract_features",
            "train_classifier", "plan"}


def modules():
    """module name -> path, for every .py under tinyfusion/ (the C++ extension counts as a module)."""
    out = {"tinyfusion._C": None}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def imported(name, path, mods, node):
    """The project modules an Import/ImportFrom node brings in (the longest known prefix of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        # `from . import x` names submodules or attributes of the package, not the package itself
        names = ([prefix] if node.module else []) + [f"{prefix}.{a.name}" for a in node.names]
    found = set()
    for full in names:
        parts = full.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                found.add(".".join(parts[:i]))
                break
    tools = [full for full in names if full.split(".")[0] in ("bench", "export")]
    return found | set(tools[:1])  # a tool imported from the library: reported below


def import_graph():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        graph[name] = set()
        if path is None:
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                # a module's own parent packages are initialized before it: not an edge
                graph[name] |= {m for m in imported(name, path, mods, node) if m != name and not name.startswith(m + ".")}
    return graph


def part(name):
    """tinyfusion.models.dit -> models; a top-level module -> its own name."""
    return name.split(".")[1] if name.count(".") >= 1 else name


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def edges(graph):
    return [(a, b) for a, targets in graph.items() for b in targets]


def test_no_import_cycles():
    """A cycle hidden inside a function still makes the two modules one unit (neither can be read,
    tested or moved alone): every import counts."""
    found = cycles(import_graph())
    assert not found, found


def test_the_parts_depend_one_way():
    """The design's arrows: models and diffusion import nothing above them (models may use diffusion's
    schedule for MAR's diffusion head; diffusion imports no model); kernels import torch and triton only;
    pruning never imports recovery; the library never imports a command, bench/ or export/. The error
    type is the one shared basic every part may import."""
    allowed_below = {
        "models": {"models", "diffusion", "errors"},
        "diffusion": {"diffusion", "errors"},
        "kernels": {"kernels", "errors"},
    }
    bad = []
    for a, b in edges(import_graph()):
        pa = part(a)
        if not b.startswith("tinyfusion"):
            bad.append((a, b, "imports a tool outside the package"))
            continue
        pb = part(b)
        if pa in allowed_below and pb not in allowed_below[pa]:
            bad.append((a, b, f"{pa} may import only {sorted(allowed_below[pa])}"))
        if pa == "pruning" and pb == "recovery":
            bad.append((a, b, "pruning never imports recovery"))
        if pa not in COMMANDS and pb in COMMANDS and b.count(".") == 1:
            bad.append((a, b, "a library module imports a command"))
    assert not bad, "\n".join(f"{a} -> {b}: {why}" for a, b, why in bad)


def test_only_commands_and_the_shared_basics_at_the_top_level():
    """Every library module lives in one of the parts; the top level holds the commands, the package
    __init__, the error type and the C++ extension."""
    top = {os.path.splitext(f)[0] for f in os.listdir(PKG) if f.endswith(".py")}
    assert top - COMMANDS - {"__init__", "errors"} == set()


def test_the_checker_sees_a_cycle_and_a_forbidden_edge():
    """The checker itself: a cycle through a function-level import and a diffusion -> models edge."""
    graph = {"tinyfusion.a.x": {"tinyfusion.b.y"}, "tinyfusion.b.y": {"tinyfusion.a.x"}, "tinyfusion.c.z": set()}
    assert cycles(graph) == [["tinyfusion.a.x", "tinyfusion.b.y"]]
    tree = ast.parse("def f():\n    from ..models.dit import DiT\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    mods = {"tinyfusion.models.dit": "x", "tinyfusion.models": "x/__init__.py", "tinyfusion.diffusion.flow": "y"}
    assert imported("tinyfusion.diffusion.flow", "y.py", mods, node) == {"tinyfusion.models.dit"}
