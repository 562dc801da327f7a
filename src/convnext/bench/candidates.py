"""The candidates of a benchmark: ours and each peer's model, built on the same weights and input."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..factory import create_model
from ..utils import autocast

PEERS = ("timm", "torchvision", "onnxruntime", "openvino")
_TORCHVISION = {"convnext_tiny", "convnext_small", "convnext_base", "convnext_large"}


@dataclass
class Spec:
    """What a candidate is; picklable, so that a fresh process can rebuild it to measure memory."""

    library: str  # convnext | timm | torchvision | onnxruntime | openvino
    variant: str  # eager | optimized / optimized-eager (ours) | compile (freezing for inference) | onnx | ir
    layout: str  # nchw | channels_last
    model: str
    batch_size: int
    input_size: int
    mode: str
    precision: str
    device: str
    threads: int

    @property
    def label(self) -> str:
        extra = "" if self.variant == "eager" else f"+{self.variant}"
        return f"{self.library}{extra} ({self.layout})"

    @property
    def peer(self) -> str:
        """The configuration ratios are taken against: a library, its compiled form counted apart."""
        return self.library + ("+compile" if self.variant == "compile" else "")


def _build_module(spec: Spec, state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    if spec.library == "convnext":
        model = create_model(spec.model)
    elif spec.library == "timm":
        import timm

        model = timm.create_model(spec.model)
    else:
        import torchvision

        model = torchvision.models.get_model(spec.model)
    if state_dict is not None:
        from ..weights import from_ours

        fmt = "ours" if spec.library == "convnext" else spec.library
        target = model.state_dict()  # timm's conv_mlp variants (atto..nano) hold 1x1 conv weights
        model.load_state_dict({k: v.reshape(target[k].shape) for k, v in from_ours(state_dict, fmt).items()})
    return model


def _exported_step(spec: Spec, state_dict: dict[str, torch.Tensor] | None, workdir: str,
                   x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """ONNX Runtime or OpenVINO on our model exported with `convnext export` (same weights)."""
    from ..eval import InferenceInfo
    from ..export import FORMATS, ExportedModel, export_model
    from ..preprocess import Preprocess

    fmt = "onnx" if spec.library == "onnxruntime" else "openvino"
    path = os.path.join(workdir, f"{spec.model}{FORMATS[fmt]}")
    if not os.path.exists(path):
        model = _build_module(Spec(**{**spec.__dict__, "library": "convnext"}), state_dict)
        info = InferenceInfo(spec.model, [str(i) for i in range(1000)], Preprocess(input_size=spec.input_size))
        export_model(model, info, path, fmt, dynamic_size=False)
    runner = ExportedModel(path, spec.library, threads=spec.threads, precision=spec.precision)
    return lambda: runner(x)


def build(spec: Spec, state_dict: dict[str, torch.Tensor] | None, workdir: str) -> Callable[[], torch.Tensor]:
    """A zero-argument step (one batch of inference, or one training step) for a candidate."""
    device = torch.device(spec.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch_size, 3, spec.input_size, spec.input_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (spec.batch_size,), generator=gen).to(device)
    if spec.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.library in ("onnxruntime", "openvino"):
        return _exported_step(spec, state_dict, workdir, x)
    model = _build_module(spec, state_dict).to(device)
    if spec.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if spec.mode == "infer":
        return _infer_step(spec, model.eval(), x)

    model.train()
    if spec.library == "convnext" and spec.precision == "bf16" and device.type == "cpu":
        from ..models.fast import use_fused_depthwise_backward

        use_fused_depthwise_backward(model, True)  # as the engine runs a long bf16 run (compiled in the warm-up)
    if spec.variant == "compile":
        model = torch.compile(model)
    # AdamW as each library's training runs it: ours fused (our engine), the peers' default (foreach)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=spec.library == "convnext" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16" and device.type == "cuda")
    if spec.variant.startswith("optimized"):  # what the engine runs with --compile: the faster forward measured here
        from ..models.optimize import optimize_for_training

        step = optimize_for_training(model, opt, precision=spec.precision, example_batch=(x, target),
                                     compile=spec.variant == "optimized")

        def train_optimized() -> torch.Tensor:
            return step(x, target)
        train_optimized.detail = step.how + "".join(  # type: ignore[attr-defined]
            f"; {k} {v:.0f} ms" for k, v in step.timings_ms.items()) + (
            f"; compiling {step.compile_s:.1f} s" if step.compile_s else "")
        return train_optimized

    def train_step() -> torch.Tensor:
        with autocast(device, spec.precision):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return train_step


def _infer_step(spec: Spec, model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    if spec.variant.startswith("optimized"):  # what `convnext predict/eval` run: the fastest path found here
        from ..models.optimize import optimize_for_inference

        optimized = optimize_for_inference(model, precision=spec.precision, example_input=x,
                                           compile=spec.variant == "optimized")

        def infer_optimized() -> torch.Tensor:
            return optimized(x)
        infer_optimized.detail = optimized.how + "".join(  # type: ignore[attr-defined]
            f"; {k} {v:.0f} ms" for k, v in optimized.timings_ms.items())
        return infer_optimized
    if spec.variant == "compile":
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model)

        def infer_compiled() -> torch.Tensor:
            with torch.inference_mode(), autocast(x.device, spec.precision), inductor_config.patch(freezing=True):
                return compiled(x)  # freezing: weights become constants, folded and pre-packed
        return infer_compiled

    def infer() -> torch.Tensor:
        with torch.inference_mode(), autocast(x.device, spec.precision):
            return model(x)
    return infer


def candidates(base: dict, compare: list[str], compile: bool, optimize: str = "compile") -> list[Spec]:
    """Ours (eager; optimized for inference; compiled if asked), then each peer (eager in both
    layouts, and compiled with `compile`), ONNX Runtime and OpenVINO on our exported model."""
    specs = [Spec("convnext", "eager", "nchw", **base)]
    if optimize != "off" and (base["mode"] == "infer" or (base["mode"] == "train" and optimize == "compile")):
        specs.append(Spec("convnext", "optimized" if optimize == "compile" else "optimized-eager", "nchw", **base))
    if compile and base["mode"] == "train":
        specs.append(Spec("convnext", "compile", "nchw", **base))
    for peer in compare:
        if peer == "timm" or (peer == "torchvision" and base["model"] in _TORCHVISION):
            specs += [Spec(peer, "eager", layout, **base) for layout in ("nchw", "channels_last")]
            if compile:
                specs.append(Spec(peer, "compile", "channels_last", **base))
        elif peer in ("onnxruntime", "openvino") and _exported_applies(peer, base):
            specs.append(Spec(peer, "onnx" if peer == "onnxruntime" else "ir", "nchw", **base))
    return specs


def _exported_applies(peer: str, base: dict) -> bool:
    precisions = ("fp32",) if peer == "onnxruntime" else ("fp32", "bf16")
    return base["mode"] == "infer" and base["precision"] in precisions and base["device"] == "cpu"


def skipped_peers(base: dict, compare: list[str]) -> dict[str, str]:
    """Why each asked-for peer that cannot run here is left out."""
    why = {}
    for peer in compare:
        try:
            __import__(peer)
        except ImportError:
            why[peer] = f"not installed (pip install {peer})"
            continue
        if peer == "torchvision" and base["model"] not in _TORCHVISION:
            why[peer] = f"has no {base['model']}"
        elif peer in ("onnxruntime", "openvino") and not _exported_applies(peer, base):
            why[peer] = f"benchmarked for CPU inference in {'fp32' if peer == 'onnxruntime' else 'fp32 and bf16'} only"
    return why
