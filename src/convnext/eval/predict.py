"""Load a trained checkpoint for inference (model + classes + preprocessing) and classify images."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IMG_EXTENSIONS, eval_transform, load_rgb
from ..factory import create_model, infer_model_name
from ..preprocess import Preprocess
from ..weights import FORMAT_TAG, CheckpointError, read_checkpoint, to_ours, unwrap


@dataclass
class InferenceInfo:
    """What a trained model needs besides its weights: its name, class names and preprocessing."""

    model_name: str
    classes: list[str]
    preprocess: Preprocess = field(default_factory=Preprocess)

    def transform(self):
        return eval_transform(self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON (what exported files embed): model_name, classes and the preprocessing fields."""
        return {"model_name": self.model_name, "classes": list(self.classes), **self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InferenceInfo:
        return cls(d["model_name"], list(d["classes"]), Preprocess.from_dict(d))


def load_for_inference(path: str | os.PathLike, *, key: str | None = None) -> tuple[nn.Module, InferenceInfo]:
    """A model in eval mode and what it needs: class names and eval preprocessing.

    Reads our `best.safetensors` (metadata), a training state `last.pt` (config + classes), or any
    other supported checkpoint (class names are then the indices, preprocessing the defaults).
    """
    obj, metadata = read_checkpoint(path)
    if metadata.get("format") == FORMAT_TAG:  # our best.safetensors / converted weights
        name = metadata.get("model")
        pre = json.loads(metadata.get("preprocess", "{}"))
        classes = json.loads(metadata["classes"]) if "classes" in metadata else None
    elif "config" in obj and "classes" in obj and "model" in obj:  # our training state (last.pt)
        name, classes = obj["model_name"], list(obj["classes"])
        pre = obj["config"]  # input_size, crop_pct (Preprocess takes its own keys)
    else:
        name, classes, pre = None, None, {}
    sd = unwrap(obj, key)
    _, ours = to_ours(sd)
    name = name or infer_model_name(ours, path)
    model = create_model(name, pretrained=ours).eval()
    classes = classes or [str(i) for i in range(model.num_classes)]
    if len(classes) != model.num_classes:
        raise CheckpointError(f"{path}: {len(classes)} class names for a {model.num_classes}-class model")
    return model, InferenceInfo(name, classes, Preprocess.from_dict(pre))


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
    if not out:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, inputs))}")
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
            batch_size: int = 32) -> list[dict]:
    """Top-k (class, probability) per image (default k: 5, or all classes if fewer); unreadable
    images get an `error` instead."""
    topk = check_topk(topk, len(info.classes))
    transform = info.transform()
    k = topk
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
            probs = model(torch.stack(tensors)).float().softmax(dim=1)
            top = probs.topk(k, dim=1)
            for row, values, idx in zip(rows, top.values, top.indices):
                row["top"] = [(info.classes[i], float(v)) for v, i in zip(values.tolist(), idx.tolist())]
                results.append(row)
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["path"]])


def predict_files(checkpoint: str | os.PathLike, inputs: list[str | os.PathLike], *, backend: str = "torch",
                  key: str | None = None, topk: int | None = None, precision: str = "fp32",
                  optimize: bool = True, batch_size: int = 32) -> list[dict]:
    """`convnext predict`: top-k classes of image files and folders with a checkpoint or an exported model.

    With the torch backend and `optimize`, the model runs through `optimize_for_inference` in
    `precision` (compiled only when there are enough images to earn the compile back).
    """
    if topk is not None and topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    paths = expand_images(inputs)
    if backend == "torch":
        model, info = load_for_inference(checkpoint, key=key)
        check_topk(topk, len(info.classes))  # before any optimizing
        if optimize:
            from ..models.optimize import optimize_for_inference

            example = _first_batch(info, paths[:batch_size])
            model = optimize_for_inference(model, precision=precision, example_input=example,
                                           expected_calls=-(-len(paths) // batch_size))
        elif precision != "fp32":
            raise ValueError("--precision bf16 needs the optimized model (drop --no-optimize)")
    else:
        from ..export import ExportedModel

        model = ExportedModel(checkpoint, backend, precision=precision)
        info = model.info
    return predict(model, info, paths, topk=topk, batch_size=batch_size)


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
        w.writerow(["path", "rank", "class", "probability", "error"])
        for r in results:
            for k, (c, p) in enumerate(r.get("top", []), 1):
                w.writerow([r["path"], k, c, f"{p:.6f}", ""])
            if "error" in r:
                w.writerow([r["path"], "", "", "", r["error"]])
        return buf.getvalue().rstrip("\n")
    return "\n".join(f"{r['path']}: unreadable ({r['error']})" if "error" in r else
                     f"{r['path']}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in r["top"]) for r in results)
