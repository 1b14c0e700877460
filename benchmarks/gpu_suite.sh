#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md and the GPU blocks of docs/experiments.md that are due, in one
# run on a lent GPU (an H100 or H200, planned to take under 8 minutes), and the step that prepares what
# that run carries.
#
#   benchmarks/gpu_suite.sh prepare [--dry-run] [DATA_DIR]   # here: writes runs/gpu_suite/ (about 55 MB)
#   benchmarks/gpu_suite.sh run [--dry-run] [STEP ...]       # there: all steps, or the ones named
#
# The GPU machine has torch and transformers but neither `datasets` nor the shared data, and what
# travels to it is at most 64 MiB. So `prepare` (on a machine that has both; DATA_DIR defaults to data/,
# where data/download.py writes) writes the pretraining corpus's token shards, the Alpaca rows and the tweet files into
# runs/gpu_suite/ (git-ignored; SUITE= elsewhere), which the device tool carries. `run` reads them and
# writes everything it measures to $OUT (RESULTS= elsewhere, default runs/gpu_suite/results): suite.log,
# a JSON file per benchmark, experiments.md (a copy of docs/experiments.md with the blocks it ran
# rewritten, ready to replace it) and the blocks' plots in img/. Runs go to WORK= (a new temporary folder
# by default).
#
# The steps, in order of priority (each under a time limit; one that fails is reported, the rest go on):
#   step-benchmark     benchmarks/train_step.py, ours against transformers, 125m preset, batch 16 x 1024,
#                      bf16 autocast: eager, then compiled; tokens/s and MFU of both
#   compiled-training  benchmarks/compiled_training.py: 300 steps of pretraining compiled and eager, same
#                      batches; the compiled loss must fall like the eager one
#   pretraining        experiments/pretraining.py --size gpu on the carried shards (compiled)
#   instruction-sft    experiments/instruction_sft.py --size gpu --parts ours, from that pretraining
#   tweet-subset       experiments/tweet_sentiment.py --size gpu --parts subset (batch 1), only where
#                      SMOLLM2= names the SmolLM2-135M-Instruct GGUF file: at 98 MB it does not fit in
#                      what the device tool carries
#
# --dry-run runs the same steps on a CPU in tiny settings (tests/test_gpu_suite.py): a pipeline check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}
SUITE=${SUITE:-runs/gpu_suite}
PYTHON=${PYTHON:-python3}

usage() {
    echo "usage:" >&2
    sed -n '6,7p' "$0" | sed 's/^#/ /' >&2
    exit 2
}

mode=${1:-}
[[ $mode == prepare || $mode == run ]] || usage
shift
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi

if [[ $mode == prepare ]]; then
    data=${1:-data}
    [[ -d $data ]] || { echo "error: data folder $data not found; run data/download.py or pass a data folder" >&2; exit 2; }
    build=${BUILD:-runs/gpu_suite_build}  # the corpus file (too big to carry) and the prepare cache stay here
    size=(--size gpu); [[ $dry == 1 ]] && size=(--size gpu --smoke)
    "$PYTHON" experiments/pretraining.py "${size[@]}" --prepare-only --data-dir "$data" \
        --out "$build/pretraining" || exit 1
    mkdir -p "$SUITE/pretraining" "$SUITE/data/alpaca" "$SUITE/data/tweet_sentiment_extraction"
    rm -rf "$SUITE/pretraining/data"  # written by this script only: a fresh copy of the prepared shards
    cp -r "$build/pretraining/data" "$SUITE/pretraining/data"
    if [[ -f $data/alpaca/alpaca_data.json ]]; then  # as data/download.py writes it, else in parts
        cp "$data/alpaca/alpaca_data.json" "$SUITE/data/alpaca/" || exit 1
    else
        cp "$data"/alpaca/alpaca_data_part*.json "$SUITE/data/alpaca/" || exit 1
    fi
    for file in train_10fold.csv test.csv; do
        if [[ -f $data/tweet_sentiment_extraction/$file ]]; then
            cp "$data/tweet_sentiment_extraction/$file" "$SUITE/data/tweet_sentiment_extraction/"
        fi
    done
    bytes=$(( $(du -sb "$SUITE" | cut -f1) + $(git ls-files -z | xargs -0 cat | wc -c) ))
    echo "prepared $SUITE: with the tracked files, $((bytes / 1048576)) MiB travel (the device tool carries 64)"
    if (( bytes > 62 * 1048576 )); then
        echo "error: that is too much to carry: leave out some data" >&2
        exit 1
    fi
    echo "run it there: benchmarks/gpu_suite.sh run   (carry: $SUITE)"
    exit 0
fi

