"""The package's folders are its layers: a module imports only from its own layer or lower ones,
so that a layer can be read (and tested) without the ones above it."""

import ast
from pathlib import Path

import hetpure_bench

PACKAGE = Path(hetpure_bench.__file__).parent
# Lowest first. base: the cross-cutting modules every layer may use.
LAYERS = [
    {"errors", "registry", "atomic", "threads"},
    {"diffusion"},  # networks, schedules, samplers, noise streams
    {"models", "data"},  # classifiers, the diffusion model zoo, artifacts, downloads, the cache; CIFAR-10
    {"defenses"},
    {"attacks"},
    {"bench"},  # spec, batches, runner, store, sanity checks, costs, statistics
    {"reporting"},  # leaderboards, tables, plots, report, published numbers
    {"cli", "__main__", "__init__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``hetpure_bench`` module ``path`` imports (at any depth), with the line."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
    return [(t, line) for t, line in found if t == "hetpure_bench" or t.startswith("hetpure_bench.")]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    modules = {_layer(_module(p)) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(RANK), sorted(modules - set(RANK))


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(_module(path))
        for target, line in _imports(path):
            if target != "hetpure_bench" and RANK[_layer(target)] > RANK[layer]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_package_top_level_is_its_layers():
    """A newcomer finds every part in one hop: the top level holds the layers' folders, the
    command line, the data loader and the cross-cutting base modules, nothing else."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert top == set(RANK)
