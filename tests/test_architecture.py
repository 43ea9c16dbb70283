"""The package's structure (README, "Architecture"): floors import only downwards, no import circle, and the
on-disk contracts' names are spelled in formats/ only."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mrm_scale"

# floor of each top-level room; a module may import its own floor and those below
FLOORS = {"formats": 0, "ports": 0, "host_memory": 0, "data": 1, "model": 1, "train": 2, "eval": 3, "bench": 4, "experiments": 4,
          "cli": 4, "ds_configs": 0}
# rooms of one floor that still must not import each other
APART = {("data", "model"), ("model", "data")}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [f"{mod}.{a.name}" for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:  # the most specific module named (``from pkg import submodule`` names the submodule)
            if c in known and c != name:
                found.add(c)
                break
    return found


GRAPH = {n: imports_of(n, p, set(modules())) for n, p in modules().items()}


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def test_floors_import_only_downwards():
    bad = []
    for mod, deps in GRAPH.items():
        r = room(mod)
        if r not in FLOORS:
            continue
        for dep in deps:
            d = room(dep)
            if d in FLOORS and (FLOORS[d] > FLOORS[r] or (r, d) in APART):
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_formats_imports_nothing_else_of_the_package():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if room(m) == "formats" for d in deps if room(d) != "formats"]
    assert not bad, bad


def test_no_import_circle():
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
            # a package's __init__ re-exporting its own modules is not a circle between rooms
            if len(comp) > 1 and not all(c.startswith(min(comp, key=len) + ".") or c == min(comp, key=len)
                                         for c in comp):
                circles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, circles


@pytest.mark.parametrize("literal", ["manifest.json", "tokenizer.json", "COMPLETE.json", "run_config.json",
                                     "mrm_config.json", "image_encoder.safetensors", r"^step(\d{8})$",
                                     "step{step:08d}", "[MASK]"])
def test_contract_names_are_spelled_only_in_formats(literal):
    """A string constant of a contract appears (outside docstrings and messages) only in formats/."""
    where = []
    for name, path in modules().items():
        if room(name) == "formats":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value == literal and id(node) not in docs
                    and id(node) not in in_fstring):
                where.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not where, f"{literal!r} spelled outside formats/: {where}"
