#!/usr/bin/env bash
# The whole benchmark suite on one GPU box, meant to take under 8 minutes there (not yet run on a GPU;
# each stage has its own time limit); results (JSON lines), the report
# (PNG + markdown) and the logs go to the folder given as the argument.
#
#   benchmarks/gpu_suite.sh RESULTS_DIR [IMAGES]
#
# Stages (each measures its baseline in the same run): convert, loader (every usable backend, 160
# and 224, train and val, vs timm's create_loader), aug (vs timm's and torchvision's RandAugment),
# step (ResNet-50, fastrsb's LAMB + compile vs timm's eager Lamb), e2e (loader + augmentation +
# step vs timm's whole pipeline, and which stage bounds it). A stage that fails is logged and the
# suite goes on. PYTHON (default python3) must have torch, timm, torchvision, numpy, pillow, tqdm and
# opencv-python (the converter encodes with OpenCV, as FFCV does); DALI and FFCV are used if present.
# On this project's lent GPU machine (no registry): DALI comes from ../shared/tools/pack-gpu-wheels.sh
# (four carried parts, then PYTHONPATH=/root/gpu-site), opencv-python-headless and tqdm as carried
# cp312 wheels (see the device tool's README); then `PYTHON=python3 benchmarks/gpu_suite.sh $OUT/suite`.
set -uo pipefail
out=${1:?usage: gpu_suite.sh RESULTS_DIR [IMAGES]}
images=${2:-3000}
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
results="$out/results.jsonl"
cd "$repo"
export PYTHONUNBUFFERED=1
if ! "$py" -c "import fastrsb.loaders" 2>/dev/null; then
  # a bare checkout: install it in place (no dependencies fetched)
  "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || { echo "cannot install fastrsb in place; see $out/install.log" >&2; exit 1; }
fi
cores=$(nproc)
device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
echo "fastrsb GPU suite: device $device, $cores cores, $images images -> $out"
start=$(date +%s)
stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -h '^#' "$out/$name.log" | head -40
  echo "   $name: exit $rc, $(( $(date +%s) - t0 )) s (log: $out/$name.log)"
}

data="$out/data"
if [ ! -f "$data/train/manifest.json" ]; then
  stage demo-data 120 "$py" -m fastrsb demo-data "$out/src" --classes 10 --train-per-class $((images / 10)) \
    --val-per-class 50 --min-size 300 --max-size 500
  stage convert 120 "$py" -m fastrsb convert "$out/src" "$data" --workers "$cores" --no-progress
fi
stage bench-convert 90 "$py" -m fastrsb bench convert --images 1000 --workers "$cores" --out "$results"
stage bench-loader 120 "$py" -m fastrsb bench loader --data "$data" --src "$out/src" --device "$device" \
  --workers "$cores" --sizes 160,224 --batches 15 --runs 2 --out "$results"
stage bench-aug 60 "$py" -m fastrsb bench aug --device "$device" --out "$results"
stage bench-step 150 "$py" -m fastrsb bench step --device "$device" --res 160,224 --batch 256 --repeats 8 \
  --timm-per-param --out "$results"
stage bench-step-2048 90 "$py" -m fastrsb bench step --device "$device" --res 160 --batch 2048 \
  --batch-per-gpu 2048 --repeats 4 --warmup 2 --out "$results"
stage bench-e2e 120 "$py" -m fastrsb bench e2e --data "$data" --device "$device" --workers "$cores" \
  --steps 30 --out "$results"
stage report 60 "$py" -m fastrsb report "$results" --out "$out/report"
echo "done in $(( $(date +%s) - start )) s: $results, $out/report/report.md"
