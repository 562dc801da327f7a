"""Prediction: the one loop over images that every task's predictor runs in, and the classifier's predictor.

A predictor (`tasks.TaskSpec.predictor`) is built for a checkpoint and the images it will see, and called
on lists of at most `batch_size` image paths, one result dict per image (`error` for an unreadable one);
`finish()` writes what needs all of them (detection's detections.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..data import IMG_EXTENSIONS, load_rgb
from ..factory import InferenceInfo, load_for_inference


def expand_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (recursively, sorted); error for anything missing."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image or folder not found: {p}")
    seen: set[Path] = set()
    out = [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]  # each image once
    if not out:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, inputs))}")
    return out


def output_names(paths: list[Path], patterns: tuple[str, ...] = ("{}.png",)) -> dict[Path, list[Path]]:
    """Each input's output files (`patterns` formatted with its name): its path relative to the inputs' common
    folder without the extension, made unique when two inputs would share one (`x.png` and `x.jpg`; `x.jpg`'s
    `x_mask.png` and an input `x_mask.png`) by adding the extension, then a number. No two outputs of one run
    are ever the same file."""
    import itertools

    if not paths:
        return {}
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    used: set[Path] = set()
    out: dict[Path, list[Path]] = {}
    for p in paths:
        rel = p.resolve().relative_to(common).with_suffix("")
        ext = p.suffix.lstrip(".").lower() or "file"
        for name in itertools.chain([rel.name, f"{rel.name}_{ext}"], (f"{rel.name}_{ext}{i}" for i in itertools.count(2))):
            names = [rel.with_name(pattern.format(name)) for pattern in patterns]
            if not used & set(names) and len(set(names)) == len(names):
                break
        used |= set(names)
        out[p] = names
    return out


def check_topk(topk: int | None, num_classes: int) -> int:
    """`topk`, or the default (5, or all classes if fewer); a value outside 1..num_classes is an error."""
    if topk is None:
        return min(5, num_classes)
    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    if topk > num_classes:
        raise ValueError(f"--topk must be between 1 and {num_classes} (the model's classes), got {topk}")
    return topk


@torch.no_grad()
def predict(model: nn.Module, info: InferenceInfo, paths: list[Path], *, topk: int | None = None,
            batch_size: int = 32, threshold: float | None = None) -> list[dict]:
    """Top-k classes per image (default k: 5, or all classes if fewer), each {index, class, name,
    probability} (`name`: an ImageNet synset's readable name, else the class); unreadable images get an
    `error` instead. A multi-label classifier (`info.multi_label`): a sigmoid per class, and `top` holds every
    class whose probability is at least `threshold` (default 0.5), most probable first (at most `topk` when
    given), with `threshold` in the row."""
    threshold = check_threshold(threshold, info)
    k = check_topk(topk, len(info.classes)) if not info.multi_label or topk is not None else len(info.classes)
    transform = info.transform()
    results: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk, tensors, rows = paths[start:start + batch_size], [], []
        for p in chunk:
            try:
                tensors.append(transform(load_rgb(p)))
                rows.append({"path": str(p)})
            except Exception as e:  # noqa: BLE001 - report per image, keep going
                results.append({"path": str(p), "error": f"{type(e).__name__}: {e}"})
        if tensors:
            logits = model(torch.stack(tensors)).float()
            if not bool(torch.isfinite(logits).all()):
                raise FloatingPointError(f"the model's outputs are not finite (NaN/inf) for {rows[0]['path']} "
                                         f"and its batch: its predictions would mean nothing")
            results += _top_classes(logits, rows, info, k, threshold)
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["path"]])


def check_threshold(threshold: float | None, info: InferenceInfo) -> float | None:
    """`--threshold`: a probability in (0, 1) for a multi-label classifier (default 0.5); an error for a
    single-label one (its softmax has no per-class decision to threshold)."""
    if not info.multi_label:
        if threshold is not None:
            raise ValueError(f"--threshold is for multi-label classifiers; {info.model_name} scores one class per "
                             f"image (use --topk)")
        return None
    if threshold is None:
        return 0.5
    if not 0 < threshold < 1:
        raise ValueError(f"--threshold must be between 0 and 1 (a probability), got {threshold}")
    return threshold


def _top_classes(logits: torch.Tensor, rows: list[dict], info: InferenceInfo, k: int,
                 threshold: float | None) -> list[dict]:
    """`rows` with their classes: the top `k` of a softmax, or (multi-label) the sigmoids >= `threshold`."""
    from ..data.imagenet import display_name

    probs = logits.sigmoid() if info.multi_label else logits.softmax(dim=1)
    top = probs.topk(k, dim=1)
    for row, values, idx in zip(rows, top.values, top.indices, strict=True):
        pairs = [(v, i) for v, i in zip(values.tolist(), idx.tolist(), strict=True)
                 if threshold is None or v >= threshold]
        row["top"] = [{"index": i, "class": info.classes[i], "name": display_name(info.classes[i]),
                       "probability": float(v)} for v, i in pairs]
        if threshold is not None:
            row["threshold"] = threshold
    return rows


class ClassifierPredictor:
    """Top-k classes of images, with a checkpoint or (`backend` other than torch) an exported model.

    With the torch backend and `optimize`, the model runs through `optimize_for_inference` in
    `precision` (compiled only when there are enough images to earn the compile back).
    """

    batch_size = 32

    def __init__(self, checkpoint: str | os.PathLike, paths: list[Path], *, backend: str = "torch",
                 key: str | None = None, topk: int | None = None, precision: str = "fp32",
                 optimize: bool = True, threshold: float | None = None) -> None:
        if topk is not None and topk < 1:
            raise ValueError(f"--topk must be >= 1, got {topk}")
        if backend == "torch":
            model, info = load_for_inference(checkpoint, key=key)
            check_topk(topk, len(info.classes))  # before any optimizing
            check_threshold(threshold, info)
            if optimize:
                from ..models.optimize import optimize_for_inference

                example = _first_batch(info, paths[:self.batch_size])
                model = optimize_for_inference(model, precision=precision, example_input=example,
                                               expected_calls=-(-len(paths) // self.batch_size))
            elif precision != "fp32":
                raise ValueError("--precision bf16 needs the optimized model (drop --no-optimize)")
        else:
            from ..export import ExportedModel

            model = ExportedModel(checkpoint, backend, precision=precision)
            info = model.info
            check_threshold(threshold, info)
        self.model, self.info, self.topk, self.threshold = model, info, topk, threshold

    def __call__(self, paths: list[Path]) -> list[dict]:
        return predict(self.model, self.info, paths, topk=self.topk, batch_size=self.batch_size,
                       threshold=self.threshold)

    def finish(self) -> None:
        pass


def run_predictor(predictor, paths: list[Path]) -> list[dict]:
    """`predictor` over `paths` in its batches, then `finish()`; the results in the order of `paths`."""
    results: list[dict] = []
    for start in range(0, len(paths), predictor.batch_size):
        results += predictor(paths[start:start + predictor.batch_size])
    predictor.finish()
    return results


def predict_images(make_predictor, checkpoint: str | os.PathLike, inputs: list[str | os.PathLike],
                   **options) -> list[dict]:
    """Image files and folders -> `make_predictor(checkpoint, paths, **options)` run over them (any task's)."""
    from ..utils import inside

    paths = expand_images(inputs)
    output = options.get("output")
    for folder in (Path(i) for i in inputs):
        if output is not None and folder.is_dir() and inside(output, folder):
            raise ValueError(f"--output {output} is inside the input folder {folder}: its pictures would become inputs")
    return run_predictor(make_predictor(checkpoint, paths, **options), paths)


def predict_files(checkpoint: str | os.PathLike, inputs: list[str | os.PathLike], *, backend: str = "torch",
                  key: str | None = None, topk: int | None = None, precision: str = "fp32",
                  optimize: bool = True, threshold: float | None = None) -> list[dict]:
    """`convnext predict`: top-k classes of image files and folders with a checkpoint or an exported model
    (a multi-label classifier's: the classes over `threshold`)."""
    if topk is not None and topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    return predict_images(ClassifierPredictor, checkpoint, inputs, backend=backend, key=key, topk=topk,
                          precision=precision, optimize=optimize, threshold=threshold)


def _first_batch(info: InferenceInfo, paths: list[Path]) -> torch.Tensor | None:
    """The readable images among `paths`, as a batch (for timing the inference paths), or None."""
    transform, tensors = info.transform(), []
    for p in paths:
        try:
            tensors.append(transform(load_rgb(p)))
        except Exception:  # noqa: BLE001 - predict reports it
            continue
    return torch.stack(tensors) if tensors else None


def format_predictions(results: list[dict], style: str = "text") -> str:
    """Predictions as `convnext predict` prints them: "text", "json" or "csv"."""
    if style == "json":
        return json.dumps(results, indent=2)
    if style == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "rank", "index", "class", "name", "probability", "error"])
        for r in results:
            for k, t in enumerate(r.get("top", []), 1):
                w.writerow([r["path"], k, t["index"], t["class"], t["name"], f"{t['probability']:.6f}", ""])
            if "error" in r:
                w.writerow([r["path"], "", "", "", "", "", r["error"]])
        return buf.getvalue().rstrip("\n")
    return "\n".join(f"{r['path']}: unreadable ({r['error']})" if "error" in r else
                     f"{r['path']}: " + (", ".join(f"{t['name']} {100 * t['probability']:.1f}%" for t in r["top"])
                                         or f"no class at {100 * r['threshold']:g}% or more")
                     for r in results)
