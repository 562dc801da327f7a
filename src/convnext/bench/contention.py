"""`convnext bench --mode contention`: the training step with a competing busy process beside it.

A laptop or a shared server always runs something else. With every core busy in torch, one other CPU-bound
process makes OpenMP threads spin while they wait for a core they do not have (libgomp spins 300,000 rounds
before it sleeps). Each candidate (torch threads and OpenMP wait policy, which libgomp reads only at start-up:
so each runs in its own process) times the step quiet, with one pure spin loop running beside it, and quiet
again; rounds are interleaved and medians reported, against the quiet rate of the default (the first).

What this shows on 2 cores (benchmarks/README.md): no fixed choice is free. Fewer spins or a passive policy
keep the busy rate near the fair share but cost quiet throughput; one thread holds up under load and loses a
third when the machine is free. The training engine's default, `--threads auto`, changes the thread count
during the run (`train.governor`: two slow windows halve it, probes bring it back), recording each switch:
another thread count sums in another order, so a run that must repeat bitwise fixes `--threads N`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

# (label, torch threads, environment): threads None = the machine's cores, "auto" = the training engine's
# governor (`train.governor`) starting at the machine's cores
CANDIDATES = (
    ("libgomp default (spin 300000)", None, {}),
    ("--threads auto (governor)", "auto", {}),
    ("GOMP_SPINCOUNT=10000", None, {"GOMP_SPINCOUNT": "10000"}),
    ("GOMP_SPINCOUNT=1000", None, {"GOMP_SPINCOUNT": "1000"}),
    ("OMP_WAIT_POLICY=PASSIVE", None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("1 thread", 1, {}),
)

_CHILD = r"""
import json, os, subprocess, sys, time
import torch, convnext
model_name, batch, size, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
governor = None
if threads == "auto":
    from convnext.train.governor import ThreadGovernor
    governor = ThreadGovernor(os.cpu_count() or 1)
    governor.start()
else:
    torch.set_num_threads(int(threads))
torch.manual_seed(0)
model = convnext.create_model(model_name, num_classes=10).train().to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
def step():
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if governor is not None:
        governor.step_done(0, batch)
def rate():
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)
for _ in range(2):
    step()
quiet = rate()
spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    time.sleep(0.3)
    busy = rate()
finally:
    spin.kill()
    spin.wait()
print(json.dumps({"quiet": max(quiet, rate()), "busy": busy,
                  "switches": len(governor.switches) if governor is not None else 0}))
"""


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return env | extra | {"PYTHONWARNINGS": "ignore"}


def bench_contention(model: str = "convnext_atto", batch_size: int = 128, input_size: int = 32, steps: int = 8,
                     repeats: int = 3, progress: bool = True, candidates: tuple = CANDIDATES) -> dict[str, Any]:
    """{"rows": [{candidate, threads, quiet_img_s, busy_img_s, busy_vs_default_quiet}], ...}; `candidates`
    (label, threads, environment), the first the default the others are compared with."""
    from ..factory import check_model_name
    from ..utils import machine_line

    check_model_name(model)
    if batch_size < 1 or steps < 1 or repeats < 1 or input_size < 32:
        raise ValueError("--batch-size, --batches (steps), --repeats >= 1 and --input-size >= 32")
    cores = os.cpu_count() or 1
    got: dict[str, list[dict]] = {label: [] for label, _, _ in candidates}
    for r in range(repeats):
        for label, threads, env in candidates:
            cmd = [sys.executable, "-c", _CHILD, model, str(batch_size), str(input_size), str(steps),
                   str(threads or cores)]  # ("auto": the governor)
            out = subprocess.run(cmd, env=_clean_env(env), capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"contention candidate {label!r} failed: {out.stderr.strip().splitlines()[-1:]}")
            got[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if progress:
                print(f"  round {r + 1}/{repeats}: {label}: quiet {got[label][-1]['quiet']:.0f}, busy "
                      f"{got[label][-1]['busy']:.0f} img/s", flush=True)
    base = statistics.median(g["quiet"] for g in got[candidates[0][0]])
    rows = []
    for label, threads, _ in candidates:
        quiet, busy = (statistics.median(g[k] for g in got[label]) for k in ("quiet", "busy"))
        rows.append({"candidate": label, "threads": threads or cores, "quiet_img_s": quiet, "busy_img_s": busy,
                     "switches": statistics.median(g.get("switches", 0) for g in got[label]),
                     "busy_vs_default_quiet": busy / base, "quiet_vs_default_quiet": quiet / base})
    return {"rows": rows, "model": model, "batch_size": batch_size, "input_size": input_size, "steps": steps,
            "repeats": repeats, "cores": cores, "machine": machine_line(), "target": 0.45}


def format_contention_table(res: dict[str, Any]) -> str:
    lines = [f"{res['model']} training step, batch {res['batch_size']} at {res['input_size']} px, quiet vs one busy "
             f"process beside it; medians of {res['repeats']} x {res['steps']} steps {res['machine']}",
             f"{'candidate':<40} {'threads':>7} {'quiet':>7} {'busy':>7} {'quiet/def':>9} {'busy/def':>9}"]
    for r in res["rows"]:
        lines.append(f"{r['candidate']:<40} {r['threads']:>7} {r['quiet_img_s']:>7.0f} {r['busy_img_s']:>7.0f} "
                     f"{r['quiet_vs_default_quiet']:>8.2f}x {r['busy_vs_default_quiet']:>8.2f}x")
    fair = (res["cores"] - 1) / res["cores"] if res["cores"] > 1 else 0.0
    lines.append(f"target: busy >= {res['target']}x the default's quiet rate (one of {res['cores']} cores taken: the "
                 f"fair share is {fair:.2f}x)")
    return "\n".join(lines)
