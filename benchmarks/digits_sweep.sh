#!/usr/bin/env bash
# Do fastrsb's pipelines train like timm's own? Every pipeline (DALI, FFCV, PIL and timm's reference,
# fastrsb/timm_reference.py) trains a scaled-down A3 on real data no one here made: scikit-learn's UCI
# digits (1,497 train / 300 val, stratified, upsampled to 64 px JPEGs), SEEDS seeds each, on this
# machine's CPU. Then each pipeline's final top-1 is compared with timm's (Welch's 95% interval).
#
#   benchmarks/digits_sweep.sh RESULTS_DIR            # resumable: run it again to finish what was cut short
#
# Scaled-down A3: resnet10t, train 32 px / test 48 px (A3 trains at 160 and tests at 224), global batch 64,
# 8 epochs with 1 of warmup. lr=0.256 is the lr at batch 2048 that the trainer scales linearly to 0.008 at
# batch 64, A3's own LAMB lr (LAMB's trust ratio does not want the linear scaling's 2.5e-4).
# Environment: WORK (default /tmp/digits-sweep: images, converted data, run folders), SEEDS (default 1-6),
# PIPELINES (default dali,ffcv,pil,timm), PYTHON (default python).
set -euo pipefail
RESULTS=${1:?usage: benchmarks/digits_sweep.sh RESULTS_DIR}
WORK=${WORK:-/tmp/digits-sweep}
SEEDS=${SEEDS:-1-6}
PIPELINES=${PIPELINES:-dali,ffcv,pil,timm}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

[ -d "$WORK/src/val" ] || $PYTHON -m fastrsb digits-data "$WORK/src"
$PYTHON -m fastrsb convert "$WORK/src" "$WORK/data" --no-progress
$PYTHON -m fastrsb sweep --recipe a3 --pipelines "$PIPELINES" --seeds "$SEEDS" --data "$WORK/data" \
    --model resnet10t --out "$WORK/sweep" --device cpu --batch-per-gpu 64 \
    epochs=8 train_res=32 test_res=48 global_batch=64 lr=0.256 warmup_epochs=1 || status=$?

# the sweep's summary and every finished run's run.json and log.jsonl (no weights), then the report
mkdir -p "$RESULTS"
cp "$WORK/sweep/sweep.json" "$RESULTS/"
for run in "$WORK"/sweep/*/seed-*; do
    [ -f "$run/model.pt" ] || continue
    dest="$RESULTS/runs/$(basename "$(dirname "$run")")/$(basename "$run")"
    mkdir -p "$dest"
    cp "$run/run.json" "$run/log.jsonl" "$dest/"
done
$PYTHON -m fastrsb report "$RESULTS" --out "$RESULTS/report"
exit "${status:-0}"
