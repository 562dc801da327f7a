"""Deployment: export a model to ONNX, TorchScript, torch.export or OpenVINO IR, and run the exported files.

Every exported file carries its preprocessing (`model`, `classes`, `input_size`, `crop_pct`,
`interpolation`, `mean`, `std`) as JSON: ONNX metadata property `convnext`, the extra file
`convnext.json` inside a TorchScript / torch.export archive, or the OpenVINO IR's rt_info
`convnext` (an IR is `name.xml` plus its weights `name.bin`). The model is fused for inference
first (`fuse_for_inference`: fewer nodes, same logits) and exported with a dynamic batch size and,
for ONNX and torch.export, a dynamic image size (height and width >= 64; TorchScript's trace is
shape-generic too). Exported files are programs: load only files you trust.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .utils import atomic_write, check_output, file_mode, temp_file

if TYPE_CHECKING:
    from .factory import InferenceInfo

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "torch-export": ".pt2", "openvino": ".xml"}
BACKENDS = {"onnxruntime": "onnx", "torchscript": "torchscript", "torch-export": "torch-export", "openvino": "openvino"}
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}  # OpenVINO's INFERENCE_PRECISION_HINT
MIN_SIZE = 64  # smallest dynamic height/width (torch.export specialises stage outputs of size 1)
_META = "convnext.json"


def _dynamic_shapes(size: bool) -> dict:
    from torch.export import Dim

    dims = {0: Dim("batch", min=1, max=4096)}
    if size:
        dims |= {2: Dim("height", min=MIN_SIZE, max=8192), 3: Dim("width", min=MIN_SIZE, max=8192)}
    return {"x": dims}


def export_model(model: nn.Module, info: InferenceInfo, path: str | os.PathLike, fmt: str, *,
                 dynamic_size: bool = True, opset: int | None = None) -> Path:
    """Write `model` (a ConvNeXt) in format `fmt` to `path` atomically; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if fmt == "torch-export" and path.suffix != ".pt2":
        raise ValueError(f"torch.export archives must end in .pt2, got {path.name}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    model = copy.deepcopy(model).float().fuse_for_inference()
    input_size = info.preprocess.input_size
    size = max(input_size, MIN_SIZE) if dynamic_size else input_size
    example = torch.randn(2, model.cfg.in_chans, size, size)
    meta = json.dumps(info.to_dict() | {"format": fmt, "dynamic_size": dynamic_size})

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporters' deprecation/progress chatter
            if fmt == "onnx":
                _export_onnx(model, example, tmp, meta, dynamic_size, opset)
            elif fmt == "torchscript":
                traced = torch.jit.freeze(torch.jit.trace(model, example))
                torch.jit.save(traced, tmp, _extra_files={_META: meta})
            else:
                program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_size))
                torch.export.save(program, tmp, extra_files={_META: meta})
    if fmt == "openvino":
        _export_openvino(model, example, path, meta, dynamic_size)
    else:
        atomic_write(path, write, suffix=path.suffix)
    return path


def _export_openvino(model: nn.Module, example: torch.Tensor, path: Path, meta: str, dynamic_size: bool) -> None:
    """IR `path` (.xml) + `path.with_suffix('.bin')`, written beside as temporaries and renamed (weights first)."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ValueError("OpenVINO export needs the openvino package: pip install 'convnext[deploy]'") from e
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR is an .xml file (with its .bin beside it), got {path.name}")
    shape = [-1, example.shape[1], -1, -1] if dynamic_size else [-1, *example.shape[1:]]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(model, example_input=example, input=[ov.PartialShape(shape)])
    ov_model.set_rt_info(meta, ["convnext"])
    tmp = Path(temp_file(path.parent, prefix=f".{path.stem}.", suffix=".xml"))
    try:
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)  # writes tmp and tmp.with_suffix(".bin")
        for p in (tmp.with_suffix(".bin"), tmp):
            os.chmod(p, file_mode())
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)


def _export_onnx(model: nn.Module, example: torch.Tensor, tmp: str, meta: str, dynamic_size: bool,
                 opset: int | None) -> None:
    try:
        import onnx
    except ImportError as e:
        raise ValueError("ONNX export needs the onnx and onnxscript packages: pip install 'convnext[deploy]'") from e
    import contextlib
    import io
    import logging

    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO chatter under our CLI's logging
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes(dynamic_size),
                                    input_names=["images"], output_names=["logits"], opset_version=opset)
    proto = program.model_proto
    proto.metadata_props.add(key="convnext", value=meta)
    onnx.save_model(proto, tmp)  # weights inline: one file (< 2 GB; convnextv2_huge is 2.6 GB in fp32)


def read_export_metadata(path: str | os.PathLike) -> tuple[str, InferenceInfo]:
    """(format, preprocessing) of an exported file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load_model(str(path), load_external_data=False).metadata_props}
        raw = props.get("convnext")
    elif path.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(str(path))
        raw = model.get_rt_info(["convnext"]).astype(str) if model.has_rt_info(["convnext"]) else None
    else:
        import zipfile

        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a TorchScript or torch.export archive (export one with `convnext export`)")
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == _META]
            raw = z.read(names[0]).decode() if names else None
    if raw is None:
        raise ValueError(f"{path}: no convnext metadata; export the model with `convnext export`")
    from .factory import InferenceInfo

    meta = json.loads(raw)
    return meta["format"], InferenceInfo.from_dict(meta)


