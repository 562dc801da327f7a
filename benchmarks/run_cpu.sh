#!/usr/bin/env bash
# The CPU figures of benchmarks/README.md: each line is one `convnext bench` run (all candidates interleaved
# in one process, 1 torch thread for stable ratios); JSON and text go to benchmarks/results/<cpu class>/.
# Takes ~35 min on 2 cores. The CPU class (amx / avx512 / avx2) is detected at run time, as in the library.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CLASS=$("$BIN/python" -c "from convnext.utils import cpu_class; print(cpu_class())")
OUT=benchmarks/results/$CLASS
mkdir -p "$OUT"
run() { local name=$1; shift; "$BIN/convnext" bench "$@" --threads 1 --json "$OUT/$name.json" --force \
        | grep -v "^  ready\|round " | tee "$OUT/$name.txt"; echo; }
PRECISIONS="fp32"
case "$CLASS" in avx512|amx) PRECISIONS="fp32 bf16" ;; esac
for p in $PRECISIONS; do
  run infer-$p-convnext_tiny-b8    --model convnext_tiny   --batch-size 8  --precision $p --compile \
      --compare timm,torchvision,onnxruntime,openvino --repeats 10 --no-memory
  run infer-$p-convnext_atto-b16   --model convnext_atto   --batch-size 16 --precision $p --compile \
      --compare timm,onnxruntime,openvino --repeats 10 --no-memory
  run infer-$p-convnextv2_atto-b16 --model convnextv2_atto --batch-size 16 --precision $p --compile \
      --compare timm,onnxruntime,openvino --repeats 10 --no-memory
  run train-$p-convnext_atto-b16   --model convnext_atto   --batch-size 16 --precision $p --mode train --compile \
      --compare timm --repeats 6
  run train-$p-convnext_tiny-b8    --model convnext_tiny   --batch-size 8  --precision $p --mode train --compile \
      --compare timm,torchvision --repeats 6
done
# the demo's training step (convnext_atto, batch 128 at 32 px), 2 threads as the demo runs it
for p in $PRECISIONS; do
  "$BIN/convnext" bench --model convnext_atto --batch-size 128 --input-size 32 --mode train --compare timm \
      --precision $p --threads 2 --repeats 10 --json "$OUT/train-$p-convnext_atto-b128-32px-2threads.json" --force \
      | grep -v "^  ready\|round " | tee "$OUT/train-$p-convnext_atto-b128-32px-2threads.txt"
done
# where the training step's time goes
for p in $PRECISIONS; do
  "$BIN/python" benchmarks/profile_train_step.py --model convnext_atto --batch-size 16 --precision $p --threads 1 \
      2>/dev/null | tee "$OUT/profile-train-$p-convnext_atto-b16.txt"
done
# the input pipeline alone: folder vs shards vs an hf dataset, whole vs draft JPEG decoding (benchmarks/make_data.py)
DATA=${DATA:-/tmp/benchdata}
"$BIN/python" benchmarks/make_data.py "$DATA"
run data-pipeline --mode data --data "$DATA/folder,wds:$DATA/wds,hf:$DATA/hf" --decode cpu,cpu-draft --workers 0,1 \
    --batch-size 32 --batches 8 --repeats 3
run data-pipeline-large --mode data --data "$DATA/large" --decode cpu,cpu-draft --workers 0,1 --batch-size 32 \
    --batches 8 --repeats 3
run data-pipeline-large-128px --mode data --data "$DATA/large,$DATA/folder" --decode cpu,cpu-draft --workers 0 \
    --batch-size 32 --batches 8 --repeats 3 --input-size 128
# the demo's training step with a busy process beside it, per thread count, OpenMP wait policy and the governor
# (48 steps per phase: the governor needs 8 to notice)
"$BIN/convnext" bench --mode contention --model convnext_atto --batch-size 128 --input-size 32 --batches 48 \
    --repeats 3 --json "$OUT/contention-convnext_atto-b128-32px.json" --force \
    | grep -v "round " | tee "$OUT/contention-convnext_atto-b128-32px.txt"
