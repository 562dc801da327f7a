"""This checkout's speed against an earlier revision of the library (and timm), interleaved in one process.

    python benchmarks/revisions.py --base be2ff18 --model convnext_tiny --batch-size 8 --mode infer

The earlier revision's `src/convnext` is taken with `git archive` into a temporary folder and imported
as `convnext_base_rev` (the package uses relative imports only). All candidates get the same weights
and input; rounds run A B C A B C ...; medians and ratios are printed. Use it to show that a refactor
or a new kernel did not make the default path slower.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import convnext
from convnext.utils import autocast, cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parents[1]


def import_revision(rev: str, workdir: str):
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/convnext"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", workdir], input=archive, check=True)
    (Path(workdir) / "src" / "convnext").rename(Path(workdir) / "convnext_base_rev")
    sys.path.insert(0, workdir)
    return importlib.import_module("convnext_base_rev")


def step_fn(model, x, mode, precision):
    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast("cpu", precision):
                return model(x)
        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def train():
        with autocast("cpu", precision):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-timm", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as workdir:
        old = import_revision(a.base, workdir)
        new_model = convnext.create_model(a.model)
        old_model = old.create_model(a.model)
        old_model.load_state_dict(new_model.state_dict())
        models = {"this checkout": new_model, f"revision {a.base}": old_model}
        if not a.no_timm:
            import timm

            t = timm.create_model(a.model)
            target = t.state_dict()
            sd = convnext.weights.from_ours(new_model.state_dict(), "timm")
            t.load_state_dict({k: v.reshape(target[k].shape) for k, v in sd.items()})
            models["timm (channels_last)"] = t.to(memory_format=torch.channels_last)
        x = torch.randn(a.batch_size, 3, a.input_size, a.input_size, generator=torch.Generator().manual_seed(0))
        steps = {k: step_fn(m, x, a.mode, a.precision) for k, m in models.items()}
        for f in steps.values():
            f(), f()
        times = {k: [] for k in steps}
        for _ in range(a.repeats):
            for k, f in steps.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    isa = "AVX-512" if "avx512f" in cpu_flags() else "AVX2" if "avx2" in cpu_flags() else "other"
    print(f"{a.model} {a.mode} {a.precision} batch {a.batch_size} {a.input_size}px, {a.threads} thread(s), "
          f"{cpu_name()} ({isa}{', avx512_bf16' if 'avx512_bf16' in cpu_flags() else ''}), torch {torch.__version__}")
    for k, m in med.items():
        print(f"  {k:<28} {m * 1e3:8.1f} ms  {a.batch_size / m:8.1f} img/s")
    names = list(med)
    print(f"  this checkout / revision {a.base}: {med[names[1]] / med[names[0]]:.3f}x speed")
    if not a.no_timm:
        print(f"  ours/timm: this checkout {med[names[2]] / med[names[0]]:.2f}x, revision {a.base} "
              f"{med[names[2]] / med[names[1]]:.2f}x")


if __name__ == "__main__":
    main()
