"""The layering of ARCHITECTURE.md, enforced: which part may import which, and short engine functions."""

import ast
import subprocess
import sys
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src" / "convnext"
BASE = {"utils", "preprocess"}  # everything may import these two; they import nothing of ours
# part -> the parts it may import (besides itself and BASE). Lazy imports inside functions count too.
ALLOWED = {
    "utils": set(), "preprocess": set(),
    "models": set(),  # torch only: models know no files, no data, no weights
    "weights": {"models"},
    "data": set(),  # data knows no model
    "factory": {"models", "weights", "data"},  # data: InferenceInfo.transform (lazily)
    "dense": {"factory", "models", "weights"},  # detectors and segmenters on the backbone; no data, no training
    "fcmae": {"factory", "models", "weights"},  # the pre-training model; no data, no training
    "plots": set(),
    "eval": {"data", "factory", "models", "weights", "plots", "export", "dense"},  # stands without training
    "export": {"eval", "factory", "models", "weights", "data"},
    "bench": {"factory", "models", "weights", "eval", "export", "data"},  # stands without training
    "tasks": set(),  # the registry: imports the task modules by name only (BUILTIN), never statically
    "train": {"data", "factory", "models", "weights", "plots", "eval", "dense", "fcmae", "export", "tasks"},
    "demo": {"tasks"},
    "cli": {"factory", "weights", "train", "eval", "export", "bench", "demo", "models", "tasks", "__init__",
            "data"},  # `convnext data pack|info`
    "__init__": {"factory", "models", "weights"},
    "__main__": {"cli"},
}
MODELS_MAY_IMPORT = {"torch", "__future__"}  # third-party modules allowed in models/ (plus the standard library)


def _part(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, src: Path = SRC) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    module = ".".join(("convnext", *path.relative_to(src).with_suffix("").parts))
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
                    folder = src.parent.joinpath(*name.split("."))
                    out += [(f"{name}.{a.name}" if (folder / f"{a.name}.py").exists() or (folder / a.name).is_dir()
                             else f"{name}.__init__", node.lineno) for a in node.names]
                    continue
            else:
                name = node.module
            out.append((name, node.lineno))
    return out


def _violations(src: Path = SRC) -> list[str]:
    found = []
    for path in sorted(src.rglob("*.py")):
        part = _part(path, src)
        allowed = ALLOWED[part] | BASE | {part}
        for name, line in _imports(path, src):
            where = f"{path.relative_to(src.parent)}:{line} imports {name}"
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


def _copy_of_src(tmp_path: Path) -> Path:
    """A copy of the package to plant probes in (the real tree is never written)."""
    import shutil

    return Path(shutil.copytree(SRC, tmp_path / "convnext", ignore=shutil.ignore_patterns("__pycache__", "photos")))


def test_the_checker_catches_a_forbidden_import(tmp_path):
    src = _copy_of_src(tmp_path)
    (src / "data" / "_forbidden_probe.py").write_text("def f():\n    from ..models import ConvNeXt\n"
                                                      "    from ..train import fit\n")
    v = _violations(src)
    assert len(v) == 2 and all("_forbidden_probe" in x for x in v)


def test_import_convnext_needs_only_torch():
    code = ("import sys, convnext; heavy = {'torchvision', 'timm', 'transformers', 'onnx', 'onnxruntime', "
            "'matplotlib', 'yaml', 'PIL'} & set(sys.modules); print(sorted(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_functions_are_short():
    """No function of the library longer than 60 lines (read like the paper; split what does two things)."""
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} {n} lines")
    assert long == []


def _module(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(("convnext", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file; `from pkg import name` of a package
    is an edge to the package's __init__ unless `name` is a submodule)."""
    files = {_module(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for name, _ in _imports(path, src):
            if not name.startswith("convnext"):
                continue
            name = name.removesuffix(".__init__")
            while name not in files and "." in name:  # `from .x import attr` -> module x
                name = name.rsplit(".", 1)[0]
            if name in files and name != module:
                graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_catches_a_cycle(tmp_path):
    """A probe module and a lazy import back into it (inside a function: those count too) make a cycle."""
    src = _copy_of_src(tmp_path)
    (src / "eval" / "_cycle_probe.py").write_text("def f():\n    from ..export import export_model\n")
    export = src / "export.py"
    export.write_text(export.read_text() + "\n\ndef _probe():\n    from .eval._cycle_probe import f\n")
    assert _cycles(_import_graph(src)) == [["convnext.eval._cycle_probe", "convnext.export"]]
