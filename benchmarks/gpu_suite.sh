#!/usr/bin/env bash
# The whole benchmark suite on one GPU box, in one command of at most $BUDGET_S seconds (default 480, compile
# included): results (JSON lines), the report (PNG + markdown) and every stage's log go to RESULTS_DIR.
#
#   benchmarks/gpu_suite.sh RESULTS_DIR [IMAGES]
#
# Works on a bare GPU box with torch, timm, torchvision, numpy, pillow, opencv-python(-headless), tqdm,
# numba and matplotlib: fastrsb runs from this checkout (PYTHONPATH, no install). DALI and FFCV are used
# when importable (on this project's lent machine DALI comes from ../shared/tools/pack-gpu-wheels.sh:
# four carried parts, then PYTHONPATH=/root/gpu-site); a missing one is a named skip, never a crash.
#
# Stages, each with its baseline in the same run: the CUDA-marked tests; loader (every usable backend,
# train at 160: loader alone, and loader + GPU RandAugment against timm's create_loader with RandAugment);
# aug (RandAugment + mixup/cutmix + normalise at 256 and 2048 against timm's PIL RandAugment); step
# (ResNet-50 at 160, batch 2048 on one GPU, the trainer's TrainStep eager and compiled, against timm's
# eager Lamb); e2e (loader + augmentation + step against timm's whole A3 pipeline, and which stage bounds
# it); parity (pixels of every backend against the PIL reference). Each stage gets at most its own
# limit and never more than what is left of the budget; a stage that fails is logged and the suite goes on.
set -uo pipefail
out=${1:?usage: gpu_suite.sh RESULTS_DIR [IMAGES]}
images=${2:-2000}
py=${PYTHON:-python3}
budget=${BUDGET_S:-480}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
results="$out/results.jsonl"
cd "$repo"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import fastrsb.loaders" || { echo "fastrsb does not import from $repo" >&2; exit 1; }
cores=$(nproc)
device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
have() { "$py" -c "import $1" >/dev/null 2>&1 && echo yes || echo "no ($1 not importable here)"; }
echo "fastrsb GPU suite: device $device, $cores cores, $images images, budget ${budget}s -> $out"
echo "   DALI: $(have nvidia.dali) | FFCV: $(have ffcv.loader) | nvidia-smi: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
start=$(date +%s)
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 15 ]; then echo "== $name: skipped, the ${budget}s budget is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -h '^#\|passed\|failed\|skipped' "$out/$name.log" | tail -20
  echo "   $name: exit $rc$( [ $rc -eq 124 ] && echo ' (timed out)'), $(( $(date +%s) - t0 )) s (log: $out/$name.log)"
}

stage tests-cuda 60 "$py" -m pytest tests -q -m cuda -p no:cacheprovider --timeout 50 -W ignore::DeprecationWarning
data="$out/data"
if [ ! -f "$data/train/manifest.json" ]; then
  stage demo-data 40 "$py" -m fastrsb demo-data "$out/src" --classes 10 --train-per-class $((images / 10)) \
    --val-per-class 20 --min-size 300 --max-size 500
  formats=dali; [ "$(have ffcv.loader)" = yes ] && formats=dali,beton
  stage convert 60 "$py" -m fastrsb convert "$out/src" "$data" --format "$formats" --workers "$cores" --no-progress
fi
stage bench-loader 75 "$py" -m fastrsb bench loader --data "$data" --src "$out/src" --device "$device" \
  --workers "$cores" --sizes 160 --splits train --batches 12 --runs 2 --out "$results"
stage bench-aug 150 "$py" -m fastrsb bench aug --device "$device" --batches 256,2048 --out "$results"
stage bench-step 150 "$py" -m fastrsb bench step --device "$device" --res 160 --batch 2048 --batch-per-gpu 2048 \
  --compile-modes none,default --repeats 5 --warmup 2 --out "$results"
stage bench-e2e 100 "$py" -m fastrsb bench e2e --data "$data" --device "$device" --workers "$cores" \
  --batch 256 --steps 20 --out "$results"
stage bench-parity 30 "$py" -m fastrsb bench parity --data "$data" --out "$results"
stage report 20 "$py" -m fastrsb report "$results" --out "$out/report"
echo "done in $(( $(date +%s) - start )) s: $results, $out/report/report.md"
