"""`convnext eval` for classifiers: a checkpoint or a published tag on ImageNet as researchers hold it.

The layouts (`data.ImageFolder`: synset folders, any subset, or V2's class-index folders; `data.LabelledFiles`:
a flat folder and a CSV/JSONL file or the devkit's ground truth), the robustness protocols (restricted logits
for ImageNet-A/-R, ReaL labels, ImageNet-C's mCE), the device (CPU, CUDA, torchrun with every image once) and
a results file a sweep appends to, as timm's `validate.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .metrics import PLOT_MAX_CLASSES, evaluate

logger = logging.getLogger(__name__)

RESULT_FIELDS = ("model", "weights", "dataset", "input_size", "crop_pct", "crop_mode", "interpolation", "top1", "top5",
                 "real_top1", "real_top5", "mce", "count", "img_s", "device", "precision", "date")


def evaluate_checkpoint(checkpoint: str | os.PathLike | None = None, data: str | os.PathLike | None = None, *,
                        model: str | None = None, pretrained: str | None = None, key: str | None = None,
                        batch_size: int = 64, workers: int | None = None, precision: str = "fp32",
                        device: str = "auto", input_size: int | None = None, crop_pct: float | None = None,
                        interpolation: str | None = None, crop_mode: str | None = None,
                        labels: str | os.PathLike | None = None, valid_classes: str | None = None,
                        real_labels: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                        results_file: str | os.PathLike | None = None, optimize: bool = True,
                        channels_last: bool | None = None, exif: bool | None = None, progress: bool = True,
                        force: bool = False, split: str | None = None, image_key: str | None = None,
                        label_key: str | None = None) -> dict:
    """Top-1/top-5 (and ReaL, restricted-class or ImageNet-C results) of a classifier on `data`.

    The classifier: `checkpoint` (any supported file; `key` picks e.g. `model_ema`), or `model` with
    `pretrained` (a published tag such as `fb_in1k`, with that weight's preprocessing). `input_size`,
    `crop_pct`, `interpolation`, `crop_mode` override the preprocessing (test-time resolution studies).

    `data`: synset folders (`n01440764/...`, any subset: each maps to its index among the model's classes),
    class-index folders (`0/ .. 999/`, ImageNet-V2), any folder with `labels` (CSV/JSONL, or the ILSVRC2012
    devkit for the flat `ILSVRC2012_val_*.JPEG`), or an ImageNet-C root (`<corruption>/<severity>/<synset>/`:
    top-1 per corruption and severity and the mCE); a root holding `val/` means `val/`; or `hf:PATH_OR_NAME` (a
    Hugging Face dataset) or `wds:DIR` (WebDataset shards): its `split` (default validation; `image_key`,
    `label_key` its columns or member extensions; `data.sources`).
    `valid_classes`: "folder" (the classes present), `imagenet-a`/`imagenet-r`, or a file of indices or
    classes, one per line: the logits are restricted to those (timm's `--valid-labels`). `real_labels`: the
    ReaL `real.json` -> `real_acc1`, `real_acc5`.

    `exif`: apply images' EXIF orientation; None: not for published weights (a tag, or a file without our
    header: timm's and the official loaders read pixels as stored), as in training for our own checkpoints.

    `device` auto|cpu|cuda|cuda:N, `precision` fp32|bf16|fp16 (autocast on CUDA; on the CPU a bf16 model
    through `optimize_for_inference` when `optimize`). Under torchrun every process evaluates its share and
    the counts are summed: every image exactly once. `output`: folder for confusion_matrix.png (<= 100 classes;
    default beside the checkpoint) or most_confused.csv (more classes; only when given); never an existing file
    without `force`. `results_file` (.csv, .json or .jsonl): one row appended per run (`RESULT_FIELDS`).
    """
    root = _check_paths(checkpoint, data, output, results_file, labels)
    _check_inputs(labels, valid_classes, real_labels)
    named = _named_source(data, split, image_key, label_key, labels, real_labels)
    env = _join(device)
    try:
        net, info, weights, published = _load(checkpoint, model, pretrained, key)
        info.preprocess = _override(info.preprocess, input_size, crop_pct, interpolation, crop_mode)
        if info.multi_label and (valid_classes or real_labels or results_file):
            raise ValueError("--valid-classes, --real-labels and --results-file are single-label protocols; this "
                             "classifier was trained with --multi-label (evaluated by mAP and F1)")
        run = _Runner(net, info, env, batch_size=batch_size, workers=workers, precision=precision,
                      optimize=optimize, channels_last=channels_last, progress=progress,
                      exif=not published if exif is None else exif)
        root, res = _evaluate_data(run, root, labels, named, valid_classes, real_labels, (checkpoint, output, force))
        res |= {"model_name": info.model_name, "weights": weights, "classes": info.classes, "root": str(root),
                "device": str(env.device), "precision": precision, "processes": env.world_size,
                "preprocess": info.preprocess.to_dict(), "how": run.how}
        if results_file is not None and env.is_main:
            append_result(results_file, res)
        return res
    finally:
        if env.joined:
            torch.distributed.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class _Processes:
    rank: int
    world_size: int
    device: torch.device
    joined: bool  # the process group was joined here (and is left at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _join(device: str) -> _Processes:
    """This process's place under torchrun (WORLD_SIZE > 1): the process group joined (NCCL on CUDA, gloo on
    the CPU), each process on its own device. Evaluation needs no more: its counts are all-reduced sums."""
    from ..utils import pick_device

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")), world)
    if world == 1 or torch.distributed.is_initialized():
        return _Processes(rank, world, dev, False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return _Processes(rank, world, dev, True)


def _check_paths(checkpoint, data, output, results_file, labels) -> Path:
    from ..utils import inside

    from ..data.sources import kind

    if data is None:
        raise ValueError("--data is required: the images to evaluate on")
    source = kind(data)
    root = Path(str(data)[len(source) + 1:] if source != "folder" else data)
    if not root.is_dir() and source == "folder":
        raise FileNotFoundError(f"data folder not found: {root}")
    for what, path in (("--output", output), ("--results-file", results_file)):
        if path is not None and inside(path, root):
            raise ValueError(f"{what} {path} is inside --data {root}: results must not become part of the data")
    if output is not None and Path(output).exists() and not Path(output).is_dir():
        raise ValueError(f"--output {output} is a file; it must be a folder")
    if results_file is not None:
        suffix = Path(results_file).suffix.lower()
        if suffix not in (".csv", ".json", ".jsonl"):
            raise ValueError(f"--results-file {results_file}: the name must end in .csv, .json or .jsonl")
        if Path(results_file).is_dir():
            raise ValueError(f"--results-file {results_file} is a folder")
        for src in (checkpoint, labels):
            if src is not None and Path(src).exists() and Path(src).resolve() == Path(results_file).resolve():
                raise ValueError(f"--results-file {results_file} is an input of this run; choose another file")
    return root


def _evaluate_data(run, root: Path, labels, named, valid_classes, real_labels, outputs: tuple) -> tuple[Path, dict]:
    """(the root evaluated, its results): an ImageNet-C root, or one set (a folder, `root/val`, labelled files or
    an hf: split)."""
    from ..data.imagenet import corruption_folders

    plain = labels is None and real_labels is None and named is None
    folders = corruption_folders(root, run.info.classes) if plain else None
    if folders:
        return root, _imagenet_c(run, folders, valid_classes)
    root = root / "val" if (root / "val").is_dir() and labels is None and named is None else root
    return root, _one_set(run, root, labels, valid_classes, real_labels, _outputs(*outputs, run.info, root), named)


def _named_source(data, split, image_key, label_key, labels, real_labels) -> tuple | None:
    """(source, split, image key, label key) of an `hf:` / `wds:` --data; None for a folder."""
    from ..data.sources import kind

    if kind(data) == "folder":
        if split or image_key or label_key:
            raise ValueError("--split, --image-key and --label-key are for --data hf:... or wds:... (a Hugging Face "
                             "dataset, WebDataset shards)")
        return None
    if labels is not None or real_labels is not None:
        raise ValueError("--labels / --real-labels name the images of a folder; hf: and wds: data have their labels")
    return str(data), split or "validation", image_key, label_key


def _check_inputs(labels, valid_classes, real_labels) -> None:
    """The files a run reads exist (before anything is loaded or written)."""
    from ..data import DataError
    from ..data.imagenet import TABLES

    if labels is not None and not Path(labels).exists():
        raise DataError(f"labels file not found: {labels}")
    if real_labels is not None and not Path(real_labels).is_file():
        raise DataError(f"ReaL labels file not found: {real_labels}")
    if valid_classes is not None and str(valid_classes) not in ("folder", *TABLES) and not Path(valid_classes).is_file():
        raise DataError(f"--valid-classes {valid_classes}: neither 'folder', a class list ({', '.join(TABLES)}) "
                        f"nor a file")


def _load(checkpoint, model, pretrained, key):
    """(model, InferenceInfo, what the weights are called in results, whether they are published weights) from a
    checkpoint or a published tag."""
    from ..factory import load_for_inference, pretrained_for_inference
    from ..weights import read_model_file

    if checkpoint is not None and (model is not None or pretrained is not None):
        raise ValueError("give either --checkpoint FILE or --model NAME --pretrained TAG, not both")
    expect = None
    if model is None and isinstance(pretrained, str) and pretrained in _published():  # --pretrained arch.tag
        model = pretrained.split(".", 1)[0]
    if checkpoint is None and pretrained is not None and Path(pretrained).exists():  # --pretrained FILE
        checkpoint, expect = pretrained, model
    if checkpoint is not None:
        file = read_model_file(checkpoint)
        net, info = load_for_inference(file, key=key)
        if expect is not None and info.model_name != expect.partition(".")[0]:
            raise ValueError(f"{checkpoint} holds a {info.model_name}, not {expect}; use --model {info.model_name}")
        return net, info, str(checkpoint), not file.version
    if model is None:
        raise ValueError("nothing to evaluate: give --checkpoint FILE, or --model NAME with --pretrained TAG")
    net, info = pretrained_for_inference(model, True if pretrained is None else pretrained)
    cfg = getattr(net, "pretrained_cfg", None)
    tag = next((t for t, w in _published().items() if w is cfg), None)
    return net, info, tag or str(pretrained), True


def _published() -> dict:
    from ..weights import PRETRAINED

    return PRETRAINED


def _override(pre, input_size, crop_pct, interpolation, crop_mode):
    """The preprocessing with the given fields replaced; a new size keeps the crop mode unless one is given."""
    changes = {k: v for k, v in (("input_size", input_size), ("crop_pct", crop_pct),
                                 ("interpolation", interpolation), ("crop_mode", crop_mode)) if v is not None}
    return dataclasses.replace(pre, **changes) if changes else pre


def _outputs(checkpoint, output, force, info, root) -> dict[str, Path | None]:
    """Where the confusion plot (<= PLOT_MAX_CLASSES classes) or the most confused pairs go: checked before the
    evaluation runs, so that a refused file costs nothing."""
    from ..utils import check_output, inside

    inputs = tuple(p for p in (checkpoint,) if p is not None)
    if len(info.classes) <= PLOT_MAX_CLASSES:
        folder = Path(output) if output is not None else Path(checkpoint).resolve().parent if checkpoint else None
        if folder is None or inside(folder, root):
            return {"png": None, "csv": None}
        return {"png": check_output(folder / "confusion_matrix.png", inputs=inputs, force=force), "csv": None}
    if output is None:
        return {"png": None, "csv": None}
    return {"png": None, "csv": check_output(Path(output) / "most_confused.csv", inputs=inputs, force=force)}


class _Runner:
    """The model on its device, run over any number of datasets: one loader per dataset (this process's
    share under torchrun), optimized once for the CPU, timed."""

    def __init__(self, model, info, env, *, batch_size: int, workers: int | None, precision: str, optimize: bool,
                 channels_last: bool | None, progress: bool, exif: bool) -> None:
        from ..data import eval_transform
        from ..utils import PRECISIONS

        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
        cuda = env.device.type == "cuda"
        self.env, self.info, self.exif = env, info, exif
        self.transform = eval_transform(info.preprocess, normalize=False)  # uint8: normalised per batch, on device
        self.batch_size, self.workers = batch_size, _workers(workers, env)
        self.precision, self.progress = precision, progress and env.is_main
        self.channels_last = cuda if channels_last is None else channels_last
        self.model = _Normalized(model.to(env.device), info.preprocess)
        self.optimize = optimize and not cuda and precision in ("fp32", "bf16")
        self.how = f"eager, autocast {precision}" if precision != "fp32" else "eager"
        self.run_precision = precision

    def loader(self, dataset):
        from torch.utils.data import DataLoader

        from ..data import ShardSampler, collate

        if self.info.multi_label:
            import functools

            collate = functools.partial(_collate_multi_label, num_classes=len(self.info.classes))
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers, collate_fn=collate,
                          sampler=ShardSampler(len(dataset), self.env.rank, self.env.world_size),
                          pin_memory=self.env.device.type == "cuda", persistent_workers=False)

    def prepare(self, dataset, calls: int) -> None:
        """`optimize_for_inference` once, on a batch of `dataset`, for `calls` batches to come."""
        if not self.optimize:
            return
        from ..models.optimize import optimize_for_inference

        self.optimize = False
        example = next((b.inputs for b in self.loader(dataset) if b.inputs is not None), None)
        if example is None:
            return
        fast = optimize_for_inference(self.model.model, precision=self.precision,
                                      example_input=self.model.normalize(example), expected_calls=calls)
        self.model.model, self.how, self.run_precision = fast, fast.how, "fp32"  # it takes fp32 images

    def __call__(self, dataset, *, valid=None, real=None, desc: str = "eval") -> dict:
        from ..utils import all_reduce_max

        from .metrics import evaluate_multi_label

        loader = self.loader(dataset)
        start = time.perf_counter()
        if self.info.multi_label:
            res = evaluate_multi_label(self.model, loader, self.env.device, len(self.info.classes),
                                       precision=self.run_precision, progress=self.progress)
        else:
            res = evaluate(self.model, loader, self.env.device, len(self.info.classes), precision=self.run_precision,
                           channels_last=self.channels_last, progress=self.progress, desc=desc, valid=valid, real=real)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        seconds = all_reduce_max(torch.tensor([time.perf_counter() - start], dtype=torch.float64,
                                              device=self.env.device))
        res["seconds"] = float(seconds.item())
        res["img_s"] = res["count"] / res["seconds"] if res["seconds"] > 0 else 0.0
        return res


def _collate_multi_label(items, num_classes: int):
    """A multi-label classifier's batches: class-folder (one class) and listed (several) targets alike multi-hot."""
    from ..data.folder import collate_multi_label

    return collate_multi_label([(x, t if isinstance(t, tuple) else (t,), i) for x, t, i in items], num_classes)


class _Normalized(torch.nn.Module):
    """The model on uint8 image batches: normalised first (`data.normalize_batch`), on the model's device."""

    def __init__(self, model: torch.nn.Module, pre) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        from ..data.transforms import normalize_batch

        return normalize_batch(images, self.mean, self.std) if images.dtype == torch.uint8 else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def _workers(workers: int | None, env) -> int:
    """Loader workers: as given, else sized for the device: on CUDA up to 8 per process from this machine's
    cores; on the CPU none (a worker takes a core from the model: measured slower on 2 cores)."""
    if workers is not None:
        if not (isinstance(workers, int) and workers >= 0):
            raise ValueError(f"--workers must be 0 or more, got {workers!r}")
        return workers
    if env.device.type != "cuda":
        return 0
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, (os.cpu_count() or 2) // per_node - 1))


def _dataset(root: Path, labels, run: _Runner, named: tuple | None = None):
    from ..data import ImageFolder, LabelledFiles

    if named is not None:
        from ..data.sources import open_split

        data, split, image_key, label_key = named
        return open_split(data, split, run.transform, classes=run.info.classes, seed=None, exif=run.exif,
                          image_key=image_key, label_key=label_key, multi_label=run.info.multi_label)
    if labels is not None:
        return LabelledFiles(root, labels, transform=run.transform, classes=run.info.classes, seed=None, exif=run.exif,
                             multi_label=run.info.multi_label)
    return ImageFolder(root, transform=run.transform, classes=run.info.classes, seed=None, exif=run.exif)


def _one_set(run: _Runner, root: Path, labels, valid_classes, real_labels, out: dict, named: tuple | None = None) -> dict:
    from ..plots import plot_confusion

    info = run.info
    dataset = _dataset(root, labels, run, named)
    valid = valid_indices(valid_classes, dataset, info.classes)
    real = real_targets(real_labels, dataset, info.classes) if real_labels is not None else None
    run.prepare(dataset, math.ceil(len(dataset) / run.batch_size / run.env.world_size))
    res = run(dataset, valid=valid, real=real)
    if info.multi_label:
        return res | {"multi_label": True}
    confused = [(info.classes[t], info.classes[p], k) for t, p, k in res["confused"]]
    if run.env.is_main and out["png"] is not None:
        plot_confusion(res["confusion"], info.classes, out["png"],
                       title=f"{info.model_name}: top-1 {res['acc1']:.2f}% on {res['count']} images")
    if run.env.is_main and out["csv"] is not None:
        _write_confused(out["csv"], confused)
    return res | {"confused": confused, "confusion_png": str(out["png"]) if out["png"] else None,
                  "confused_csv": str(out["csv"]) if out["csv"] else None,
                  "valid_classes": len(valid) if valid is not None else None}


def _write_confused(path: Path, confused: list) -> None:
    import csv
    import io

    from ..data.imagenet import display_name
    from ..utils import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["truth", "truth_name", "predicted", "predicted_name", "images"])
    w.writerows([t, display_name(t), p, display_name(p), k] for t, p, k in confused)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


def valid_indices(spec: str | os.PathLike | None, dataset, classes: Sequence[str]) -> list[int] | None:
    """The class indices the logits are restricted to: None (all), "folder" (the classes that have images in
    `dataset`), an ImageNet subset table (`imagenet-a`, `imagenet-r`), or a file with one class per line (an
    index, as timm's `imagenet_a_indices.txt`, a class id or an unambiguous name). Every image's class must be
    one of them."""
    from ..data import DataError
    from ..data.folder import _label_lookup
    from ..data.imagenet import TABLES, synsets

    if spec is None:
        return None
    present = sorted(set(dataset.targets))
    if spec == "folder":
        return present
    lookup = _label_lookup(classes)
    if str(spec) in TABLES and not Path(spec).exists():
        names, where = list(synsets(str(spec))), f"the {spec} class list"
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"--valid-classes {spec}: neither 'folder', a class list ({', '.join(TABLES)}) nor a file")
        names, where = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()], str(path)
    bad = [n for n in names if n not in lookup]
    if bad:
        raise DataError(f"{where}: {len(bad)} class(es) the model does not know: {', '.join(bad[:5])}")
    valid = sorted({lookup[n] for n in names})
    outside = sorted(set(present) - set(valid))
    if outside:
        raise DataError(f"--valid-classes {spec}: {len(outside)} class(es) of the data are not among them: "
                        f"{', '.join(classes[i] for i in outside[:5])}")
    return valid


