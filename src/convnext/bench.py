"""Side-by-side speed benchmark: this library against timm, torchvision and ONNX Runtime, in one run.

All candidates get the same weights (ours, converted to each peer's layout) and the same input.
They run interleaved (A B C A B C ...) after warm-up, so that drifts of a shared machine hit every
candidate alike; we report medians and the ratio ours/peer against each peer's fastest layout
(NCHW or channels_last). Achieved GFLOP/s uses FLOPs counted by `torch.utils.flop_counter` (2 per
multiply-accumulate; forward, or forward + backward for training) and is compared with this
machine's matmul peak measured in the same run. Peak memory is the peak RSS increase of one
candidate alone in a fresh process (CPU) or `torch.cuda.max_memory_allocated` (CUDA).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .factory import check_model_name, create_model

PEERS = ("timm", "torchvision", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16")
_TORCHVISION = {"convnext_tiny", "convnext_small", "convnext_base", "convnext_large"}


@dataclass
class Spec:
    """What a candidate is; picklable, so that a fresh process can rebuild it to measure memory."""

    library: str  # convnext | timm | torchvision | onnxruntime
    variant: str  # eager | fused | compile | onnx ...
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


@dataclass
class Result:
    spec: Spec
    times: list[float] = field(default_factory=list)
    setup_s: float = 0.0
    peak_mib: float | None = None
    max_abs_diff: float | None = None


def _dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
        from .weights.convert import from_ours

        fmt = "ours" if spec.library == "convnext" else spec.library
        target = model.state_dict()  # timm's conv_mlp variants (atto..nano) hold 1x1 conv weights
        model.load_state_dict({k: v.reshape(target[k].shape) for k, v in from_ours(state_dict, fmt).items()})
    return model


def build(spec: Spec, state_dict: dict[str, torch.Tensor] | None, workdir: str) -> Callable[[], torch.Tensor]:
    """A zero-argument step (one batch of inference, or one training step) for a candidate."""
    device = torch.device(spec.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch_size, 3, spec.input_size, spec.input_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (spec.batch_size,), generator=gen).to(device)
    if spec.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.library == "onnxruntime":
        from .eval.predict import InferenceInfo
        from .export import ExportedModel, export_model

        path = os.path.join(workdir, f"{spec.model}.onnx")
        if not os.path.exists(path):
            model = _build_module(Spec(**{**spec.__dict__, "library": "convnext"}), state_dict)
            info = InferenceInfo(spec.model, [str(i) for i in range(1000)], input_size=spec.input_size)
            export_model(model, info, path, "onnx", dynamic_size=False)
        runner = ExportedModel(path, "onnxruntime", threads=spec.threads)
        return lambda: runner(x)

    model = _build_module(spec, state_dict).to(device)
    if spec.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    dtype = _dtype(spec.precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    if spec.mode == "infer":
        model.eval()
        if spec.variant == "fused":
            model.fuse_for_inference()
        if spec.variant == "compile":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # weights become constants: folding and prepacking
            model = torch.compile(model)

        def infer() -> torch.Tensor:
            with torch.inference_mode(), autocast():
                return model(x)
        return infer

    model.train()
    if spec.variant == "compile":
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16" and device.type == "cuda")

    def train_step() -> torch.Tensor:
        with autocast():
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return train_step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _memory_child(spec: Spec, workdir: str, steps: int, queue) -> None:  # runs in a fresh process
    try:
        torch.set_num_threads(spec.threads)
        step = build(spec, None, workdir)
        step()  # first step allocates what persists (e.g. AdamW state): counted, as a user pays it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        for _ in range(steps):
            step()
        queue.put((_rss_kib("VmHWM") - base) / 1024)
    except Exception as e:  # noqa: BLE001 - reported by the parent
        queue.put(f"{type(e).__name__}: {e}")


def peak_memory_cpu(spec: Spec, workdir: str, steps: int = 2) -> float | None:
    """Peak RSS increase (MiB) of a step of one candidate alone in a fresh process, or None."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(spec, workdir, steps, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if isinstance(out, str):
        warnings.warn(f"memory of {spec.label} not measured: {out}", stacklevel=2)
        return None
    return out


def matmul_peak(device: str, precision: str, reps: int = 5) -> tuple[float, str]:
    """Best GFLOP/s of plain matrix products on this machine (torch.mm and oneDNN), and which."""
    dtype = _dtype(precision) or torch.float32
    if device == "cpu" and dtype != torch.float32 and not _native_low_precision(dtype):
        sizes = (512,)  # emulated: keep this short (smaller products understate even the emulated peak)
    else:
        sizes = (1024, 2048) if device == "cpu" else (4096, 8192)
    best, how = 0.0, ""
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        cands = {"torch.mm": lambda a=a, b=b: torch.mm(a, b)}
        if device == "cpu" and dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            cands["oneDNN linear"] = lambda a=a, b=b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "none")
        for name, f in cands.items():
            f()
            ts = []
            for _ in range(reps):
                _sync(device)
                t = time.perf_counter()
                f()
                _sync(device)
                ts.append(time.perf_counter() - t)
            gf = 2 * n ** 3 / statistics.median(ts) / 1e9
            if gf > best:
                best, how = gf, f"{name} {n}x{n}"
    return best, how


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError, StopIteration):
        return set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    return set()


