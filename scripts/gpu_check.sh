#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a short lease on a CUDA machine, most
# important first, each stage capped so that a hang in one still leaves the rest:
#   1. DESIGN.md's workloads A, B, C at full size with rltune's defaults (scripts/bench.py --gpu)
#   2. the CUDA tests (graph decoding equals generate, compiled too; bf16 log-probs in tolerance;
#      memory metrics)
#   3. the output layer's chunked log-probs alone (scripts/bench_logps.py): peak memory and time
#      of one micro-batch of A, with and without an entropy gradient, at chunks of 1024 and 256;
#      and the decode step, captured eager against compiled then captured
#      (scripts/bench_decode.py: ms per decode step, per replay and per draw)
#   4. A with rollout.compile=true
#   5. B and C with train.compile=true
#   6. A and B with a row per completion / per side (algo.share_prompt=false): fewer tokens
#      under a 4-D mask (SDPA's memory-efficient kernel) against more under a causal one (flash)
#   7. B and C with one step profiled (train.profile_step): their kernels by time
#   8. B and C with bf16 weights and train.compile=true (TRL's comparison loads bf16 weights)
#   9. A with the least memory: bf16 weights and gradient checkpointing (TRL's defaults are
#      bf16 weights and checkpointing)
#  10. where trl and datasets import, A beside TRL's GRPO trainer (--compare trl, 5 steps),
#      for the step ratio and peak memory of the same invocation
#  11. A and B on the logits path (algo.fused_logps=false), against log-probs from hidden states
# The model and data are built once (bench.py --workdir) and shared by every stage. Results go
# to $OUT (default ./gpu-out): gpu_check.log and one JSON per benchmark (11 files at most); the
# tables print as they come, and each JSON holds the runs done so far if a stage is cut off.
#
#   bash scripts/gpu_check.sh [WHEEL_DIR] [BUDGET_S]
#
# WHEEL_DIR: wheels to install first, without an index (a machine that reaches no registry:
# carry transformers, peft, hydra-core, omegaconf, antlr4 wheels there; for stage 5 also trl,
# datasets, dill, multiprocess). BUDGET_S (default 540) bounds the whole script.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log  # everything printed; the tables also as JSON beside it
if [ -n "${1:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/rltune-site "$1"/*.whl || exit 1
    export PYTHONPATH=/tmp/rltune-site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false
BUDGET=${2:-540}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$LOG"

# fits CAP_S NAME: CAP becomes CAP_S, or what the budget has left if that is less; false (and
# the stage noted as skipped) under 20 s. Every stage goes through it, so BUDGET_S bounds the
# script (a stage with a fixed timeout would run past a spent budget, and past the lease)
fits() {
    CAP=$1
    [ "$CAP" -gt "$(left)" ] && CAP=$(left)
    [ "$CAP" -ge 20 ] || { echo "skipped $2: $(left) s left" | tee -a "$LOG"; return 1; }
}

WORK=$(mktemp -d)
bench() {  # bench CAP_S NAME ARGS...: one bench.py --gpu invocation, capped, JSON to $OUT/NAME.json
    local name=$2
    fits "$1" "$name" || return
    shift 2
    echo "== $name (t=$((SECONDS - START)) s, cap $CAP s): $*" | tee -a "$LOG"
    timeout "$CAP" python3 scripts/bench.py --gpu --workdir "$WORK" --json "$OUT/$name.json" "$@" \
        2>&1 | tee -a "$LOG" | grep -E "^\||^A:|GPU:|done|failed|rror"
}

bench 200 workloads
if fits 150 "CUDA tests"; then
    # one line per test into the log as it ends, so a stage cut off by its cap still says which
    # tests passed (a summary at the end would be lost with it)
    echo "== CUDA tests (t=$((SECONDS - START)) s, cap $CAP s)" | tee -a "$LOG"
    timeout "$CAP" python3 -m pytest -v -p no:cacheprovider --durations=0 -k cuda \
        tests/test_rollout.py tests/test_prefix.py tests/test_grpo_losses.py tests/test_grpo_e2e.py \
        2>&1 | tee -a "$LOG" | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed"
fi
echo "== output-layer log-probs, one micro-batch of A (t=$((SECONDS - START)) s)" | tee -a "$LOG"
for args in "" "--entropy-grad" "--chunk 256"; do
    fits 60 "log-probs $args" || break
    timeout "$CAP" python3 scripts/bench_logps.py $args 2>&1 | tail -1 | tee -a "$LOG"
done
if fits 120 "decode step"; then
    echo "== decode step (t=$((SECONDS - START)) s, cap $CAP s)" | tee -a "$LOG"
    timeout "$CAP" python3 scripts/bench_decode.py --engines graph,compiled --json "$OUT/decode.json" \
        2>&1 | tee -a "$LOG" | grep -E "^\||GPU|failed|rror"
fi
bench 150 a_compiled --workloads A --extra rollout.compile=true
bench 120 compiled --workloads BC --extra train.compile=true
bench 100 unshared --workloads AB --extra algo.share_prompt=false
# where B's and C's steps go: the CUDA kernels of step 3 by their own time, in profile.json
bench 90 profile --workloads BC --steps 3 --extra train.profile_step=3
bench 120 bf16_compiled --workloads BC --extra model.dtype=bf16 train.compile=true
bench 60 a_lean --workloads A --extra model.dtype=bf16 train.gradient_checkpointing=true
if python3 -c "import trl, datasets" 2>/dev/null; then
    bench 200 trl_a --workloads A --compare trl --steps 5
else
    echo "no TRL here: $(python3 -c 'import trl, datasets' 2>&1 | tail -1)" | tee -a "$LOG"
fi
bench 110 logits_path --workloads AB --extra algo.fused_logps=false
echo "== done (t=$((SECONDS - START)) s)" | tee -a "$LOG"
