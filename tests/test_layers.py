"""Layers: the serving package does not import the data generator, and its core not the service around it."""

import ast
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The fine-tune runner (service/loop) runs the training side in process; nothing else in service/ may.
LOOP_MAY_IMPORT = ("models.finetune", "models.export", "models.bank", "models.net", "models.fit", "models.novelty")
TRAINING_CORE = ("stain", "fit", "finetune", "net", "export", "bank", "novelty", "augment")


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offences(files: list[Path], forbidden: Callable[[str], bool]) -> list[str]:
    """``file:line: statement`` for every import (top-level or not) of a name that ``forbidden`` refuses."""
    found = []
    for path in files:
        rel = path.relative_to(REPO)
        package = list(rel.with_suffix("").parts[:-1])
        tree = ast.parse(path.read_text(), str(rel))
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in sorted(nodes, key=lambda n: n.lineno):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:  # from-import: resolve relative ones against this file's package
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module if a.name == "*" else f"{module}.{a.name}" for a in node.names]
            if any(forbidden(n) for n in names):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def py(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_service_does_not_import_models_except_the_loop_runner():
    loop = REPO / "service" / "loop"
    rest = [p for p in py("service") if loop not in p.parents]
    bad = offences(rest, lambda n: under(n, "models"))
    assert not bad, f"service/ outside loop/ must not import models: {bad}"
    bad = offences(py("service/loop"), lambda n: under(n, "models") and not under(n, *LOOP_MAY_IMPORT))
    assert not bad, f"service/loop may import only {', '.join(LOOP_MAY_IMPORT)}: {bad}"


def test_training_core_does_not_import_the_data_generator():
    files = [REPO / "models" / f"{name}.py" for name in TRAINING_CORE]
    bad = offences(files, lambda n: under(n, "models.data"))
    assert not bad, f"training code imports models.data: {bad}"


def test_slides_and_inference_do_not_import_torch_or_the_service_around_them():
    layers = ("torch", "service.http", "service.loop", "service.store")
    bad = offences(py("service/wsi") + py("service/inference"), lambda n: under(n, *layers))
    assert not bad, f"service/wsi and service/inference must not import {', '.join(layers)}: {bad}"


# The order README's "Where things live" gives: a module may import its own layer and those before it.
LAYER_ORDER = (
    ("service.vocabulary", "service.errors", "service.options", "service.fsutil", "service.heap"),
    ("service.wsi",),
    ("service.inference",),
    ("service.integrations",),
    ("service.config",),
    ("service.store",),
    ("service.loop",),
    ("service.http",),
    ("service.api", "service.cli"),
)


def layer_of(name: str) -> int | None:
    return next((i for i, layer in enumerate(LAYER_ORDER) if under(name, *layer)), None)


def test_every_layer_imports_only_itself_and_the_layers_before_it():
    files = [p for p in py("service") if p.name != "__init__.py" or p.parent.name != "service"]
    module = {p: ".".join(p.relative_to(REPO).with_suffix("").parts) for p in files}
    unplaced = [module[p] for p in files if layer_of(module[p]) is None]
    assert not unplaced, f"place these modules in LAYER_ORDER (and README's list): {unplaced}"
    bad = []
    for path in files:
        own = layer_of(module[path])
        bad += offences([path], lambda n, own=own: (layer := layer_of(n)) is not None and layer > own)
    assert not bad, f"an import reaches a later layer: {bad}"
