#!/usr/bin/env bash
# One prepared GPU benchmark run (used on a lent GPU machine; CI never runs it).
#   bash scripts/gpu_benchmarks.sh OUT_DIR
# 1. step-time overhead of SN methods (MobileNetV2 b128 224², ResNet-34-DS b128 32², IUNet 3D 128³), fp32 + bf16
# 2. SN memory: invseg ("fft") vs naive vs none for the 3D IUNet and the 8×DS(32) stack at 64³ and 128³
set -u
out=${1:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
timeout 240 python3 scripts/bench_overhead.py --device cuda --precisions fp32 bf16 --methods none reparam reparam@8 project project@8 torch --breakdown \
    --steps 16 --rounds 4 --warmup 4 --out "$out/overhead" 2>&1 | tee "$out/overhead.txt" | grep -v round
timeout 150 python3 scripts/memory_compare.py --device cuda --set 'cuda_sizes=[64,128]' --set 'batch_sizes=[1]' \
    --set measure.steps=2 --set measure.timeout=120 --set "out_dir=$out/memory" 2>&1 | tee "$out/memory.txt" | grep -v "^\[" | tail -40
# 3. no host synchronisation between checks (a gpu-marked test)
timeout 120 python3 -m pytest -q -m gpu tests/layers/test_cuda.py 2>&1 | tee "$out/sync_test.txt" | tail -3
