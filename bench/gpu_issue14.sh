#!/usr/bin/env bash
# Issue 14's GPU checks in one go, for a session lent the device machine (one H200/H100).
#
# Prepare here (once): the machine lacks pydantic and webdataset (see /work/shared/TESTING.md), so carry
# cp312 wheels in an ignored folder:
#   echo /.gpu-wheels/ >> .git/info/exclude
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu-wheels "pydantic==2.14.*" webdataset==1.0.2 braceexpand
# Then: run(command="bash bench/gpu_issue14.sh", carry=[".gpu-wheels"], timeout_s=590)
#
# It runs (a) the labelled-positions / frozen-tower / compile unit tests on the GPU machine's torch and
# (b) bench/vlm_speed.py at the issue's size (CLIP ViT-L/14-336 + 1.1B Llama, bf16, micro batch 8):
# hf_eager, hf_compiled, ours, ours_compiled, ours_cached (cached vision features); stage 2 (instruct) first, so a time-out still leaves the
# headline. Results go to $OUT (the device tool's folder) and bench/results/issue14/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/issue14}
mkdir -p "$OUT" bench/results/issue14
PY=${PY:-python3}
export PYTHONPATH=$PWD/operator:$PWD/trainer PYTHONUNBUFFERED=1 VLM_METRICS_PORT=off
if [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --find-links .gpu-wheels pydantic webdataset braceexpand 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
$PY -m pytest -p no:cacheprovider -q tests/unit/test_objective.py tests/unit/test_features.py tests/unit/test_speed.py 2>&1 \
  | tail -5 | tee "$OUT/gpu_unit_tests.log"
BUDGET=${BUDGET:-480}
timeout "$BUDGET" $PY bench/vlm_speed.py --stages instruct,align --data fixed,mixed \
  --micro "${MICRO:-8}" --variants "${VARIANTS:-hf_eager,hf_compiled,ours,ours_compiled,ours_cached}" --out "$OUT/vlm_speed_gpu.json" 2>&1 | grep -v "Loading weights\|Writing model" \
  | tee "$OUT/vlm_speed_gpu.log"
cp "$OUT"/vlm_speed_gpu.* bench/results/issue14/ 2>/dev/null || true
