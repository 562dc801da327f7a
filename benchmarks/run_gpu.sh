#!/usr/bin/env bash
# One script for a GPU machine (a few minutes): the CUDA tests, the GPU benchmarks against timm and
# torchvision, and the demo on the GPU. Results go to benchmarks/results/gpu-*; the log to $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RES=benchmarks/results
LOG=${OUT:-$RES}
mkdir -p "$RES" "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/gpu-machine.txt"
"$BIN/python" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$LOG/gpu-tests.txt"
run() { local name=$1; shift; "$BIN/convnext" bench --device cuda "$@" --json "$RES/$name.json" --force \
        | tee "$RES/$name.txt"; echo; }
for model in convnext_tiny convnext_base; do
  for b in 64 256; do
    for p in bf16 fp16; do
      run gpu-infer-$p-$model-b$b --model $model --batch-size $b --precision $p --compare timm,torchvision \
          --repeats 20 --warmup 5 --optimize off
    done
  done
  run gpu-train-bf16-$model-b64 --model $model --batch-size 64 --mode train --precision bf16 \
      --compare timm,torchvision --compile --repeats 10 --warmup 3
done
# the input pipeline with JPEGs decoded and augmented on the GPU (nvJPEG) vs in loader workers
"$BIN/python" benchmarks/make_data.py /tmp/benchdata >/dev/null
"$BIN/convnext" bench --mode data --data /tmp/benchdata/folder,/tmp/benchdata/large --decode cpu,cpu-draft,gpu \
    --workers 0,8 --batch-size 64 --batches 8 --repeats 3 --json "$RES/gpu-data-pipeline.json" --force \
    | tee "$RES/gpu-data-pipeline.txt"
timeout 900 "$BIN/convnext" demo --output "$LOG/gpu-demo" --force 2>&1 | tail -25 | tee "$LOG/gpu-demo.txt"
# the dense demos' GPU row (README "Demo: detection and segmentation"): the targets (box mAP@0.5 0.5 / mask 0.4;
# mIoU 0.6) need several times the CPU budget; device auto picks the GPU
timeout 420 "$BIN/convnext" demo --task detect --epochs 12 --output "$LOG/gpu-demo-detect" --force 2>&1 | tail -8 \
    | tee "$LOG/gpu-demo-detect.txt"
timeout 300 "$BIN/convnext" demo --task segment --epochs 24 --output "$LOG/gpu-demo-segment" --force 2>&1 | tail -8 \
    | tee "$LOG/gpu-demo-segment.txt"
