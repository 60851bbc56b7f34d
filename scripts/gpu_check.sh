#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a short lease on a CUDA machine:
#   1. the CUDA tests (graph decoding equals generate; bf16 log-probs within tolerance)
#   2. DESIGN.md's workloads A, B, C at full size (scripts/bench.py --gpu)
#   3. the decode engines side by side (scripts/bench_decode.py)
#   3b. A again with bf16 weights and gradient checkpointing: rltune's peak memory at its leanest,
#      beside TRL's (whose defaults are bf16 weights and checkpointing)
#   3c. A and B on the logits path (algo.fused_logps=false), to weigh log-probs from hidden
#      states against it in time and memory
#   4. where trl and datasets import, 2. again beside TRL's trainers (--compare trl), last, as
#      the stage most likely to run out of time
# Results go to $OUT (default ./gpu-out): gpu_check.log and one JSON per benchmark; the tables
# print as they come.
#
#   bash scripts/gpu_check.sh [WHEEL_DIR] [BUDGET_S]
#
# WHEEL_DIR: wheels to install first, without an index (a machine that reaches no registry:
# carry transformers, peft, hydra-core, omegaconf, antlr4 wheels there; for stage 4 also trl,
# datasets, dill, multiprocess). BUDGET_S (default 540)
# bounds the whole script; each stage gets a share, so a hang in one still leaves the others.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log  # everything printed; the tables also as JSON beside it (6 files in all)
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

echo "== CUDA tests (t=$((SECONDS - START)) s)"
timeout $(($(left) / 6)) python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_rollout.py tests/test_prefix.py \
    2>&1 | tail -5 | tee -a "$LOG"

echo "== workloads A, B, C (t=$((SECONDS - START)) s)"
timeout $(($(left) * 3 / 4)) python3 scripts/bench.py --gpu --json "$OUT/workloads.json" \
    2>&1 | tee -a "$LOG" | grep -E "^\||^A:|GPU:|failed|rror"

echo "== decode engines (t=$((SECONDS - START)) s)"
timeout $(($(left) / 2)) python3 scripts/bench_decode.py --json "$OUT/decode.json" \
    2>&1 | tee -a "$LOG" | grep -E "^\||GPU|failed|rror"
echo "== A with the least memory: bf16 weights, gradient checkpointing (t=$((SECONDS - START)) s)"
timeout $(($(left) / 3)) python3 scripts/bench.py --gpu --workloads A --json "$OUT/a_lean.json" \
    --extra model.dtype=bf16 train.gradient_checkpointing=true \
    2>&1 | tee -a "$LOG" | grep -E "^\||failed|rror"
echo "== A and B from logits, algo.fused_logps=false (t=$((SECONDS - START)) s)"
timeout $(($(left) / 3)) python3 scripts/bench.py --gpu --workloads AB --json "$OUT/logits_path.json" \
    --extra algo.fused_logps=false 2>&1 | tee -a "$LOG" | grep -E "^\||failed|rror"

if python3 -c "import trl, datasets" 2>/dev/null; then
    echo "== workloads beside TRL (t=$((SECONDS - START)) s)"
    timeout $(($(left) - 5)) python3 scripts/bench.py --gpu --compare trl --json "$OUT/trl.json" \
        2>&1 | tee -a "$LOG" | grep -E "^\||done|failed|rror"
fi
echo "== done (t=$((SECONDS - START)) s)"
