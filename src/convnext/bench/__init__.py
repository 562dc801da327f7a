"""Side-by-side speed benchmark: this library against timm, torchvision and ONNX Runtime, in one run.

All candidates get the same weights (ours, converted to each peer's layout) and the same input.
They run interleaved (A B C A B C ...) after warm-up, so that drifts of a shared machine hit every
candidate alike; we report medians and the ratio ours/peer against each peer's fastest layout
(NCHW or channels_last). Achieved GFLOP/s uses FLOPs counted by `torch.utils.flop_counter` (2 per
multiply-accumulate; forward, or forward + backward for training) and is compared with this
machine's matmul peak measured in the same run. Peak memory is the peak RSS increase of one
candidate alone in a fresh process (CPU) or `torch.cuda.max_memory_allocated` (CUDA).

Parts: `candidates` (what runs), `measure` (timing, memory), `machine` (CPU, matmul peak),
`report` (summary and table).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from ..factory import check_model_name, create_model
from ..models.flops import count_macs
from ..utils import PRECISIONS, native_low_precision
from .candidates import PEERS, candidates, skipped_peers
from .machine import matmul_peak
from .measure import Result, peak_memory, time_interleaved
from .report import format_table, summarize

MODES = ("infer", "train")
OPTIMIZE = ("compile", "eager", "off")


@dataclass(frozen=True)
class BenchOptions:
    """What `convnext bench` measures."""

    model: str = "convnext_tiny"
    batch_size: int = 8
    input_size: int = 224
    mode: str = "infer"  # infer | train (forward + backward + AdamW step)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; LN/GRN statistics stay fp32)
    compare: tuple[str, ...] = ("timm", "torchvision")
    repeats: int = 10  # timed rounds; each runs every candidate once
    warmup: int = 2
    device: str = "auto"  # cpu | cuda | auto
    threads: int | None = None  # torch CPU threads (default: torch's)
    compile: bool = False  # also the peers under torch.compile (inductor freezing for inference); ours in training
    optimize: str = "compile"  # ours through optimize_for_inference: "compile" (eager and compiled, the faster
    #                            kept), "eager" (its eager kernels only), "off"
    memory: bool = True  # peak memory of each candidate alone
    progress: bool = True

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        unknown = [p for p in self.compare if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer(s) {', '.join(unknown)} in --compare; choose from {', '.join(PEERS)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available here")
        if self.optimize not in OPTIMIZE:
            raise ValueError(f"--optimize must be one of {', '.join(OPTIMIZE)}, got {self.optimize!r}")
        if self.batch_size < 1 or self.input_size < 32 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--batch-size and --repeats must be >= 1, --input-size >= 32, --warmup >= 0")


def count_flops(model_name: str, batch_size: int, input_size: int, mode: str) -> int:
    """FLOPs (2 per multiply-accumulate) of one batch; a training step counts 3x forward.

    flop_counter's formula for convolution backward ignores `groups`, which overcounts the
    depthwise convs' backward ~40x, so the backward is not counted op by op.
    """
    with torch.device("meta"):
        model = create_model(model_name)
    return 2 * count_macs(model, input_size, batch_size) * (1 if mode == "infer" else 3)


def run(opts: BenchOptions) -> dict:
    """Benchmark ours and the installed peers; returns a dict (see `report.format_table`). The torch threads
    it runs at are given back when it returns."""
    before = torch.get_num_threads()
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(before)


def _run(opts: BenchOptions) -> dict:
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    notes = []
    if device == "cpu" and opts.precision != "fp32" and not native_low_precision(PRECISIONS[opts.precision]):
        notes.append(f"this CPU has no native {opts.precision} matrix kernels (AVX512-BF16/AMX): {opts.precision} "
                     f"runs emulated, far slower than fp32")
    base = dict(model=opts.model, batch_size=opts.batch_size, input_size=opts.input_size, mode=opts.mode,
                precision=opts.precision, device=device, threads=threads)
    skipped = skipped_peers(base, list(opts.compare))
    results = [Result(s) for s in candidates(base, [p for p in opts.compare if p not in skipped], opts.compile,
                                             opts.optimize)]
    peak, peak_how = matmul_peak(device, opts.precision)
    flops = count_flops(opts.model, opts.batch_size, opts.input_size, opts.mode)
    weights = create_model(opts.model).state_dict()  # one set of random weights for everyone
    with tempfile.TemporaryDirectory(prefix="convnext-bench-") as workdir:
        time_interleaved(results, weights, workdir, warmup=opts.warmup, repeats=opts.repeats, progress=opts.progress)
        if opts.memory:
            for r in results:
                r.peak_mib = peak_memory(r.spec, workdir)
    return summarize(results, flops, peak, peak_how, notes, skipped)


__all__ = ["MODES", "OPTIMIZE", "PEERS", "BenchOptions", "count_flops", "format_table", "run", "summarize"]
