"""`optimize_for_inference`: one call to the fastest inference path of a model on this machine.

Candidates, all computing the same function (fp32 logits within 1e-4 of the model's; bf16 within
bf16 rounding): the eager fast path (`fast.py`: folded LN/LayerScale/GRN-beta, oneDNN Linear with
GELU and residual fused; a bf16 model runs the same kernels in bf16 with LN/GRN statistics in
fp32), and the same model under `torch.compile` with inductor's weight freezing (weights become
constants: folded and pre-packed). Which is faster depends on the model, the precision and the CPU
(measured: on an AVX-512 Zen 5, compile wins for bf16 and the small models, the eager kernels for
convnext_tiny fp32), so with an example input both are timed and the faster is kept. Compiling
costs ~10-30 s, so `compile="auto"` only tries it when the eager path would run long enough to
earn that back.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from . import fast

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_PAYS_AFTER_S = 60.0  # compile="auto": try compiling when the eager path would run at least this long


class OptimizedModel(nn.Module):
    """A model prepared for inference: (N, C, H, W) float images in, float32 logits out (no autograd)."""

    def __init__(self, module: nn.Module, precision: str, how: str, compiled: Callable | None = None) -> None:
        super().__init__()
        self.module = module  # the prepared (fused, cast) model; its weights
        self.precision, self.how = precision, how
        self.dtype = _DTYPES[precision]
        object.__setattr__(self, "_compiled", compiled)  # (not a submodule: it wraps `module`)
        self.timings_ms: dict[str, float] = {}
        self.compile_s: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        with torch.inference_mode():
            if self._compiled is not None:
                import torch._inductor.config as inductor_config

                with inductor_config.patch(freezing=True):  # also for recompilations (new input shapes)
                    return self._compiled(x).float()
            return self.module(x).float()

    def train(self, mode: bool = True) -> OptimizedModel:
        if mode:
            raise RuntimeError("an optimized inference model cannot be trained; train the original model")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"precision={self.precision}, how={self.how!r}"


def _time_ms(f: Callable[[], object], reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def optimize_for_inference(model: nn.Module, *, precision: str = "fp32", example_input: torch.Tensor | None = None,
                           compile: bool | str = "auto", expected_calls: int | None = None) -> OptimizedModel:
    """The fastest inference module for `model` here, computing the same outputs.

    Args:
        precision: "fp32", or "bf16" (a bf16 copy of the weights; LayerNorm/GRN statistics stay fp32).
        example_input: a batch like the ones to come; needed to time and to compile.
        compile: True (always try torch.compile with freezing), False (never), "auto" (try it when
            `example_input` is given and the eager path would take >= 60 s for `expected_calls`
            calls of that batch; without `expected_calls`, whenever `example_input` is given).
        expected_calls: how many batches like `example_input` will be run.
    The model itself is not changed (a copy is fused and cast).
    """
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    base = copy.deepcopy(model).eval()
    if hasattr(base, "fuse_for_inference"):
        base.fuse_for_inference()
    base = base.to(_DTYPES[precision])
    eager = OptimizedModel(base, precision, f"eager fast path ({precision})")
    if example_input is None or compile is False:
        return eager
    eager_ms = _time_ms(lambda: eager(example_input), reps=2)
    eager.timings_ms["eager"] = eager_ms
    if compile == "auto" and expected_calls is not None and eager_ms / 1e3 * expected_calls < COMPILE_PAYS_AFTER_S:
        return eager
    graph = copy.deepcopy(base)
    form = "conv_mlp" if precision == "fp32" else None  # see fast.py: fp32 Linear would compile to MKL
    fast.use_graph_form(graph, form)
    compiled = OptimizedModel(graph, precision, f"torch.compile with freezing ({precision}"
                              f"{', MLP as 1x1 convs' if form else ''})", torch.compile(graph))
    t0 = time.perf_counter()
    compiled(example_input)  # compiles
    compiled.compile_s = time.perf_counter() - t0
    compiled_ms = _time_ms(lambda: compiled(example_input))
    eager_ms = _time_ms(lambda: eager(example_input))  # again, after the compile: same conditions
    best = compiled if compiled_ms < eager_ms else eager
    best.timings_ms = {"eager": eager_ms, "compiled": compiled_ms}
    best.compile_s = compiled.compile_s
    return best
