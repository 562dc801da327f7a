"""What the machine can do: CPU class, native low-precision kernels, the measured matmul peak."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time

import torch

from ..utils import PRECISIONS, cpu_class, cpu_flags, cpu_name, native_low_precision


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, precision: str, reps: int = 5) -> tuple[float, str]:
    """Best GFLOP/s of plain matrix products on this machine (torch.mm and oneDNN), and which."""
    dtype = PRECISIONS[precision] or torch.float32
    if device == "cpu" and dtype != torch.float32 and not native_low_precision(dtype):
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
                sync(device)
                t = time.perf_counter()
                f()
                sync(device)
                ts.append(time.perf_counter() - t)
            gf = 2 * n ** 3 / statistics.median(ts) / 1e9
            if gf > best:
                best, how = gf, f"{name} {n}x{n}"
    return best, how


def machine() -> dict:
    """CPU model and capability, cores, library versions, GPU: printed with every benchmark."""
    flags = cpu_flags()
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_class": cpu_class(),
            "isa": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")),
            "native_bf16": native_low_precision(torch.bfloat16)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("timm", "torchvision", "onnxruntime", "openvino"):
        with contextlib.suppress(ImportError):
            info[lib] = __import__(lib).__version__
    return info
