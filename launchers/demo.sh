#!/usr/bin/env bash
# `make demo`: synthesise a small Ali-CCP set whose click and conversion depend on different
# planted feature crosses, prepare it, train DTN and MMoE (each with its own demo config) on two
# ranks through TorchX, and print their test AUC side by side with the oracle AUC (the AUC of the
# true probabilities, the best any model can reach).
#
# Each step's full output goes to DEMO_DIR/logs/<step>.log; the console shows one line per step
# and the result table. Environment knobs: DEMO_DIR (default runs/demo), DEMO_TRAIN_ROWS,
# DEMO_TEST_ROWS, DEMO_SEED, DEMO_MODELS (default "dtn mmoe": configs/<model>_demo.yaml),
# DEMO_JOB (TorchX -j, default 1x2), DEMO_ANALYZE=1 (also per-task feature importance of DTN).
set -euo pipefail
cd "$(dirname "$0")/.."
# TorchX's local_cwd scheduler starts the `torchrun` that is first on PATH.
export PATH="$PWD/.venv/bin:$PATH"

demo_dir="${DEMO_DIR:-runs/demo}"
train_rows="${DEMO_TRAIN_ROWS:-400000}"
test_rows="${DEMO_TEST_ROWS:-20000}"
seed="${DEMO_SEED:-7}"
job="${DEMO_JOB:-1x2}"
read -r -a models <<< "${DEMO_MODELS:-dtn mmoe}"
marker="$demo_dir/.dtn-demo"

# Replace only a directory an earlier demo wrote (it holds our marker).
if [[ -e "$demo_dir" && ! -e "$marker" && -n "$(ls -A "$demo_dir" 2>/dev/null)" ]]; then
    echo "demo: $demo_dir exists and was not written by the demo; set DEMO_DIR" >&2
    exit 1
fi
rm -rf "$demo_dir"
mkdir -p "$demo_dir/logs"
touch "$marker"

step() {  # step LABEL LOG_NAME COMMAND...: run quietly, print the label and the seconds taken
    local label=$1 log="$demo_dir/logs/$2.log" start=$SECONDS
    shift 2
    printf '%-64s' "$label"
    if "$@" >"$log" 2>&1; then
        printf '%5ds\n' $((SECONDS - start))
    else
        printf ' FAILED\n'
        # Our commands end with a one-line "<prog>: error: <reason>"; else show the log's end.
        grep -m 5 ": error: " "$log" || tail -n 15 "$log"
        echo "full log: $log"
        exit 1
    fi
}

echo "dtn-torchrec demo: DTN vs MMoE on synthetic Ali-CCP with task-specific crosses"
step "dtn-synth: $train_rows train + $test_rows test rows (seed $seed)" synth \
    dtn-synth --output "$demo_dir/raw" --train-rows "$train_rows" --test-rows "$test_rows" \
    --seed "$seed" --id-scale 0.002 --history-scale 0.1 --rows-per-user 10
step "dtn-prepare: raw -> Parquet (train / valid / test)" prepare \
    dtn-prepare --format aliccp-raw --input "$demo_dir/raw" --output "$demo_dir/data"
summaries=()
for model in "${models[@]}"; do
    step "dtn-train $model: configs/${model}_demo.yaml, TorchX -j $job" "train_$model" \
        torchx run -s local_cwd launchers/components.py:train -j "$job" \
        -- --config "configs/${model}_demo.yaml" data.path="$demo_dir/data" \
        output.dir="$demo_dir/$model"
    summaries+=("$model=$demo_dir/$model/summary.json")
done
if [[ "${DEMO_ANALYZE:-0}" == 1 ]]; then
    first="${models[0]}"
    step "dtn-analyze $first: per-task feature importance" analyze \
        dtn-analyze --config "configs/${first}_demo.yaml" --checkpoint "$demo_dir/$first" \
        --input "$demo_dir/data" --output "$demo_dir/analysis" --max-rows 5000 --repeats 2 \
        data.path="$demo_dir/data"
fi

echo
python launchers/demo_report.py "$demo_dir/raw/truth.json" "${summaries[@]}"
echo
echo "runs, summaries and logs: $demo_dir/   (TensorBoard: tensorboard --logdir $demo_dir)"
