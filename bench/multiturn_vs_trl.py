"""Our multi-turn GRPO step (`--env`) vs TRL's GRPOTrainer with an environment, on guess_number.

Both sides play the same game, our `guess_number(hi=100, max_turns=T)`, on the same rows: a
prompt, then T model turns of up to --new-tokens tokens each (`forced`: exactly that many; `natural`:
until the end-of-turn token at temperature 1), each answered by the game. Ours runs it through
`--env` (`sampling/turns.py`: each episode continues from its KV cache). TRL runs it through
`environment_factory` (its tool loop: after each turn the whole conversation so far is fed to
`generate` again, one completion per sample), with the game's `step` as the environment's tool.

TRL calls a tool only when its response parser finds a tool call, and the embedded 135M model does
not write tool calls. So the bench gives TRL a parser that reads every reply as a call of the
game's tool with the reply's text (its `parse_response`, replaced in the worker), and a chat
template that is SmolLM2's plus the rendering of tool calls that TRL checks for. Everything else is
TRL's loop as shipped: T generations and T - 1 tool results per sample
(`max_tool_calling_iterations`), tool tokens masked out of its loss, the conversation re-fed each turn.
Our episodes take T turns too: the game ends after its T-th guess. Rewards are not compared, only
the work: the table gives the tokens each side sampled per step.

As in `grpo_vs_trl.py` (whose workers, `measure` and table this uses): each framework in its own
process, alternating step by step, the median of --steps steps after --warmup, per-phase times
(generation, the log-prob passes, the update), peak RSS growth once the trainer is built.

usage: python bench/multiturn_vs_trl.py [--groups 8] [--loras all,full] [--lengths natural,forced]
           [--turns 4] [--new-tokens 24] [--steps 5] [--out bench/results/multiturn_grid.json] [--remeasure]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile

import torch

import grpo_vs_trl as B  # bench/grpo_vs_trl.py

EPISODE_TOKENS = 1024  # our --max-episode-tokens, TRL's max_completion_length: above what T turns take here
TOOL_TEMPLATE = (  # SmolLM2's chat template, with the assistant's tool calls rendered after its content
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + call['function']['name'] + ' ' + (call['function']['arguments'] | tojson) + '</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def env_spec(cell: dict) -> str:
    return f"guess_number(hi=100, max_turns={cell['turns']})"


class OursEnv(B.Ours):
    """Our GRPO step on episodes, set up as `train_grpo --env` sets it up (`inputs.rollout_setup`)."""

    def _config(self, grpo, cell: dict, args):
        shape = {k: v for k, v in self._shape(cell, args).items() if k != "data"}
        return grpo.GRPOConfig(beta=cell["beta"], env=env_spec(cell), max_turns=cell["turns"],
                               max_episode_tokens=EPISODE_TOKENS, **shape)

    def _load(self, common) -> None:
        from posttrain.algorithms import inputs

        setup = inputs.rollout_setup(self.cfg)  # seeds, the allocator setting, the game's rows, its runner
        self.policy, self.tok, self.rows, self.reward = setup.policy, setup.tok, setup.rows.train, setup.reward_fn


def every_reply_a_guess(tokenizer, ids, prefix=None, tools=None) -> dict:
    """TRL's `parse_response`, for this bench: each reply is a call of the game's tool `guess`."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return {"role": "assistant", "content": text,
            "tool_calls": [{"type": "function", "function": {"name": "guess", "arguments": {"text": text}}}]}


def build_trl_env(cell: dict, args, max_steps: int, callbacks=()):
    """TRL's GRPOTrainer on our guess_number through its `environment_factory`."""
    import trl.trainer.grpo_trainer as trl_grpo
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.envs import get_env
    from posttrain.models import ensure_embedded, load_model

    factory = get_env(env_spec(cell))

    class Game:
        """Our game behind TRL's environment protocol: `guess` is its `step`, the reward its return."""

        def __init__(self):
            self.env, self.total = factory(), 0.0

        def reset(self, **example) -> None:
            self.env.reset(json.loads(example["row"]), 0)
            self.total = 0.0

        def guess(self, text: str) -> str:
            """Guess the secret number.

            Args:
                text: The reply that holds the guessed number.

            Returns:
                Whether the secret number is higher or lower.
            """
            step = self.env.step(text)
            self.total += step.reward
            return "\n".join(m["content"] for m in step.messages) or "The game is over."

        def get_reward(self) -> float:
            return self.total

    torch.manual_seed(0)
    model, tok = load_model()
    model.config._name_or_path = str(ensure_embedded())  # TRL loads its reference copy from this path
    tok.chat_template = TOOL_TEMPLATE
    tok.response_schema = {"x-regex": "(?P<content>.*)"}  # any: the parser used is every_reply_a_guess
    trl_grpo.parse_response = every_reply_a_guess
    first = factory()
    rows = [{"prompt": first.reset(r, 0), "row": json.dumps(r)} for r in factory.rows("train", 64, 0)]
    turn = {"max_new_tokens": args.new_tokens, **({"min_new_tokens": args.new_tokens} if cell["lengths"] == "forced"
                                                  else {})}
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.prompts * cell["group"],
        num_generations=cell["group"], max_completion_length=EPISODE_TOKENS, generation_kwargs=turn,
        max_tool_calling_iterations=cell["turns"] - 1, temperature=1.0, beta=cell["beta"], learning_rate=B.LR,
        max_steps=max_steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_accumulation_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    targets = B.TARGETS[cell["lora"]]
    peft_config = None if targets is None else LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                          task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          peft_config=peft_config, environment_factory=Game, callbacks=list(callbacks))
    return trainer, B.timed_phases(trainer)


def key(cell: dict) -> str:
    return f"g{cell['group']}-{cell['lora']}-{cell['lengths']}-b{cell['beta']}-t{cell['turns']}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", default="8")
    p.add_argument("--loras", default="all,full")
    p.add_argument("--lengths", default="natural,forced")
    p.add_argument("--betas", default="0.04")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=24, help="per turn")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench/results/multiturn_grid.json")
    p.add_argument("--remeasure", action="store_true")
    p.add_argument("--worker", choices=["ours", "trl"])
    p.add_argument("--cell")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.worker:
        B.worker(args.worker, json.loads(args.cell), args, ours_table={"ours": OursEnv}, build=build_trl_env)
        return
    grid = [{"group": int(g), "lora": lo, "lengths": ln, "beta": float(b), "turns": args.turns}
            for g, lo, ln, b in itertools.product(args.groups.split(","), args.loras.split(","),
                                                 args.lengths.split(","), args.betas.split(","))]
    saved = B.run_cells(grid, args, key, lambda cell: B.measure(cell, args, script=__file__), B.table)
    wanted = {key(c) for c in grid}
    print(f"\n{saved['machine'].get('cpu', '')}: {env_spec({'turns': args.turns})}, {args.prompts} prompts x group, "
          f"up to {args.new_tokens} tokens a turn; targets (bold where met): time ratio <= "
          f"{B.TARGETS_MET['time_ratio']}, memory ratio <= {B.TARGETS_MET['memory_ratio']}")
    print(B.table([r for r in saved["cells"] if key(r["cell"]) in wanted]))


if __name__ == "__main__":
    main()
