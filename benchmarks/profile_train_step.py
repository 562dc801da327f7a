"""Where a training step's time goes, per op family (torch.profiler, self CPU time), and the step as a multiple
of the forward of the same batch.

    python benchmarks/profile_train_step.py --model convnext_atto --batch-size 16 --precision bf16 --threads 1

The step is the engine's: train mode, autocast for bf16, fused AdamW, the fused depthwise backward of long bf16
CPU runs (`models/fast.py`). Families are matched on the aten op names, the first match wins.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import convnext
from convnext.models import fast
from convnext.utils import autocast, cpu_class, machine_line

FAMILIES = [  # (family, regex on the op name)
    ("optimizer (AdamW)", r"adam"),
    ("depthwise conv (fwd + bwd)", r"depthwise|_dw_|toeplitz|compiledfxgraph|torch-compiled"),
    ("convolution (fwd + bwd)", r"conv|mkldnn_convolution"),
    ("matmul (Linear fwd + bwd)", r"addmm|\bmm\b|^aten::mm|linear|matmul|bmm|_linear_pointwise"),
    ("LayerNorm (fwd + bwd)", r"layer_norm|native_layer_norm"),
    ("GELU (fwd + bwd)", r"gelu"),
    ("casts and layout copies", r"copy_|^aten::to$|_to_copy|contiguous|clone|permute|transpose"),
    ("elementwise and reductions", r"add|mul|div|sum|mean|sqrt|rsqrt|pow|sub|norm|where|fill|zero"),
    ("loss", r"cross_entropy|log_softmax|nll"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pat in FAMILIES:
        if re.search(pat, low):
            return fam
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = convnext.create_model(args.model).train()
    if args.precision == "bf16":
        fast.use_fused_depthwise_backward(model, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def step() -> None:
        with autocast("cpu", args.precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.no_grad(), autocast("cpu", args.precision):
            model(x)

    for _ in range(3):  # warm-up (and the fused depthwise backward's compiling)
        step()
    times = {"step": [], "forward": []}
    for _ in range(args.steps):  # interleaved
        for name, f in (("step", step), ("forward", forward)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    st, fw = (statistics.median(times[k]) * 1e3 for k in ("step", "forward"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    per: dict[str, float] = {}
    for ev in prof.key_averages():
        per[family(ev.key)] = per.get(family(ev.key), 0.0) + ev.self_cpu_time_total
    total = sum(per.values())
    print(f"{args.model} b{args.batch_size} {args.input_size}px {args.precision}, {args.threads} thread(s), "
          f"{machine_line()}, CPU class {cpu_class()}")
    print(f"training step {st:.0f} ms, forward (no grad) {fw:.0f} ms: step = {st / fw:.1f}x the forward "
          f"(medians of {args.steps}, interleaved)")
    print("| op family | share of the step's self CPU time |\n|---|---|")
    for fam, t in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {100 * t / total:.1f}% |")
    print("\ntop ops:")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {ev.self_cpu_time_total / total * 100:5.1f}%  {ev.key}  [{family(ev.key)}]")


if __name__ == "__main__":
    main()
