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
# Data: IMAGES distinct train images (default 1000, 300-500 px JPEGs) in CLASSES classes (default 1000,
# ImageNet's head, so step, e2e and train build the same model graph and can reuse one compile from the cache),
# stored COPIES times each (default 10, hard links), so a train epoch holds several batches of 2048;
# VAL_PER_CLASS val images per class (default 1).
# Stages, most wanted first, each with its baseline in the same run: the CUDA-marked tests; step
# (ResNet-50 at 160, batch 2048 on one GPU, A3's settings, the trainer's TrainStep eager and
# compiled, against timm's eager Lamb); aug (RandAugment + mixup/cutmix + normalise at 256 and 2048, eager
# and compiled, against timm's PIL RandAugment); loader (every usable backend, train at 160: the loader
# alone, and the loader + the trainer's compiled augmentation against timm's create_loader with
# RandAugment); e2e (the A3 pipeline at batch 2048, 1000-class head: loader + augmentation + step against
# timm's whole A3 pipeline, and which stage bounds it; its compiles can come from the caches step and aug filled);
# parity (pixels of every backend against the PIL reference, on the GPU: nvJPEG for DALI); train (two
# A3 epochs of `fastrsb train` on the same data, with eval and checkpoint, its log in the report). Each stage
# gets at most its own limit and never more than what is left of the budget; a stage that fails is
# logged and the suite goes on. The exit status is 0 only when every stage ran and passed; the last line
# names the stages that did not.
#
# Sizes can be changed from the environment (defaults: the GPU suite); tests/test_gpu_suite.py runs the
# whole script on the CPU with tiny ones, so every stage's command line is checked before a GPU sees it:
#   CLASSES=1000 VAL_PER_CLASS=1 COPIES=10 STEP_RES=160 STEP_BATCH=2048 STEP_MODES=none,default STEP_ARGS= AUG_BATCHES=256,2048 AUG_ARGS=
#   LOADER_BATCH=256 LOADER_BATCHES=12 LOADER_DEPTHS=2,4 E2E_BATCH=2048 E2E_STEPS=10 E2E_BASELINE_STEPS=3 E2E_ARGS=
#   PARITY_ARGS= TRAIN_ARGS= TEST_TIMEOUT=50 WORK_DIR=RESULTS_DIR/work (images, shards, the run's checkpoint;
#   on the lent machine put it outside $OUT, so that only results, logs and the report come back)
set -uo pipefail
out=${1:?usage: gpu_suite.sh RESULTS_DIR [IMAGES]}
images=${2:-1000}
copies=${COPIES:-10}
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
echo "fastrsb GPU suite: device $device, $cores cores, $images train images x $copies, budget ${budget}s -> $out"
echo "   DALI: $(have nvidia.dali) | FFCV: $(have ffcv.loader) | nvidia-smi: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
start=$(date +%s)
failed=()
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 15 ]; then echo "== $name: skipped, the ${budget}s budget is spent"; failed+=("$name(no time)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -h '^#\|passed\|failed\|skipped' "$out/$name.log" | tail -20
  echo "   $name: exit $rc$( [ $rc -eq 124 ] && echo ' (timed out)'), $(( $(date +%s) - t0 )) s (log: $out/$name.log)"
  [ "$rc" -eq 0 ] || failed+=("$name(exit $rc)")
}

per_test_limit=(); "$py" -c "import pytest_timeout" 2>/dev/null && per_test_limit=(--timeout "${TEST_TIMEOUT:-50}")
stage tests-cuda 60 "$py" -m pytest tests -q -m cuda -p no:cacheprovider "${per_test_limit[@]}" \
  -W ignore::DeprecationWarning
work=${WORK_DIR:-$out/work}  # the bulky part (source images, shards, checkpoints): keep it out of what comes back
mkdir -p "$work"
data="$work/data"
if [ ! -f "$data/train/manifest.json" ]; then
  classes=${CLASSES:-1000}
  stage demo-data 45 "$py" -m fastrsb demo-data "$work/src" --classes "$classes" --train-per-class $((images / classes)) \
    --train-copies "$copies" --val-per-class "${VAL_PER_CLASS:-1}" --min-size 300 --max-size 500
  formats=dali; [ "$(have ffcv.loader)" = yes ] && formats=dali,beton
  stage convert 45 "$py" -m fastrsb convert "$work/src" "$data" --format "$formats" --workers "$cores" --no-progress
fi
step_batch=${STEP_BATCH:-2048}
stage bench-step 130 "$py" -m fastrsb bench step --device "$device" --res "${STEP_RES:-160}" --batch "$step_batch" \
  --batch-per-gpu "$step_batch" --compile-modes "${STEP_MODES:-none,default}" --repeats 5 --warmup 2 ${STEP_ARGS:-} \
  --out "$results"
stage bench-aug 110 "$py" -m fastrsb bench aug --device "$device" --batches "${AUG_BATCHES:-256,2048}" ${AUG_ARGS:-} \
  --out "$results"
stage bench-loader 90 "$py" -m fastrsb bench loader --data "$data" --src "$work/src" --device "$device" \
  --workers "$cores" --sizes 160 --splits train --batch-size "${LOADER_BATCH:-256}" --batches "${LOADER_BATCHES:-12}" \
  --prefetch-depths "${LOADER_DEPTHS:-2,4}" --runs 2 --out "$results"
e2e_backend=pil; [ "$(have nvidia.dali)" = yes ] && e2e_backend=dali  # named: auto's probe costs time
stage bench-e2e 110 "$py" -m fastrsb bench e2e --data "$data" --backend "$e2e_backend" --device "$device" \
  --workers "$cores" --num-classes 1000 \
  --batch "${E2E_BATCH:-2048}" --steps "${E2E_STEPS:-10}" --baseline-steps "${E2E_BASELINE_STEPS:-3}" ${E2E_ARGS:-} \
  --out "$results"
stage bench-parity 45 "$py" -m fastrsb bench parity --data "$data" --device "$device" ${PARITY_ARGS:-} --out "$results"
rm -rf "$work/run" "$out/run"  # `fastrsb train` the product's way: probe, compiled model and augmentation, eval
stage train 120 "$py" -m fastrsb train --data "$data" --loader "$e2e_backend" --device "$device" --out "$work/run" \
  --no-progress --eval-every 2 epochs=2 warmup_epochs=1 ${TRAIN_ARGS:-}
mkdir -p "$out/run" && cp "$work/run/log.jsonl" "$work/run/run.json" "$out/run/" 2>/dev/null  # not the checkpoint
reports=("$results"); [ -f "$out/run/log.jsonl" ] && reports+=("$out/run")
stage report 20 "$py" -m fastrsb report "${reports[@]}" --out "$out/report"
echo "done in $(( $(date +%s) - start )) s: $results, $out/report/report.md"
if [ ${#failed[@]} -gt 0 ]; then echo "stages that did not pass: ${failed[*]}"; exit 1; fi
echo "every stage passed"