def _native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU has bf16/fp16 matrix instructions (oneDNN's fast low-precision GEMMs)."""
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(flags & {"amx_fp16", "avx512_fp16"})


def count_flops(model_name: str, batch_size: int, input_size: int, mode: str) -> int:
    """FLOPs (2 per multiply-accumulate) of one batch: forward counted by `torch.utils.flop_counter`
    on the meta device; a training step counts 3x forward (backward = grads of inputs + weights).

    flop_counter's formula for convolution backward ignores `groups`, which overcounts the
    depthwise convs' backward ~40x, so the backward is not counted op by op.
    """
    with torch.device("meta"):
        model = create_model(model_name)
        x = torch.empty(batch_size, 3, input_size, input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() * (1 if mode == "infer" else 3)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError, StopIteration):
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": _native_low_precision(torch.bfloat16)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("timm", "torchvision", "onnxruntime"):
        with contextlib.suppress(ImportError):
            info[lib] = __import__(lib).__version__
    return info


def candidates(model: str, batch_size: int, input_size: int, mode: str, precision: str, device: str,
               threads: int, compare: list[str], compile: bool) -> list[Spec]:
    base = dict(model=model, batch_size=batch_size, input_size=input_size, mode=mode, precision=precision,
                device=device, threads=threads)
    specs = [Spec("convnext", "eager", "nchw", **base)]
    if mode == "infer":
        specs.append(Spec("convnext", "fused", "nchw", **base))
    if compile:
        specs.append(Spec("convnext", "compile", "nchw", **base))
    for peer in compare:
        if peer == "timm" or (peer == "torchvision" and model in _TORCHVISION):
            specs += [Spec(peer, "eager", layout, **base) for layout in ("nchw", "channels_last")]
        elif peer == "onnxruntime" and mode == "infer" and precision == "fp32" and device == "cpu":
            specs.append(Spec(peer, "onnx", "nchw", **base))
    return specs


def skipped_peers(model: str, mode: str, precision: str, device: str, compare: list[str]) -> dict[str, str]:
    why = {}
    for peer in compare:
        try:
            __import__(peer)
        except ImportError:
            why[peer] = f"not installed (pip install {peer})"
            continue
        if peer == "torchvision" and model not in _TORCHVISION:
            why[peer] = f"has no {model}"
        elif peer == "onnxruntime" and (mode != "infer" or precision != "fp32" or device != "cpu"):
            why[peer] = "benchmarked for fp32 CPU inference only"
    return why


def run(model: str = "convnext_tiny", batch_size: int = 8, input_size: int = 224, mode: str = "infer",
        precision: str = "fp32", compare: tuple[str, ...] = ("timm", "torchvision"), repeats: int = 10,
        warmup: int = 2, device: str = "auto", threads: int | None = None, compile: bool = False,
        memory: bool = True, progress: bool = True) -> dict:
    """Benchmark ours and the installed peers; returns a dict (see `format_table`)."""
    model = check_model_name(model)
    if mode not in ("infer", "train"):
        raise ValueError(f"--mode must be infer or train, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    unknown = [p for p in compare if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)} in --compare; choose from {', '.join(PEERS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available here")
    if batch_size < 1 or input_size < 32 or repeats < 1 or warmup < 0:
        raise ValueError("--batch-size and --repeats must be >= 1, --input-size >= 32, --warmup >= 0")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    notes = []
    if device == "cpu" and precision != "fp32" and not _native_low_precision(_dtype(precision)):
        notes.append(f"this CPU has no native {precision} matrix kernels (AVX512-BF16/AMX): {precision} runs "
                     f"emulated, far slower than fp32")
    skipped = skipped_peers(model, mode, precision, device, list(compare))
    compare = [p for p in compare if p not in skipped]
    specs = candidates(model, batch_size, input_size, mode, precision, device, threads, compare, compile)
    peak, peak_how = matmul_peak(device, precision)
    flops = count_flops(model, batch_size, input_size, mode)
    weights = create_model(model).state_dict()  # one set of random weights for everyone

    results = [Result(s) for s in specs]
    with tempfile.TemporaryDirectory(prefix="convnext-bench-") as workdir:
        steps, outputs = [], []
        for r in results:
            t0 = time.perf_counter()
            steps.append(build(r.spec, weights, workdir))
            out = None
            for _ in range(max(warmup, 1)):
                out = steps[-1]()
            _sync(device)
            r.setup_s = time.perf_counter() - t0
            outputs.append(out.float().cpu() if mode == "infer" else None)
            if progress:
                print(f"  ready: {r.spec.label} ({r.setup_s:.1f} s setup + warm-up)", flush=True)
        if mode == "infer":
            for r, out in zip(results, outputs):
                r.max_abs_diff = (out - outputs[0]).abs().max().item()
        for i in range(repeats):
            for r, step in zip(results, steps):
                _sync(device)
                t = time.perf_counter()
                step()
                _sync(device)
                r.times.append(time.perf_counter() - t)
            if progress:
                print(f"  round {i + 1}/{repeats}", end="\r", flush=True)
        del steps, outputs
        if memory:
            for r in results:
                if device == "cpu":
                    r.peak_mib = peak_memory_cpu(r.spec, workdir)
                else:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    build(r.spec, None, workdir)()
                    torch.cuda.synchronize()
                    r.peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20
    return summarize(results, flops, peak, peak_how, notes, skipped)


def summarize(results: list[Result], flops: int, peak: float, peak_how: str, notes: list[str],
              skipped: dict[str, str]) -> dict:
    spec = results[0].spec
    rows = []
    for r in results:
        med = statistics.median(r.times)
        rows.append({"candidate": r.spec.label, "library": r.spec.library, "variant": r.spec.variant,
                     "layout": r.spec.layout, "ms_per_batch": med * 1e3, "images_per_s": spec.batch_size / med,
                     "gflops_per_s": flops / med / 1e9, "fraction_of_peak": flops / med / 1e9 / peak,
                     "peak_mib": r.peak_mib, "setup_s": r.setup_s, "max_abs_diff_vs_ours": r.max_abs_diff,
                     "times_ms": [t * 1e3 for t in r.times]})
    ours = {row["variant"]: row for row in rows if row["library"] == "convnext"}
    best_ours = min(ours.values(), key=lambda row: row["ms_per_batch"])
    ratios = {}
    for lib in dict.fromkeys(row["library"] for row in rows if row["library"] != "convnext"):
        best_peer = min((row for row in rows if row["library"] == lib), key=lambda row: row["ms_per_batch"])
        ratios[lib] = {v: best_peer["ms_per_batch"] / row["ms_per_batch"] for v, row in ours.items()}
        ratios[lib]["peer_best"] = best_peer["candidate"]
        if best_peer["peak_mib"] and best_ours["peak_mib"]:
            ratios[lib]["memory_ours_over_peer"] = best_ours["peak_mib"] / best_peer["peak_mib"]
    return {"config": {k: v for k, v in spec.__dict__.items() if k not in ("library", "variant", "layout")},
            "machine": machine(), "gflop_per_batch": flops / 1e9, "matmul_peak_gflops": peak,
            "matmul_peak_how": peak_how, "repeats": len(results[0].times), "results": rows, "ratios": ratios,
            "skipped": skipped, "notes": notes}


def format_table(res: dict) -> str:
    c, m = res["config"], res["machine"]
    lines = [f"{c['model']} {c['mode']} {c['precision']}  batch {c['batch_size']}  {c['input_size']}px  "
             f"{c['device']} {c['threads']} threads  ({m['cpu']}{', ' + m['gpu'] if 'gpu' in m else ''}; "
             f"torch {m['torch']})",
             f"{res['gflop_per_batch']:.1f} GFLOP per batch (flop_counter); matmul peak "
             f"{res['matmul_peak_gflops']:.0f} GFLOP/s ({res['matmul_peak_how']}); medians of {res['repeats']}",
             "",
             f"{'candidate':<34} {'ms/batch':>9} {'img/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'peak MiB':>9} "
             f"{'max|diff|':>9}"]
    for r in res["results"]:
        mem = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        diff = f"{r['max_abs_diff_vs_ours']:9.1e}" if r["max_abs_diff_vs_ours"] is not None else f"{'-':>9}"
        lines.append(f"{r['candidate']:<34} {r['ms_per_batch']:9.1f} {r['images_per_s']:8.1f} "
                     f"{r['gflops_per_s']:8.1f} {100 * r['fraction_of_peak']:5.0f}% {mem} {diff}")
    lines.append("")
    for lib, rt in res["ratios"].items():
        parts = ", ".join(f"{v} {x:.2f}x" for v, x in rt.items() if v not in ("peer_best", "memory_ours_over_peer"))
        mem = f"; memory ours/peer {rt['memory_ours_over_peer']:.2f}" if "memory_ours_over_peer" in rt else ""
        lines.append(f"speed ours/{lib} (vs its fastest: {rt['peer_best']}): {parts}{mem}")
    for peer, why in res["skipped"].items():
        lines.append(f"skipped {peer}: {why}")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