[[ -f $SUITE/pretraining/data/meta.json ]] || { echo "error: $SUITE holds no prepared data: run" \
    "benchmarks/gpu_suite.sh prepare first, where the data is, and carry $SUITE" >&2; exit 2; }
RESULTS=${RESULTS:-${OUT:-$SUITE/results}}
WORK=${WORK:-$(mktemp -d -t gpu_suite.XXXXXX)}
BUDGET=${BUDGET:-480}  # seconds for all steps: a step gets what is left, up to its own limit
mkdir -p "$RESULTS" "$WORK"
[[ -f $RESULTS/experiments.md ]] || cp docs/experiments.md "$RESULTS/experiments.md"

wanted=("$@")
want() {  # no steps named: every step
    (( ${#wanted[@]} == 0 )) && return 0
    local name
    for name in "${wanted[@]}"; do [[ $name == "$1" ]] && return 0; done
    return 1
}
summary=()
failed=0
step() {  # step NAME SECONDS COMMAND...: run, time and report one step; a failure does not stop the others
    local name=$1 limit=$2 start=$SECONDS code=0
    shift 2
    local left=$(( BUDGET - SECONDS ))
    if (( left < 20 )); then
        echo "== $name: skipped, the suite's $BUDGET s are spent"
        summary+=("$name: skipped (no time left)")
        failed=1
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" || code=$?
    local result="ok"
    if (( code != 0 )); then
        result="FAILED (exit code $code$( (( code == 124 )) && echo ", stopped at its $limit s"))"
        failed=1
    fi
    echo "== $name: $result, $((SECONDS - start)) s"
    summary+=("$name: $result, $((SECONDS - start)) s")
}

steps() {
    echo "gpu suite: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "results in $RESULTS, runs in $WORK"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, '|',
                  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

    if [[ $dry == 1 ]]; then
        local bench=(--device cpu --preset tiny --batch-size 2 --seq-len 32 --rounds 1 --steps 1)
        local backend=(--compile-backend aot_eager)
        local compiled=(--preset tiny --batch-size 2 --seq-len 32 --steps 4 --schedule-steps 4 --window 2
                        --warmup-steps 1 "${backend[@]}")
        local size=(--size gpu --smoke)
    else
        local bench=(--device cuda --preset 125m --batch-size 16 --seq-len 1024 --rounds 4 --steps 5)
        local backend=()
        local compiled=()  # its defaults: the first 300 steps of the pretraining below
        local size=(--size gpu)
    fi

    if want step-benchmark; then
        step step-benchmark-eager 120 "$PYTHON" benchmarks/train_step.py "${bench[@]}" \
            --json "$RESULTS/train_step_eager.json"
        step step-benchmark-compiled 240 "$PYTHON" benchmarks/train_step.py "${bench[@]}" --compile \
            "${backend[@]}" --json "$RESULTS/train_step_compiled.json"
    fi
    if want compiled-training; then
        step compiled-training 150 "$PYTHON" benchmarks/compiled_training.py --data "$SUITE/pretraining/data" \
            "${compiled[@]}" --json "$RESULTS/compiled_training.json"
    fi
    if want pretraining || want instruction-sft; then  # the fine-tuning starts from this run
        step pretraining 200 "$PYTHON" experiments/pretraining.py "${size[@]}" --prepared "$SUITE/pretraining" \
            --out "$WORK/pretraining" --docs "$RESULTS/experiments.md"
    fi
    if want instruction-sft; then
        step instruction-sft 300 "$PYTHON" experiments/instruction_sft.py "${size[@]}" --parts ours \
            --pretrained "$WORK/pretraining/run" --data-dir "$SUITE/data" --out "$WORK/instruction_sft" \
            --docs "$RESULTS/experiments.md"
    fi
    if want tweet-subset; then
        if [[ -n ${SMOLLM2:-} && -e ${SMOLLM2:-} ]]; then
            step tweet-subset 400 "$PYTHON" experiments/tweet_sentiment.py "${size[@]}" --parts subset \
                --model "$SMOLLM2" --data-dir "$SUITE/data" --out "$WORK/tweet_sentiment" \
                --docs "$RESULTS/experiments.md"
        else
            echo "== tweet-subset: skipped: SMOLLM2= names no SmolLM2-135M-Instruct file (98 MB, more than" \
                "the device tool carries)"
            summary+=("tweet-subset: skipped (no SMOLLM2 file)")
        fi
    fi

    echo "== summary, $SECONDS s in all:"
    printf '   %s\n' "${summary[@]}"
    return $failed
}

steps 2>&1 | tee -a "$RESULTS/suite.log"
exit "${PIPESTATUS[0]}"
