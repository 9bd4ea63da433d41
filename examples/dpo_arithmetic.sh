#!/usr/bin/env bash
# DPO on the model's own samples (the doctrine's recipe), end to end on a CPU:
#   1. `posttrain pairs`: 200 two-digit-addition prompts x 8 samples at temperature 1.0, scored by
#      the math reward; the best and the worst sample of each prompt make a pair (prompts whose 8
#      samples are all right or all wrong are skipped).
#   2. `posttrain train dpo` on those pairs (LoRA r32), with greedy accuracy on 100 held-out
#      problems (the task's test split, disjoint from train) before and after.
# Prints both accuracies and the time of each stage (evaluation time reported apart).
#
#   examples/dpo_arithmetic.sh [OUT_DIR]        (default: runs/dpo-arithmetic)
# Environment overrides: PROMPTS N MAX_NEW_TOKENS LR BETA EPOCHS BATCH EVAL_N POSTTRAIN
set -euo pipefail

OUT=${1:-runs/dpo-arithmetic}
PROMPTS=${PROMPTS:-200}
N=${N:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
LR=${LR:-1e-4}
BETA=${BETA:-0.1}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-8}
EVAL_N=${EVAL_N:-100}
POSTTRAIN=${POSTTRAIN:-$(dirname "$0")/../.venv/bin/posttrain}
[ -x "$POSTTRAIN" ] || POSTTRAIN=posttrain
mkdir -p "$OUT"

t0=$(date +%s.%N)
"$POSTTRAIN" pairs --task arithmetic --task-size "$PROMPTS" --n "$N" --temperature 1.0 \
    --max-new-tokens "$MAX_NEW_TOKENS" --out "$OUT/pairs.jsonl"
t1=$(date +%s.%N)

RUN="$OUT/train"
if [ -d "$RUN" ]; then rm -rf "$RUN"; fi
"$POSTTRAIN" train dpo --data "$OUT/pairs.jsonl" --task arithmetic --eval-size "$EVAL_N" \
    --eval-max-new-tokens "$MAX_NEW_TOKENS" --eval-fraction 0 --epochs "$EPOCHS" --batch-size "$BATCH" \
    --lr "$LR" --beta "$BETA" --output-dir "$OUT" --name train --checkpoint-every 0
t2=$(date +%s.%N)

PY=$(dirname "$POSTTRAIN")/python
[ -x "$PY" ] || PY=python3
"$PY" - "$OUT" "$t0" "$t1" "$t2" <<'EOF'
import json, sys
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
evals = [json.loads(line) for line in open(f"{out}/train/evals.jsonl")]
data = json.load(open(f"{out}/train/data.json"))
eval_s = sum(e.get("seconds", 0.0) for e in evals)
before, after = evals[0], evals[-1]
pairs = sum(1 for _ in open(f"{out}/pairs.jsonl"))
print(f"\npairs: {pairs} from the prompts sampled (see {out}/pairs.jsonl)")
print(f"greedy accuracy on {after['n']} held-out problems: {before['accuracy']:.0%} (step 0) -> "
      f"{after['accuracy']:.0%} (step {after['step']})")
print(f"time: sampling {t1 - t0:.0f} s + training {t2 - t1 - eval_s:.0f} s "
      f"(reference log-probs {data['reference_seconds']:.1f} s, model load included) = {t2 - t0 - eval_s:.0f} s; "
      f"evaluation {eval_s:.0f} s apart")
EOF
