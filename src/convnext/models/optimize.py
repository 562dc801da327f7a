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


# --- training -------------------------------------------------------------------------------------------------
class _Untouched:
    """Measuring steps leaves no trace: the RNG states, the gradients and the buffers (e.g. BatchNorm's running
    statistics) are put back as they were; the optimizer is never stepped."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _Untouched:
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.grads = [(w, w.grad) for w in self.model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def clear(self) -> None:
        for w, _ in self.grads:
            w.grad = None

    def __exit__(self, *exc) -> None:
        for w, g in self.grads:
            w.grad = g
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(saved: _Untouched, device: torch.device, run: Callable[[], object], reps: int) -> float:
    ts = []
    for _ in range(reps):
        saved.clear()
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


BF16_MUST_WIN = 0.95  # bf16 trains only when its step takes < 95% of fp32's: its rounding is not free
NO_NATIVE_BF16 = "no native bf16 matrix instructions (AVX512-BF16/AMX)"


def choose_training_precision(model: nn.Module, fwd_bwd: Callable[[str], torch.Tensor], *,
                              reps: int = 3) -> tuple[str, dict]:
    """"bf16" or "fp32" to train `model` in here (bf16: autocast, weights and statistics fp32), as (precision,
    record).

    On a CUDA GPU with bf16, bf16; on a CPU with native bf16 matrix instructions (AVX512-BF16, AMX), the faster
    of the two, measured: `fwd_bwd(precision)` runs one forward and backward of a batch like the ones to come
    (median of `reps` each after a warm-up of each, again fp32 last; nothing stepped, the RNG, gradients and
    buffers restored); bf16 must take < `BF16_MUST_WIN` of fp32's time. Elsewhere fp32, unmeasured (bf16 is
    emulated there, slower). `record`: {"precision", "timings_ms" or "reason"}, what a resumed run reads back."""
    from ..utils import native_low_precision

    device = next(model.parameters()).device
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ("bf16" if bf16 else "fp32"), {"precision": "bf16" if bf16 else "fp32",
                                              "reason": f"CUDA {'with' if bf16 else 'without'} bf16"}
    if device.type != "cpu" or not native_low_precision(torch.bfloat16):
        return "fp32", {"precision": "fp32", "reason": NO_NATIVE_BF16}
    with _Untouched(model) as saved:
        times: dict[str, float] = {}
        for p in ("fp32", "bf16"):
            saved.clear()
            fwd_bwd(p)  # warm-up
            times[p] = _median_ms(saved, device, lambda p=p: fwd_bwd(p), reps)
        times["fp32"] = min(times["fp32"], _median_ms(saved, device, lambda: fwd_bwd("fp32"), reps))
    precision = "bf16" if times["bf16"] < BF16_MUST_WIN * times["fp32"] else "fp32"
    return precision, {"precision": precision, "timings_ms": times}


def choose_training_forward(model: nn.Module, fwd_bwd: Callable[[Callable], torch.Tensor], *,
                            compile: bool = True, reps: int = 3) -> tuple[Callable, dict]:
    """The faster of `model` and `torch.compile(model)` for training, as (forward, record).

    `fwd_bwd(forward)` runs one forward and backward of a batch like the ones to come through `forward` (the
    loss, autocast, whatever the training runs) and returns the loss. Measured: the median of `reps`
    forward+backward passes each, the eager ones again after the compile (same conditions); the optimizer is
    not stepped, and the RNG, the gradients and the buffers are restored. `record`: {"how": "eager" |
    "compiled", "timings_ms", "compile_s"}, what a resumed run reads back (`training_forward`) instead of
    measuring again."""
    device = next(model.parameters()).device
    with _Untouched(model) as saved:
        def time_ms(forward: Callable) -> float:
            return _median_ms(saved, device, lambda: fwd_bwd(forward), reps)

        saved.clear()
        fwd_bwd(model)  # warm-up (first-call allocations, oneDNN primitive creation)
        eager_ms = time_ms(model)
        if not compile:
            return model, {"how": "eager", "timings_ms": {"eager": eager_ms}, "compile_s": None}
        compiled = _compile_for_training(model)
        saved.clear()
        t0 = time.perf_counter()
        fwd_bwd(compiled)  # compiles forward and backward
        _sync(device)
        compile_s = time.perf_counter() - t0
        compiled_ms = time_ms(compiled)
        eager_ms = time_ms(model)
    how = "compiled" if compiled_ms < eager_ms else "eager"
    record = {"how": how, "timings_ms": {"eager": eager_ms, "compiled": compiled_ms}, "compile_s": compile_s}
    return (compiled if how == "compiled" else model), record


def training_forward(model: nn.Module, record: dict) -> Callable:
    """The forward a `choose_training_forward` record names (a resumed run computes as it did)."""
    if record.get("how") not in ("eager", "compiled"):
        raise ValueError(f"training forward record names {record.get('how')!r}, not 'eager' or 'compiled'")
    return _compile_for_training(model) if record["how"] == "compiled" else model


def _compile_for_training(model: nn.Module) -> Callable:
    # Static shapes: a second batch shape compiles its own graph. Dynamo's default would mark the changed dims
    # symbolic, and inductor 2.14's CPU backward then fails ("cannot determine truth value of Relational"),
    # seen when one process trains two shapes (tests/test_train_step.py).
    return torch.compile(model, dynamic=False)


class TrainStep:
    """`step(images, targets) -> loss`: forward through `forward` (under bf16 autocast for "bf16": weights,
    gradients, optimizer state and LayerNorm statistics stay fp32), the loss, backward, `optimizer.step()`,
    gradients cleared. `how`, `timings_ms` and `compile_s` say what was measured and chosen."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, forward: Callable, *, precision: str,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], record: dict) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
        self.model, self.optimizer, self.forward = model, optimizer, forward
        self.precision, self.loss_fn, self.record = precision, loss_fn, record
        self.how = f"{record['how']} ({precision})"
        self.timings_ms, self.compile_s = record.get("timings_ms", {}), record.get("compile_s")

    def loss(self, forward: Callable, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from ..utils import autocast

        with autocast(images.device, self.precision):
            return self.loss_fn(forward(images), targets)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss(self.forward, images, targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def __repr__(self) -> str:
        return f"TrainStep({self.how})"


def optimize_for_training(model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                          example_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                          compile: bool = True) -> TrainStep:
    """One training step for `model` and `optimizer`, the fastest measured way here, as `step(images, targets)`.

    Args:
        precision: "fp32", "bf16" (autocast: matmuls and convolutions in bf16, the model's weights, the
            gradients, the optimizer and LayerNorm/GRN statistics in fp32), or "auto": bf16 where it is native
            and measured faster on `example_batch` (`choose_training_precision`), else fp32.
        example_batch: (images, targets) like the ones to come; with it, eager and `torch.compile`d forward +
            backward are timed on it (no optimizer step, the RNG, gradients and buffers restored) and the faster
            is kept. Without it, the eager model.
        loss_fn: (logits, targets) -> loss; cross-entropy by default (targets: class indices or soft targets).
        compile: False: never compile.
    The model trains in place (the step's forward calls it, or its compiled form, which shares its weights);
    for the fused AdamW kernels, build the optimizer with `fused=True` (the engine does).
    """
    import torch.nn.functional as F

    if precision not in (*_DTYPES, "auto"):
        raise ValueError(f"precision must be one of {', '.join(_DTYPES)} or auto, got {precision!r}")
    loss_fn = loss_fn or F.cross_entropy
    if example_batch is None:
        if precision == "auto":
            raise ValueError("optimize_for_training: precision='auto' measures on example_batch; give one")
        return TrainStep(model, optimizer, model, precision=precision, loss_fn=loss_fn, record={"how": "eager"})
    images, targets = example_batch
    if not model.training:
        raise ValueError("optimize_for_training: the model is in eval mode; call model.train() first")
    chosen = None
    if precision == "auto":
        def fwd_bwd_at(p: str) -> torch.Tensor:
            loss = TrainStep(model, optimizer, model, precision=p, loss_fn=loss_fn, record={"how": "eager"}).loss(
                model, images, targets)
            loss.backward()
            return loss

        precision, chosen = choose_training_precision(model, fwd_bwd_at)
    probe = TrainStep(model, optimizer, model, precision=precision, loss_fn=loss_fn, record={"how": "eager"})

    def fwd_bwd(forward: Callable) -> torch.Tensor:
        loss = probe.loss(forward, images, targets)
        loss.backward()
        return loss

    forward, record = choose_training_forward(model, fwd_bwd, compile=compile)
    if chosen is not None:
        record["precision"] = chosen
    return TrainStep(model, optimizer, forward, precision=precision, loss_fn=loss_fn, record=record)
