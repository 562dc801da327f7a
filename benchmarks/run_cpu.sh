#!/usr/bin/env bash
# The CPU figures of benchmarks/README.md: each line is one `convnext bench` run (all candidates
# interleaved in one process); JSON results go to benchmarks/results/. Takes ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=benchmarks/results
mkdir -p "$OUT"
run() { local name=$1; shift; "$BIN/convnext" bench "$@" --json "$OUT/$name.json" | tee "$OUT/$name.txt"; echo; }
run cpu-infer-fp32-convnext_tiny-b8    --model convnext_tiny   --batch-size 8  --compare timm,torchvision,onnxruntime --repeats 7
run cpu-infer-fp32-convnext_atto-b16   --model convnext_atto   --batch-size 16 --compare timm,onnxruntime --repeats 7
run cpu-infer-fp32-convnextv2_atto-b16 --model convnextv2_atto --batch-size 16 --compare timm --repeats 7
run cpu-infer-fp32-convnextv2_tiny-b8  --model convnextv2_tiny --batch-size 8  --compare timm --repeats 7
run cpu-train-fp32-convnext_atto-b16   --model convnext_atto   --batch-size 16 --mode train --compare timm --repeats 5
run cpu-train-fp32-convnext_tiny-b8    --model convnext_tiny   --batch-size 8  --mode train --compare timm,torchvision --repeats 5
run cpu-infer-bf16-convnext_atto-b16   --model convnext_atto   --batch-size 16 --precision bf16 --compare timm --repeats 3 --warmup 1
