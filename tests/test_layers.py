"""The library is laid out like the pipeline: each module belongs to one layer, and no module imports from a layer
above its own (ast sees every import, those inside functions too)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fusesoup"

# Lowest first: the core every layer uses, then the DAG's order; the bootstrap builds the offline default's models
# with the training loop, so it sits on top.
LAYERS = [
    ("core", ["fusesoup", "errors", "params", "storage", "batching", "cli", "profiles"]),
    ("corpus", ["corpus"]),
    ("models", ["models", "tokenizer_families", "token_bytes", "gguf", "pin"]),
    ("logits", ["logits"]),
    ("align", ["align"]),
    ("fuse", ["fusion", "fusion_store"]),
    ("train", ["train"]),
    ("soup", ["soup"]),
    ("evaluate", ["evaluate", "compare", "harness", "report", "report_figures"]),
    ("bootstrap", ["bootstrap"]),
]


def layer_of(module: str) -> int:
    """The layer of `fusesoup.<top>[.rest]`, by its top-level name."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "fusesoup"
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; add it to the layer it belongs to")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "fusesoup" or name.startswith("fusesoup.")}


def upward_imports(found: dict[str, Path]) -> list[str]:
    """`module (layer) imports name (layer)` for every import of a module from a layer above its own."""
    return [f"{module} ({LAYERS[layer_of(module)][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
            for module, path in found.items() for name in sorted(imports(path))
            if layer_of(name) > layer_of(module)]


def test_no_module_imports_from_a_layer_above_its_own():
    upward = upward_imports(modules())
    assert not upward, "\n".join(upward)


def test_an_upward_import_is_reported(tmp_path):
    module = tmp_path / "reader.py"
    module.write_text("def f():\n    from fusesoup.train.loss import clm_loss\n    from fusesoup.storage import read_json\n")
    assert upward_imports({"fusesoup.corpus.reader": module}) == [
        "fusesoup.corpus.reader (corpus) imports fusesoup.train.loss (train)"]
