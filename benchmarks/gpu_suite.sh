#!/usr/bin/env bash
# The benchmark suite on one GPU box, in one command of at most $BUDGET_S seconds of wall time (default
# 360, compiles included). Results (JSON lines, appended by each stage as it ends) and every stage's log
# go to RESULTS_DIR; the report is made afterwards, on any machine, from results.jsonl.
#
#   benchmarks/gpu_suite.sh RESULTS_DIR [IMAGES]
#   fastrsb report RESULTS_DIR/results.jsonl RESULTS_DIR/run --out RESULTS_DIR/report   # afterwards, anywhere
#
# Needs torch, timm, torchvision, numpy, pillow, opencv-python(-headless), tqdm and numba; fastrsb runs
# from this checkout (PYTHONPATH, no install). DALI and FFCV are used when they import and work; without
# a package registry, install DALI from a folder of wheels first:
#   pip install --no-index --find-links WHEELS nvidia-dali-cuda120
#
# Stages, headline figures first, each with its baseline in the same run and at most its own limit (the
# limits add up to no more than the default budget; tests/test_gpu_suite.py checks it):
#   preflight     one-batch mixed DALI pipeline, one compiled augmentation call, one compiled step at a
#                 small batch; later stages take their backend and compile mode from what worked
#   bench-step    ResNet-50 at 160, batch 2048, A3's settings: the trainer's compiled TrainStep against
#                 timm's eager Lamb (fastrsb's line is written first, before the baseline is measured)
#   bench-aug     RandAugment + mixup/cutmix + normalise at 2048, compiled, against timm's PIL RandAugment
#   demo-data, convert   IMAGES distinct 300-500 px JPEGs (default 1000) in CLASSES classes (default 1000:
#                 ImageNet's head, so step, e2e and train share one compiled graph), COPIES hard links
#                 each (default 10), VAL_PER_CLASS val images per class (default 1); DALI shards, + .beton
#                 when FFCV imports
#   bench-loader  the loader (DALI if the preflight built it, else FFCV or PIL) + the trainer's augmentation
#                 at 160 against timm's create_loader with RandAugment; DALI at each prefetch depth and
#                 hardware-decoder share in LOADER_DEPTHS x LOADER_HW
#   bench-e2e     the A3 pipeline at batch 2048 against timm's whole A3 pipeline, and which stage bounds it
#   bench-parity  pixels of the loader against the PIL reference on this device (nvJPEG for DALI)
#   train         two A3 epochs of `fastrsb train` with eval and checkpoint (its log goes to RESULTS_DIR/run)
#   tests-cuda    the CUDA-marked tests
# A stage that fails or runs out of time is logged and the suite goes on; a stage gets no more than what is
# left of the budget. The exit status is 0 only when every stage ran and passed; the last line names the
# stages that did not.
#
# Sizes can be changed from the environment (defaults: the GPU suite); tests/test_gpu_suite.py runs the
# whole script on the CPU with tiny ones, so every stage's command line is checked before a GPU sees it:
#   CLASSES=1000 VAL_PER_CLASS=1 COPIES=10 STEP_RES=160 STEP_BATCH=2048 STEP_MODES=default STEP_ARGS=
#   AUG_BATCHES=2048 AUG_ARGS= LOADER_BACKENDS=(from the preflight) LOADER_RES=160 LOADER_BATCH=256 LOADER_BATCHES=12
#   LOADER_DEPTHS=2,4 LOADER_HW=1.0,0.65 E2E_BATCH=2048 E2E_STEPS=10 E2E_BASELINE_STEPS=3 E2E_ARGS=
#   PARITY_ARGS= TRAIN_ARGS= TEST_TIMEOUT=20 WORK_DIR=RESULTS_DIR/work (images, shards and the run's
#   checkpoint; put it elsewhere to keep RESULTS_DIR small)
set -uo pipefail
out=${1:?usage: gpu_suite.sh RESULTS_DIR [IMAGES]}
images=${2:-1000}
copies=${COPIES:-10}
py=${PYTHON:-python3}
budget=${BUDGET_S:-360}
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
  if [ "$left" -lt 5 ]; then echo "== $name: skipped, the ${budget}s budget is spent"; failed+=("$name(no time)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -h '^#\|passed\|failed\|skipped' "$out/$name.log" | tail -20
  echo "   $name: exit $rc$( [ $rc -eq 124 ] && echo ' (timed out)'), $(( $(date +%s) - t0 )) s (log: $out/$name.log)"
  [ "$rc" -eq 0 ] || failed+=("$name(exit $rc)")
}

