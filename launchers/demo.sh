#!/usr/bin/env bash
# `make demo`: synthesise a small Ali-CCP set with a planted signal, prepare it, train DTN on two
# ranks through TorchX, and print the per-task test AUC next to the oracle AUC (the AUC of the
# planted probabilities, the best any model can reach) and the training throughput.
#
# Environment knobs: DEMO_DIR (default runs/demo), DEMO_TRAIN_ROWS, DEMO_TEST_ROWS, DEMO_SEED,
# DEMO_CONFIG (default configs/dtn_demo.yaml), DEMO_JOB (TorchX -j, default 1x2).
set -euo pipefail
cd "$(dirname "$0")/.."
# TorchX's local_cwd scheduler starts the `torchrun` that is first on PATH.
export PATH="$PWD/.venv/bin:$PATH"

demo_dir="${DEMO_DIR:-runs/demo}"
train_rows="${DEMO_TRAIN_ROWS:-60000}"
test_rows="${DEMO_TEST_ROWS:-15000}"
seed="${DEMO_SEED:-7}"
config="${DEMO_CONFIG:-configs/dtn_demo.yaml}"
job="${DEMO_JOB:-1x2}"

rm -rf "$demo_dir"
mkdir -p "$demo_dir"

echo "== dtn-synth: $train_rows train / $test_rows test rows (seed $seed)"
dtn-synth --output "$demo_dir/raw" --train-rows "$train_rows" --test-rows "$test_rows" --seed "$seed"

echo "== dtn-prepare: raw Ali-CCP -> Parquet"
dtn-prepare --format aliccp-raw --input "$demo_dir/raw" --output "$demo_dir/data"

echo "== dtn-train on $job ranks through TorchX ($config)"
torchx run -s local_cwd launchers/components.py:train -j "$job" \
    -- --config "$config" data.path="$demo_dir/data" output.dir="$demo_dir/train"

echo "== result (test split)"
python launchers/demo_report.py "$demo_dir/train/summary.json" "$demo_dir/raw/truth.json"

echo "== dtn-analyze: per-task feature importance of the demo model"
dtn-analyze --config "$config" --checkpoint "$demo_dir/train" --input "$demo_dir/data" \
    --output "$demo_dir/analysis" --max-rows 5000 --repeats 2 data.path="$demo_dir/data"
echo "plots: $demo_dir/analysis/*.png"
