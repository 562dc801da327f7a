"""The layering of ARCHITECTURE.md, enforced: which part may import which, and short engine functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "convnext"
BASE = {"utils", "preprocess"}  # everything may import these two; they import nothing of ours
# part -> the parts it may import (besides itself and BASE). Lazy imports inside functions count too.
ALLOWED = {
    "utils": set(), "preprocess": set(),
    "models": set(),  # torch only: models know no files, no data, no weights
    "weights": {"models"},
    "data": set(),  # data knows no model
    "factory": {"models", "weights"},
    "dense": {"factory", "models", "weights"},  # detectors and segmenters on the backbone; no data, no training
    "fcmae": {"factory", "models", "weights"},  # the pre-training model; no data, no training
    "plots": set(),
    "eval": {"data", "factory", "models", "weights", "plots", "export", "dense"},  # stands without training
    "export": {"eval", "factory", "models", "weights", "data"},
    "bench": {"factory", "models", "weights", "eval", "export"},  # stands without training
    "train": {"data", "factory", "models", "weights", "plots", "eval", "dense", "fcmae"},
    "demo": {"data", "eval", "train", "plots"},
    "cli": {"factory", "weights", "train", "eval", "export", "bench", "demo", "models", "__init__"},
    "__init__": {"factory", "models", "weights"},
    "__main__": {"cli"},
}
MODELS_MAY_IMPORT = {"torch", "__future__"}  # third-party modules allowed in models/ (plus the standard library)


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    module = ".".join(("convnext", *path.relative_to(SRC).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        package = module.rsplit(".__init__", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # `from . import x`: x is a module, or a name of the package itself
                    folder = SRC.parent.joinpath(*name.split("."))
                    out += [(f"{name}.{a.name}" if (folder / f"{a.name}.py").exists() or (folder / a.name).is_dir()
                             else f"{name}.__init__", node.lineno) for a in node.names]
                    continue
            else:
                name = node.module
            out.append((name, node.lineno))
    return out


def _violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        part = _part(path)
        allowed = ALLOWED[part] | BASE | {part}
        for name, line in _imports(path):
            where = f"{path.relative_to(SRC.parent)}:{line} imports {name}"
            if name.startswith("convnext."):
                target = name.split(".")[1]
                if part in BASE and target != part:
                    found.append(f"{where} ({part} must import nothing of ours)")
                elif target not in allowed:
                    found.append(f"{where} ({part} may import only {sorted(allowed)})")
            elif part == "models":
                top = name.split(".")[0]
                if top not in MODELS_MAY_IMPORT and top not in sys.stdlib_module_names:
                    found.append(f"{where} (models import torch only)")
    return found


def test_every_part_is_in_the_table():
    assert {_part(p) for p in SRC.rglob("*.py")} == set(ALLOWED)


def test_import_rules_hold():
    assert _violations() == []


def test_the_checker_catches_a_forbidden_import(tmp_path, monkeypatch):
    bad = SRC / "data" / "_forbidden_probe.py"
    bad.write_text("def f():\n    from ..models import ConvNeXt\n    from ..train import fit\n")
    try:
        v = _violations()
    finally:
        bad.unlink()
    assert len(v) == 2 and all("_forbidden_probe" in x for x in v)


def test_import_convnext_needs_only_torch():
    code = ("import sys, convnext; heavy = {'torchvision', 'timm', 'transformers', 'onnx', 'onnxruntime', "
            "'matplotlib', 'yaml', 'PIL'} & set(sys.modules); print(sorted(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("folder", ["train"])
def test_engine_functions_are_short(folder):
    long = []
    for path in (SRC / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} {n} lines")
    assert long == []