def default_output(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """`<stem><suffix>` beside the checkpoint, or `<stem>.<format><suffix>` where that would be the checkpoint."""
    src = Path(checkpoint)
    out = src.with_suffix(FORMATS[fmt])
    return out if out.name != src.name else src.with_name(f"{src.stem}.{fmt}{FORMATS[fmt]}")


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None, *,
                      key: str | None = None, input_size: int | None = None, dynamic_size: bool = True,
                      force: bool = False) -> tuple[Path, InferenceInfo]:
    """`convnext export`: a checkpoint (ours or any supported layout) -> an exported file with its preprocessing.

    Never writes over the checkpoint; an existing output only with `force`.
    """
    from .factory import HUB_FORMATS, load_for_inference

    if fmt in HUB_FORMATS:
        return export_hub_folder(checkpoint, fmt, output, key=key, input_size=input_size, force=force)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join([*FORMATS, *HUB_FORMATS])}")
    out = check_output(output or default_output(checkpoint, fmt), inputs=(checkpoint,), force=force)
    if fmt == "openvino":  # its weights file too
        check_output(out.with_suffix(".bin"), inputs=(checkpoint,), force=force)
    if input_size is not None and input_size < 32:
        raise ValueError(f"--input-size must be >= 32 (the network downsamples 32x), got {input_size}")
    model, info = load_for_inference(checkpoint, key=key)
    if not dynamic_size and info.preprocess.input_size < 32:
        raise ValueError(f"--static-size: the input size {info.preprocess.input_size} is below 32 (the network "
                         f"downsamples 32x); pass --input-size")
    if input_size:
        info = dataclasses.replace(info, preprocess=dataclasses.replace(info.preprocess, input_size=input_size))
    return export_model(model, info, out, fmt, dynamic_size=dynamic_size), info


def export_hub_folder(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None, *,
                      key: str | None = None, input_size: int | None = None, license: str | None = None,
                      force: bool = False) -> tuple[Path, InferenceInfo]:
    """`convnext export --format hub|transformers`: a checkpoint -> a Hub model folder (`factory.save_pretrained`)
    with its class names and preprocessing, and a model card from the run beside it (config.yaml, metrics.jsonl)."""
    from .factory import load_for_inference, save_pretrained

    src = Path(checkpoint)
    out = Path(output) if output else src.with_name(f"{src.stem}-{fmt}")
    if out.resolve() == src.resolve() or (src.is_dir() and out.resolve() in src.resolve().parents):
        raise ValueError(f"the output {out} is (or holds) the input {src}: choose another output")
    model, info = load_for_inference(checkpoint, key=key)
    if input_size:
        info = dataclasses.replace(info, preprocess=dataclasses.replace(info.preprocess, input_size=input_size))
    if info.multi_label:
        raise ValueError(f"{checkpoint} is a multi-label classifier (a sigmoid per class): timm's and transformers' "
                         f"folders declare a softmax classifier; export --format onnx keeps its meaning")
    details, metrics, source_license = _run_card(src)
    save_pretrained(model, out, format=fmt, classes=info.classes, preprocess=info.preprocess,
                    license=license or source_license, details=details, metrics=metrics, force=force)
    return out, info


def _run_card(checkpoint: Path) -> tuple[dict[str, str], str | None, str | None]:
    """(model card details, a metrics table, the licence of the weights it was fine-tuned from) of the training
    run a checkpoint lies in (its config.yaml and metrics.jsonl), or nothing when it lies in no run."""
    import yaml

    from .weights import PRETRAINED

    run = checkpoint.parent
    details: dict[str, str] = {"Weights": f"{checkpoint.name} of the run in {run.name}/"}
    cfg: dict = {}
    if (run / "config.yaml").is_file():
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    start = cfg.get("finetune")
    license = PRETRAINED[start].license if isinstance(start, str) and start in PRETRAINED else None
    if cfg:
        details["Data"] = str(cfg.get("data"))
        details["Initialised from"] = str(start or "random (trained from scratch)")
        keys = ("epochs", "batch_size", "lr", "weight_decay", "layer_decay", "drop_path_rate", "aa", "mixup", "cutmix",
                "smoothing", "reprob", "model_ema", "precision", "input_size", "seed")
        details["Recipe"] = ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg)
    rows = []
    if (run / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    names = [k for k in ("epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "val_mAP", "val_f1")
             if any(k in r for r in rows)]
    table = None
    if rows and names:
        cells = [[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in names]
                 for r in rows[-10:]]
        table = "\n".join("| " + " | ".join(row) + " |" for row in [names, ["---"] * len(names), *cells])
    return details, table, license


class ExportedModel:
    """An exported model as a callable: (N, C, H, W) float tensor -> (N, classes) logits tensor."""

    def __init__(self, path: str | os.PathLike, backend: str, threads: int | None = None,
                 precision: str = "fp32") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of torch, {', '.join(BACKENDS)}")
        fmt, self.info = read_export_metadata(path)
        if BACKENDS[backend] != fmt:
            raise ValueError(f"{path} is a {fmt} export; backend {backend} needs a {BACKENDS[backend]} export")
        self.backend = backend
        if backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or torch.get_num_threads()
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        elif backend == "openvino":
            import openvino as ov

            config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        elif backend == "torchscript":
            self._module = torch.jit.load(str(path), map_location="cpu")
        else:
            self._module = torch.export.load(str(path)).module()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnxruntime":
            return torch.from_numpy(self._session.run(None, {"images": x.float().contiguous().numpy()})[0])
        if self.backend == "openvino":
            return torch.from_numpy(self._compiled(x.float().contiguous().numpy())[0])
        with torch.no_grad():
            return self._module(x)