def real_targets(path: str | os.PathLike, dataset, classes: Sequence[str]) -> list[list[int]]:
    """Per image of `dataset`, its ReaL labels (by file name; [] for the images ReaL leaves unlabelled)."""
    from ..data import DataError
    from ..data.imagenet import read_real_labels, synsets

    if list(classes) != list(synsets("imagenet-1k")):
        raise DataError("ReaL labels are ImageNet-1k indices; this model's classes are not ImageNet-1k's 1000")
    table = read_real_labels(path)
    names = [os.path.basename(p) for p, _ in dataset.samples]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} image(s) of the data have no ReaL entry (e.g. {unknown[0]}); ReaL "
                        f"covers the ImageNet validation images ILSVRC2012_val_00000001 .. 00050000.JPEG")
    return [table[n] for n in names]


def _imagenet_c(run: _Runner, folders: list[tuple[str, str, Path]], valid_classes) -> dict:
    """Every corruption and severity of ImageNet-C: top-1 of each, the mCE (AlexNet-normalised) and the totals."""
    from ..data import ImageFolder
    from ..data.imagenet import ALEXNET_ERR, SEVERITIES, mean_corruption_error

    sets = [(c, s, ImageFolder(folder, transform=run.transform, classes=run.info.classes, seed=None, exif=run.exif))
            for c, s, folder in folders]
    run.prepare(sets[0][2], sum(math.ceil(len(d) / run.batch_size / run.env.world_size) for _, _, d in sets))
    per: dict[str, dict[str, dict]] = {}
    for c, s, ds in sets:
        per.setdefault(c, {})[s] = run(ds, valid=valid_indices(valid_classes, ds, run.info.classes), desc=f"{c}/{s}")
    errors = {c: {s: 1 - r["acc1"] / 100 for s, r in sev.items()} for c, sev in per.items()}
    mce, used = mean_corruption_error(errors)
    partial = sorted(c for c, sev in per.items() if set(sev) != set(SEVERITIES))
    if partial:
        logger.warning("ImageNet-C: %s lack(s) some of the 5 severities; their errors are means over those present",
                       ", ".join(partial))
    if mce is not None and len(used) < len(ALEXNET_ERR):
        logger.warning("ImageNet-C: the mCE is over %d of the 15 corruptions (%s), not the published protocol",
                       len(used), ", ".join(used))
    results = [r for sev in per.values() for r in sev.values()]
    n = sum(r["count"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    per_corruption = {c: {"top1": {s: r["acc1"] for s, r in sorted(sev.items())},
                          "mean_top1": sum(r["acc1"] for r in sev.values()) / len(sev),
                          "ce": (100 * sum(errors[c].values()) / len(errors[c]) / ALEXNET_ERR[c]) if c in ALEXNET_ERR
                          else None} for c, sev in sorted(per.items())}
    return {"acc1": sum(r["acc1"] * r["count"] for r in results) / max(n, 1),
            "acc5": sum(r["acc5"] * r["count"] for r in results) / max(n, 1),
            "loss": sum(r["loss"] * r["count"] for r in results) / max(n, 1), "count": n,
            "bad_images": sum(r["bad_images"] for r in results), "mce": mce, "mce_corruptions": used,
            "per_corruption": per_corruption, "seconds": seconds, "img_s": n / seconds if seconds > 0 else 0.0,
            "confused": [], "confusion_png": None, "confused_csv": None, "valid_classes": None}


def result_row(res: dict) -> dict[str, Any]:
    """One row of a results file (`RESULT_FIELDS`) from `evaluate_checkpoint`'s results."""
    pre = res["preprocess"]

    def rounded(key: str) -> float | None:
        return round(res[key], 3) if res.get(key) is not None else None

    return {"model": res["model_name"], "weights": res["weights"], "dataset": res["root"],
            "input_size": pre["input_size"], "crop_pct": pre["crop_pct"], "crop_mode": pre["crop_mode"],
            "interpolation": pre["interpolation"], "top1": rounded("acc1"), "top5": rounded("acc5"),
            "real_top1": rounded("real_acc1"), "real_top5": rounded("real_acc5"), "mce": rounded("mce"),
            "count": res["count"], "img_s": round(res["img_s"], 1), "device": res["device"],
            "precision": res["precision"], "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def append_result(path: str | os.PathLike, res: dict) -> None:
    """Append the run's row to a CSV (header written once, and checked on every later run), a JSON list or a
    JSON-lines file; the earlier rows are kept (the file is rewritten atomically)."""
    import csv
    import io
    import json

    from ..data import DataError
    from ..utils import atomic_write

    path, row = Path(path), result_row(res)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if path.suffix.lower() == ".csv":
        lines = old.splitlines()
        if lines and lines[0].split(",") != list(RESULT_FIELDS):
            raise DataError(f"{path}: its header is not a convnext results file's ({','.join(RESULT_FIELDS)})")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
        if not lines:
            w.writeheader()
        w.writerow(row)
        text = (old if not old or old.endswith("\n") else old + "\n") + buf.getvalue()
    elif path.suffix.lower() == ".jsonl":
        text = (old if not old or old.endswith("\n") else old + "\n") + json.dumps(row) + "\n"
    else:
        try:
            rows = json.loads(old) if old.strip() else []
        except json.JSONDecodeError:
            rows = None
        if not isinstance(rows, list):
            raise DataError(f"{path} is not a JSON list of results; nothing was written")
        text = json.dumps([*rows, row], indent=1) + "\n"
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_results(res: dict, style: str = "text") -> str:
    """`evaluate_checkpoint`'s results as `convnext eval` prints them: JSON, or totals, then per-class accuracy
    (or per corruption and severity for ImageNet-C)."""
    if style == "json":
        return _json(res)
    if res.get("multi_label"):
        return _multi_label_lines(res)
    from ..data.imagenet import display_name

    lines = [f"{res['model_name']} ({res['weights']}) on {res['root']}: {res['count']} images  "
             f"top-1 {res['acc1']:.2f}%  top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}"
             + (f"  ({res['bad_images']} unreadable skipped)" if res["bad_images"] else "")]
    if res.get("real_acc1") is not None:
        lines.append(f"  ReaL top-1 {res['real_acc1']:.2f}%  top-5 {res['real_acc5']:.2f}%  "
                     f"({res['real_count']} images with ReaL labels)")
    if res.get("valid_classes"):
        lines.append(f"  logits restricted to {res['valid_classes']} classes")
    if res.get("per_corruption") is not None:
        lines += _corruption_lines(res)
    else:
        seen = res["per_class_count"]
        shown = [(f"{c} {display_name(c)}" if display_name(c) != c else c, acc, n) for c, acc, n in
                 zip(res["classes"], res["per_class_acc"], seen, strict=True) if n or len(seen) <= PLOT_MAX_CLASSES]
        width = max((len(c) for c, _, _ in shown), default=0)
        lines += [f"  {c:<{width}}  {acc:6.2f}%  ({n} images)" for c, acc, n in shown]
        if res["confusion_png"]:
            lines.append(f"confusion matrix: {res['confusion_png']}")
        else:
            lines.append("most confused (truth -> predicted, images): "
                         + ("; ".join(f"{display_name(t)} -> {display_name(p)} {k}" for t, p, k in res["confused"])
                            or "none") + (f"  (saved: {res['confused_csv']})" if res.get("confused_csv") else ""))
    lines.append(f"{res['img_s']:.1f} img/s on {res['device']} x{res['processes']} ({res['precision']}; model run: "
                 f"{res['how']}); preprocessing {_describe(res['preprocess'])}")
    return "\n".join(lines)


def _multi_label_lines(res: dict) -> str:
    lines = [f"{res['model_name']} ({res['weights']}) on {res['root']}: {res['count']} images, several classes "
             f"each  mAP {res['mAP']:.2f}%  F1 {res['f1']:.2f}% (at 0.5)  loss {res['loss']:.4f}"
             + (f"  ({res['bad_images']} unreadable skipped)" if res["bad_images"] else "")]
    width = max((len(c) for c in res["classes"]), default=0)
    lines += [f"  {c:<{width}}  AP {'-' if a is None else f'{100 * a:6.2f}%'}  F1 {'-' if f is None else f'{100 * f:6.2f}%'}"
              for c, a, f in zip(res["classes"], res["per_class_ap"], res["per_class_f1"], strict=True)]
    lines.append(f"{res['img_s']:.1f} img/s on {res['device']} x{res['processes']} ({res['precision']})")
    return "\n".join(lines)


def _corruption_lines(res: dict) -> list[str]:
    out = []
    for c, r in res["per_corruption"].items():
        sev = "  ".join(f"{s}: {a:5.2f}" for s, a in r["top1"].items())
        ce = f"  CE {r['ce']:.1f}" if r["ce"] is not None else ""
        out.append(f"  {c:<18} top-1 by severity  {sev}  mean {r['mean_top1']:.2f}%{ce}")
    if res["mce"] is not None:
        out.append(f"  mCE {res['mce']:.2f}% (AlexNet-normalised, over {len(res['mce_corruptions'])} corruptions)")
    return out


def _describe(pre: dict) -> str:
    return f"{pre['input_size']}px, crop_pct {pre['crop_pct']:g} ({pre['crop_mode']}), {pre['interpolation']}"


def _json(res: dict) -> str:
    import json

    keep = ("model_name", "weights", "root", "loss", "acc1", "acc5", "count", "bad_images", "per_class_acc",
            "classes", "confused", "real_acc1", "real_acc5", "real_count", "valid_classes", "mce", "mce_corruptions",
            "per_corruption", "img_s", "seconds", "device", "precision", "processes", "preprocess", "how",
            "multi_label", "mAP", "f1", "per_class_ap", "per_class_f1")
    out = {k: res[k] for k in keep if k in res}
    if res.get("confusion") is not None and len(res["classes"]) <= PLOT_MAX_CLASSES:
        out["confusion"] = res["confusion"].tolist()
    return json.dumps(out)
