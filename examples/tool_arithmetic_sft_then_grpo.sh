#!/usr/bin/env bash
# Tool use learned on the embedded model: tool_arithmetic (multiply two 3-4 digit numbers, with a
# calculator tool), an SFT warm start on a few demonstrations, then GRPO on the episodes.
#
# The base model neither multiplies 4-digit numbers nor calls the tool in the Hermes form its
# system prompt shows, so GRPO from it has nothing to learn from (every episode scores 0). So:
#   1. TRAIN_N demonstrations, made by the environment itself on its train rows: the tools system
#      prompt and question exactly as an episode shows them, a calculator call, the tool's real
#      reply, then "Answer: <product>" (the conversation the episode runner would render);
#   2. `posttrain train sft` on them (LoRA r64, the SFT defaults), STEPS steps of BATCH;
#   3. `posttrain train grpo --env tool_arithmetic` from the SFT model, GRPO_STEPS steps;
#   4. `posttrain eval --env tool_arithmetic`: greedy episodes on EVAL_N held-out problems (the
#      environment's test split, never in training) for the base model, after SFT and after GRPO.
#
#   examples/tool_arithmetic_sft_then_grpo.sh [OUT_DIR]     (default: runs/tool-arithmetic)
# Environment overrides: TRAIN_N STEPS BATCH GRPO_STEPS EVAL_N POSTTRAIN
set -euo pipefail

OUT=${1:-runs/tool-arithmetic}
TRAIN_N=${TRAIN_N:-64}
STEPS=${STEPS:-16}
BATCH=${BATCH:-8}
GRPO_STEPS=${GRPO_STEPS:-10}
EVAL_N=${EVAL_N:-50}
POSTTRAIN=${POSTTRAIN:-$(dirname "$0")/../.venv/bin/posttrain}
[ -x "$POSTTRAIN" ] || POSTTRAIN=posttrain
PY=$(dirname "$POSTTRAIN")/python
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
EVAL=(--env tool_arithmetic --n "$EVAL_N" --max-turns 3 --max-new-tokens 48 --json)

"$PY" - "$TRAIN_N" "$OUT/demos.jsonl" <<'PYEOF'
import json, sys
from posttrain.envs import get_env
from posttrain.envs.tool_calls import with_tools_prompt
from posttrain.envs.tools import tool_schema

n, out = int(sys.argv[1]), sys.argv[2]
factory = get_env("tool_arithmetic")
schemas = [tool_schema(fn) for fn in factory.tools]
with open(out, "w") as f:
    for row in factory.rows("train", n, seed=0):
        env = factory()
        messages = with_tools_prompt(env.reset(row, 0), schemas)  # what the runner shows this template
        call = {"name": "calculator", "arguments": {"expression": f"{row['a']} * {row['b']}"}}
        turn = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        reply = env.step(turn)
        answer = f"Answer: {reply.messages[0]['content']}"
        assert env.step(answer).reward == 1.0, row  # the demonstration solves its episode
        messages += [{"role": "assistant", "content": turn}, *reply.messages, {"role": "assistant", "content": answer}]
        f.write(json.dumps({"messages": messages}) + "\n")
PYEOF

"$POSTTRAIN" eval "${EVAL[@]}" > "$OUT/eval_base.json"
rm -rf "$OUT/sft" "$OUT/grpo"
"$POSTTRAIN" train sft --data "$OUT/demos.jsonl" --max-steps "$STEPS" --batch-size "$BATCH" --output-dir "$OUT" \
    --name sft --checkpoint-every 0
"$POSTTRAIN" eval --model "$OUT/sft" "${EVAL[@]}" > "$OUT/eval_sft.json"
"$POSTTRAIN" train grpo --model "$OUT/sft" --env tool_arithmetic --max-turns 3 --max-new-tokens 48 \
    --group-size 8 --prompts-per-step 4 --temperature 1.0 --beta 0 --lora-rank 16 --lr 1e-4 \
    --max-steps "$GRPO_STEPS" --no-eval-at-start --eval-every 0 --eval-size 0 --output-dir "$OUT" --name grpo
"$POSTTRAIN" eval --model "$OUT/grpo" "${EVAL[@]}" > "$OUT/eval_grpo.json"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
for stage in ("base", "sft", "grpo"):
    res = next(iter(json.load(open(f"{sys.argv[1]}/eval_{stage}.json")).values()))
    print(f"{stage:>5}: {res['accuracy']:.0%} of {res['n']} held-out products right (greedy episodes with the calculator)")
PYEOF
