"""The import graph: every arrow points down the layers in README's layout table, no cycle anywhere, no private
name imported from another module. Imports inside functions count as much as those at the top of a module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reformer_jax", "benchmarks")

# Lowest first; a module may import its own layer's modules and any lower layer's, never a higher one's.
LAYERS = (
    ("foundations", ("reformer_jax.kernels", "reformer_jax.sharding", "reformer_jax.tokenizers", "reformer_jax.xla",
                     "reformer_jax.errors")),
    ("model", ("reformer_jax.model",)),
    ("decoding", ("reformer_jax.decoding",)),
    ("training", ("reformer_jax.training",)),
    ("entry points", ("reformer_jax", "main")),  # the package's public modules and command lines, main.py
    ("benchmarks", ("benchmarks",)),
)


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def modules():
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")] + [ROOT / "main.py"]
    out = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known):
    """(imported module, name or None, line) for every import of this repository's modules in `path`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full, None, node.lineno) if full in known else (base, alias.name, node.lineno)


def graph():
    known = modules()
    return known, {m: list(imports(m, p, known)) for m, p in known.items()}


def test_no_arrow_points_up_the_layers():
    _, edges = graph()
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {target} ({LAYERS[layer_of(target)][0]}), line {line}"
              for m, targets in edges.items() for target, _, line in targets if layer_of(target) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    known, edges = graph()
    arrows = {m: sorted({t for t, _, _ in targets if t in known and t != m}) for m, targets in edges.items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    arrows = {m: [t for t in ts if not t.startswith(m + ".")] for m, ts in arrows.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in arrows.get(m, []):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(arrows):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    _, edges = graph()
    private = [f"{m}: from {target} import {name} (line {line})" for m, targets in edges.items()
               for target, name, line in targets if name and name.startswith("_")]
    assert not private, "\n".join(private)


def test_the_layers_are_the_ones_the_readme_shows():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    order = [section.index(f"| {name} |") for name, _ in LAYERS if f"| {name} |" in section]
    assert len(order) == len(LAYERS) and order == sorted(order), "README's layout table lists the layers in order"
