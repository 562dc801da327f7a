"""Timing (interleaved rounds) and peak memory (one candidate alone in a fresh process)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import warnings

import torch

from .candidates import Spec, build
from .machine import sync


class Result:
    """A candidate's measurements."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.times: list[float] = []
        self.setup_s = 0.0
        self.peak_mib: float | None = None
        self.max_abs_diff: float | None = None
        self.detail = ""  # e.g. which path optimize_for_inference chose


def time_interleaved(results: list[Result], weights: dict[str, torch.Tensor], workdir: str, *, warmup: int,
                     repeats: int, progress: bool) -> None:
    """Build and warm every candidate, compare outputs with ours, then time rounds A B C A B C ..."""
    device, infer = results[0].spec.device, results[0].spec.mode == "infer"
    steps, outputs = [], []
    for r in results:
        t0 = time.perf_counter()
        steps.append(build(r.spec, weights, workdir))
        r.detail = getattr(steps[-1], "detail", "")
        out = None
        for _ in range(max(warmup, 1)):
            out = steps[-1]()
        sync(device)
        r.setup_s = time.perf_counter() - t0
        outputs.append(out.float().cpu() if infer else None)
        if progress:
            print(f"  ready: {r.spec.label} ({r.setup_s:.1f} s setup + warm-up)", flush=True)
    if infer:
        for r, out in zip(results, outputs, strict=True):
            r.max_abs_diff = (out - outputs[0]).abs().max().item()
    for i in range(repeats):
        for r, step in zip(results, steps, strict=True):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            r.times.append(time.perf_counter() - t)
        if progress:
            print(f"  round {i + 1}/{repeats}", end="\r", flush=True)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Give the memory the allocator holds but nothing uses back to the OS (glibc's malloc_trim), so that the
    next steps' RSS rises by what they need, whatever the set-up before them freed."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _memory_child(spec: Spec, workdir: str, steps: int, queue) -> None:  # runs in a fresh process
    try:
        torch.set_num_threads(spec.threads)
        step = build(spec, None, workdir)
        step()  # first step allocates what persists (e.g. AdamW state): counted, as a user pays it
        _release_freed_memory()  # else memory freed by the set-up (a measured choice's warm-ups) hides the peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        for _ in range(steps):
            step()
        queue.put((_rss_kib("VmHWM") - base) / 1024)
    except Exception as e:  # noqa: BLE001 - reported by the parent
        queue.put(f"{type(e).__name__}: {e}")


def peak_memory(spec: Spec, workdir: str, steps: int = 2) -> float | None:
    """Peak memory (MiB) of a step of one candidate: RSS increase in a fresh process on CPU, max allocated on CUDA."""
    if spec.device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        build(spec, None, workdir)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
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