# a check that failed turns its part off below; one the preflight did not reach (its time ran out) is unknown
preflight_dali=unknown preflight_augment=unknown preflight_step=unknown
stage preflight 35 "$py" -m fastrsb bench preflight --device "$device" --env-file "$out/preflight.env" --out "$results"
# shellcheck disable=SC1091
[ -f "$out/preflight.env" ] && . "$out/preflight.env"
step_modes=${STEP_MODES:-default} aug_compile=() train_compile=()
[ "$preflight_step" = failed ] && { step_modes=none; train_compile=(--compile-mode none); echo "   compiled step failed its preflight: eager only"; }
[ "$preflight_augment" = failed ] && { aug_compile=(--no-compile); echo "   compiled augmentation failed its preflight: eager only"; }
if [ "$preflight_dali" = ok ] || { [ "$preflight_dali" = unknown ] && [ "$(have nvidia.dali)" = yes ]; }; then backend=dali
elif [ "$(have ffcv.loader)" = yes ]; then backend=ffcv
else backend=pil; fi
echo "   loader for the later stages: $backend"

step_batch=${STEP_BATCH:-2048}
stage bench-step 85 "$py" -m fastrsb bench step --device "$device" --res "${STEP_RES:-160}" --batch "$step_batch" \
  --batch-per-gpu "$step_batch" --compile-modes "$step_modes" --repeats 5 --warmup 2 ${STEP_ARGS:-} --out "$results"
stage bench-aug 40 "$py" -m fastrsb bench aug --device "$device" --batches "${AUG_BATCHES:-2048}" "${aug_compile[@]}" \
  ${AUG_ARGS:-} --out "$results"

work=${WORK_DIR:-$out/work}  # the bulky part (source images, shards, checkpoints)
mkdir -p "$work"
data="$work/data"
if [ ! -f "$data/train/manifest.json" ]; then
  classes=${CLASSES:-1000}
  stage demo-data 15 "$py" -m fastrsb demo-data "$work/src" --classes "$classes" --train-per-class $((images / classes)) \
    --train-copies "$copies" --val-per-class "${VAL_PER_CLASS:-1}" --min-size 300 --max-size 500
  formats=dali; [ "$backend" = ffcv ] && formats=dali,beton
  stage convert 15 "$py" -m fastrsb convert "$work/src" "$data" --format "$formats" --workers "$cores" --no-progress
fi
stage bench-loader 45 "$py" -m fastrsb bench loader --data "$data" --src "$work/src" --device "$device" \
  --backends "${LOADER_BACKENDS:-$backend}" --workers "$cores" --sizes "${LOADER_RES:-160}" --splits train \
  --batch-size "${LOADER_BATCH:-256}" --batches "${LOADER_BATCHES:-12}" --prefetch-depths "${LOADER_DEPTHS:-2,4}" \
  --hw-decoder-loads "${LOADER_HW:-1.0,0.65}" --runs 2 --out "$results"
stage bench-e2e 50 "$py" -m fastrsb bench e2e --data "$data" --backend "$backend,pil" --device "$device" \
  --workers "$cores" --num-classes 1000 --batch "${E2E_BATCH:-2048}" --steps "${E2E_STEPS:-10}" \
  --baseline-steps "${E2E_BASELINE_STEPS:-3}" ${E2E_ARGS:-} --out "$results"
parity_backends=$backend; [ "$backend" = pil ] || parity_backends="$backend,pil"
stage bench-parity 20 "$py" -m fastrsb bench parity --data "$data" --device "$device" --backends "$parity_backends" \
  ${PARITY_ARGS:---batches 2 --draws 2000} --out "$results"
rm -rf "$work/run" "$out/run"  # `fastrsb train` the product's way: probe, compiled model and augmentation, eval
stage train 35 "$py" -m fastrsb train --data "$data" --loader "$backend" --device "$device" --out "$work/run" \
  --no-progress --eval-every 2 "${train_compile[@]}" epochs=2 warmup_epochs=1 ${TRAIN_ARGS:-}
mkdir -p "$out/run" && cp "$work/run/log.jsonl" "$work/run/run.json" "$out/run/" 2>/dev/null  # not the checkpoint
per_test_limit=(); "$py" -c "import pytest_timeout" 2>/dev/null && per_test_limit=(--timeout "${TEST_TIMEOUT:-20}")
stage tests-cuda 20 "$py" -m pytest tests -q -m cuda -p no:cacheprovider "${per_test_limit[@]}" \
  -W ignore::DeprecationWarning
echo "done in $(( $(date +%s) - start )) s: $results"
echo "report: fastrsb report $results $out/run --out $out/report"
if [ ${#failed[@]} -gt 0 ]; then echo "stages that did not pass: ${failed[*]}"; exit 1; fi
echo "every stage passed"
