"""The doctrine's decision tree (RL_DOCTRINE.md, "Method Selection") as a pure function.

    recommend(data_path, columns, judge, reward, gpu_memory_gb, model, teacher, probe) -> Recommendation

walks the tree in the doctrine's order, recording every branch taken as a reason:

    -. an environment (--env: rows, turns and rewards of its own)? -> GRPO on its episodes
    0. demonstrations (TRL's SFT formats: messages, prompt +
       completion, text)?                                          -> SFT, the stage before RL
    0b. a stronger teacher with the same tokenizer (--teacher)?   -> on-policy distillation
    1. preference pairs (chosen/rejected columns)?               -> DPO
    2. verifiable rewards (answer/tests columns, or a programmatic
       --reward such as math, code, format, length)?              -> GRPO
       ...and the base model's pass rate on a sample (a probe,
       posttrain.doctrine.probe) near zero?                       -> RFT first (SFT / distillation named)
    3. nuanced preferences (a learned reward model in --reward)?  -> PPO + reward model
    4. AI feedback (--judge, or judge(...) in --reward)?          -> RLAIF (the judge as GRPO's reward)
    5. limited compute (the method above does not fit in
       --gpu-memory, even with LoRA)?                             -> a reward but no pairs: RFT (a
                                                                     verifiable reward) or online DPO (a
                                                                     learned one or a judge); pairs: DPO

The teacher's tokenizer is not checked here (no tokenizer is loaded): `posttrain recommend` and `train
auto` check it first (``algorithms.distill.check_tokenizers``, a ConfigError naming --teacher). The
probe is a callable ``probe(reward_spec) -> Probe`` passed in by the commands, which sample with the
trainers' code; the tree only reads its result. A learned reward or a judge is not probed: it has no
pass threshold.

Branches 0b and 2b live in posttrain.doctrine.stages. Memory comes from
`posttrain.doctrine.memory.estimate` with its default (GPU) assumptions. Defaults in the suggested
command follow the doctrine (posttrain.doctrine.defaults: beta, LoRA rank by model size and method,
learning rate, group size). LoRA is on by default ("LoRA fully matches FullFT for policy gradient
algorithms").

`choose_method(...)` is the same walk for `posttrain train auto`: it returns the
`posttrain train` method, the reasons and the config fields to set, or raises `NoMethodError` (a
user error) saying why no method can run directly.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any, Sequence

from posttrain.doctrine.defaults import _command, _fmt, method_defaults
from posttrain.doctrine.memory import estimate, model_shape, parse_memory, parse_size
from posttrain.errors import UserError

PREFERENCE_COLUMNS = ("chosen", "rejected")
DEMONSTRATION_COLUMNS = frozenset({"messages", "completion", "text"})
"""A column of TRL's SFT formats: the rows are examples to imitate (``data.SFT_FORMS``)."""
# column -> the reward that checks it (a verifiable reward)
VERIFIER_COLUMNS = {"answer": "math", "solution": "math", "ground_truth": "math", "tests": "code",
                    "test": "code", "test_list": "code", "target": "countdown"}
REWARD_NEEDS = {"math": ("answer",), "code": ("tests",), "countdown": ("target", "numbers")}
"""The columns a built-in reward scores against (a row without them cannot be scored)."""
VERIFIABLE = ("math", "code", "countdown")
LEARNED, JUDGE = ("reward_model",), ("judge",)
MEMORY_KIND = {"rlaif": "grpo", "rft": "dpo", "online-dpo": "dpo", "distill": "grpo"}
"""The memory estimate that bounds each stage: RFT and online DPO as DPO (one sequence pair at a time,
no value model; an upper bound for RFT, which has no reference), distillation as GRPO (the teacher in
the reference's place)."""


class NoMethodError(UserError, ValueError):
    """No method can train directly on the inputs given (``choose_method``); the message lists the reasons."""


@dataclasses.dataclass
class DataProfile:
    source: str | None
    kind: str
    """'preference', 'verifiable' (prompts + a column a verifier checks) or 'prompt'."""
    columns: list[str]
    rows: int | None = None
    reward: str | None = None
    """The reward the columns imply (math for answer, code for tests, a task's own reward)."""
    task: str | None = None


@dataclasses.dataclass
class Recommendation:
    method: str | None
    """'sft', 'distill', 'dpo', 'grpo', 'rft', 'ppo', 'rlaif', 'online-dpo', or None when the inputs give
    no training signal."""
    reasons: list[str]
    command: str
    defaults: dict[str, Any]
    """Config fields of `posttrain train <train_method>` the command sets."""
    alternatives: list[dict[str, Any]]
    """{"method", "why", "command"} for the other reasonable choices."""
    train_method: str | None = None
    """The `posttrain train` subcommand (rlaif -> grpo with a judge reward)."""
    memory_gb: float | None = None
    data: DataProfile | None = None
    fits: bool = True
    """False when even the leanest method does not fit --gpu-memory (the reasons say which model would)."""
    probe: dict[str, Any] | None = None
    """The base model's pass rate on a sample of the data (``probe.Probe.to_dict``), when measured."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def classify_columns(columns: Sequence[str]) -> tuple[str, str | None]:
    cols = set(columns)
    if set(PREFERENCE_COLUMNS) <= cols:
        return "preference", None
    if DEMONSTRATION_COLUMNS & cols and "label" not in cols:  # with a label: KTO's unpaired preferences
        return "demonstrations", None
    if {"target", "numbers"} <= cols:
        return "verifiable", "countdown"
    for col, reward in VERIFIER_COLUMNS.items():
        if col in cols and col != "target":
            return "verifiable", reward
    return "prompt", None


def inspect_data(data_path: str | None = None, columns: Sequence[str] | None = None) -> DataProfile | None:
    """Columns, row count and kind of a data file (or a built-in task name, or given columns)."""
    if data_path is None:
        if not columns:
            return None
        kind, reward = classify_columns(columns)
        return DataProfile(None, kind, list(columns), None, reward)
    from posttrain import data as datamod

    path = Path(data_path).expanduser()
    name = str(data_path).split("(")[0]  # a task spec: NAME or NAME(ARGS), whose arguments may hold dots
    if not path.exists() and "/" not in name and "." not in name:
        from posttrain.data.tasks import task_info

        try:
            info = task_info(str(data_path))
        except KeyError:
            pass
        else:
            return DataProfile(str(data_path), "verifiable", list(info.columns), None, info.reward, task=str(data_path))
    rows, _ = datamod._read(path, str(data_path), None)
    rows = list(rows)
    cols: list[str] = []
    for _, row in rows[:200]:
        if isinstance(row, dict):
            cols += [k for k in row if k not in cols]
    kind, reward = classify_columns(cols)
    load_kind = {"preference": "preference", "demonstrations": "sft"}.get(kind, "prompt")
    datamod.load_rows(data_path, load_kind)  # DataError names the line
    return DataProfile(str(data_path), kind, cols, len(rows), reward)


def _reward_names(reward: str | None) -> list[str]:
    """The reward names in the spec ``reward``; a wrong spec or an unknown name is a ``RewardSpecError``
    naming --reward (nothing is loaded: a reward model is not read here)."""
    if not reward:
        return []
    from posttrain.rewards import UnknownRewardError, list_rewards, parse_spec

    names = [name for name, _, _ in parse_spec(reward)]
    unknown = [n for n in names if n not in list_rewards()]
    if unknown:
        raise UnknownRewardError(reward, f"unknown reward {unknown[0]!r}; known: {', '.join(list_rewards())}")
    return names


def _fits(method: str, model: Any, budget: float | None, lora: Any = "auto", **kw: Any) -> tuple[bool, float]:
    est = estimate(model, MEMORY_KIND.get(method, method), lora, **kw)
    return (budget is None or est.total_gb <= budget), est.total_gb


def largest_model_that_fits(method: str, budget: float, upper: float, **kw: Any) -> float | None:
    """The largest model size (parameters, Llama-3-shaped) whose LoRA run fits in ``budget`` GB."""
    lo, hi = 1e8, float(upper)
    if not _fits(method, lo, budget, **kw)[0]:
        return None
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if _fits(method, mid, budget, **kw)[0] else (lo, mid)
    return lo


NAMES = {"dpo": "DPO", "grpo": "GRPO", "ppo": "PPO", "rlaif": "RLAIF", "rft": "RFT", "online-dpo": "online DPO",
         "distill": "on-policy distillation", "sft": "SFT"}
LEAN = ("dpo", "rft", "online-dpo")
"""The methods the limited-compute branch falls back to: no value model, one sequence pair at a time."""
LEAN_WHY = {
    "rft": "the reward is verifiable: RFT keeps the samples that pass it and fine-tunes on them with SFT's loss "
           "(no reference model, no pairs to make)",
    "online-dpo": "the reward is learned or a judge, with no pass threshold: online DPO pairs each prompt's best "
                  "sample with its worst and runs DPO on them, round after round (Xiong et al. 2024)"}


def _limited_compute(method: str, data: DataProfile | None, model: Any, model_arg: str | None, n_params: float,
                     budget: float | None, reward_spec: str | None, reasons: list[str],
                     alternatives: list[dict]) -> tuple[str, float, bool]:
    """5. When the method does not fit with LoRA and there is a reward but no pairs: RFT (a verifiable
    reward) or online DPO (a learned one, a judge), the leanest stages that sample; with pairs, DPO.
    When even that does not fit, say which model size would. Returns (method, GB, fits)."""
    ok, gb = _fits(method, model, budget)
    if budget is None:
        reasons.append(f"memory: about {gb:.1f} GB with LoRA (`posttrain memory`); no --gpu-memory given, not checked")
        return method, gb, True
    if ok:
        reasons.append(f"limited compute? no: {NAMES[method]} with LoRA needs about {gb:.1f} GB <= {budget:g} GB")
        return method, gb, True
    lean = method
    if method in LEAN or reward_spec is None:
        reasons.append(f"limited compute? yes: {NAMES[method]} with LoRA needs about {gb:.1f} GB > {budget:g} GB")
    else:
        lean = "rft" if method in ("grpo", "distill") and not _learned_or_judge(reward_spec) else "online-dpo"
        other = "online-dpo" if lean == "rft" else "rft"
        reasons.append(f"limited compute? yes: {NAMES[method]} with LoRA needs about {gb:.1f} GB > {budget:g} GB; "
                       f"a reward but no pairs -> {NAMES[lean]} (doctrine: 'Limited compute -> DPO', the simplest: "
                       f"no value or reward model, one sequence pair at a time): {LEAN_WHY[lean]}")
        alternatives.insert(0, {"method": method, "why": f"needs ~{gb:.1f} GB with LoRA: a larger GPU", "command": None})
        alternatives.append({"method": other, "why": LEAN_WHY[other], "command": _command(
            other, data, model_arg, method_defaults(other, n_params, reward=reward_spec))})
        alternatives.append({"method": "pairs+dpo", "why": "one offline round: sample several completions per "
                             f"prompt, score them with {reward_spec}, pair the best with the worst (doctrine: "
                             "'Generating preference pairs'), then DPO", "command": _pairs_command(
                                 data, model_arg, reward_spec) + " && " + _command(
                                 "dpo", data, model_arg, method_defaults("dpo", n_params), "pairs.jsonl")})
    ok, gb = _fits(lean, model, budget, micro_batch=1)
    if ok:
        reasons.append(f"{NAMES[lean]} with LoRA, one pair per micro-batch, needs about {gb:.1f} GB <= {budget:g} GB")
    else:
        _, q_gb = _fits(lean, model, budget, dtype="nf4", micro_batch=1)
        largest = largest_model_that_fits(MEMORY_KIND.get(lean, lean), budget, n_params, micro_batch=1)
        reasons.append(f"even {NAMES[lean]} with LoRA needs about {gb:.1f} GB > {budget:g} GB: use a smaller model "
                       + (f"(up to about {largest / 1e9:.2g}B fits)" if largest else "(none fits)")
                       + f"; a 4-bit base (QLoRA, bitsandbytes on GPU; not built into posttrain) would need "
                       f"about {q_gb:.1f} GB")
    return lean, gb, ok


def _learned_or_judge(reward_spec: str) -> bool:
    return any(n in LEARNED + JUDGE for n in _reward_names(reward_spec))


def _data_reason(data: DataProfile) -> str:
    return (f"data: {data.source or 'given columns'} has columns {', '.join(data.columns)}"
            + (f" ({data.rows} rows)" if data.rows else "") + (f" (built-in task {data.task})" if data.task else ""))


def _preference_branch(data: DataProfile | None, model_arg: str | None, reasons: list[str],
                       alternatives: list[dict[str, Any]]) -> str | None:
    """1. preference pairs -> DPO."""
    if not (data and data.kind == "preference"):
        reasons.append("preference pairs? no (no chosen/rejected columns)")
        return None
    reasons.append("preference pairs? yes: the data has chosen/rejected columns -> DPO (doctrine: 'Have "
                   "preference pairs -> DPO')")
    alternatives.append({"method": "rm+ppo", "why": "train a reward model on the pairs, then PPO: more control "
                         "for nuanced alignment, ~2x the memory (policy + value)",
                         "command": _command("rm", data, model_arg, {"lora": True})})
    return "dpo"


def _verifiable_branch(data: DataProfile | None, names: list[str], reward: str | None, reasons: list[str],
                       alternatives: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """2. verifiable rewards (the data's verifier column, or a programmatic --reward) -> GRPO.
    Returns (method, reward_spec)."""
    cols = set(data.columns) if data else set()
    method, reward_spec = None, reward
    missing = {n: [c for c in REWARD_NEEDS.get(n, ()) if c not in cols] for n in names if n in REWARD_NEEDS}
    missing = {n: m for n, m in missing.items() if m and data is not None}
    programmatic = [n for n in names if n not in LEARNED + JUDGE and n not in missing]
    for n, m in missing.items():
        reasons.append(f"the reward '{n}' needs column(s) {', '.join(m)}, which the data lacks: it would "
                       "return None for every row")
    if names and not programmatic and not any(n in LEARNED + JUDGE for n in names):
        reasons.append(f"verifiable rewards? no: --reward {reward} cannot score this data")
    elif data and data.kind == "verifiable" and data.reward and not names:
        reward_spec = data.reward
        col = next((c for c in data.columns if VERIFIER_COLUMNS.get(c) == data.reward), data.columns[-1])
        reasons.append(f"verifiable rewards? yes: the '{col}' "
                       f"column can be checked by the '{data.reward}' reward -> GRPO (doctrine: 'Have verifiable "
                       "rewards -> GRPO')")
        method = "grpo"
    elif programmatic:
        method = "grpo"
        reasons.append(f"verifiable rewards? yes: --reward {reward} is computed by a program "
                       f"({', '.join(programmatic)}) -> GRPO (doctrine: 'Have verifiable rewards -> GRPO')")
    elif not names:
        reasons.append("verifiable rewards? no (no answer/tests columns and no programmatic --reward)")
    else:
        reasons.append("verifiable rewards? no (--reward is a learned model or a judge)")
    if method == "grpo":
        alternatives.append({"method": "rloo / reinforce_pp", "why": "same data and reward, other advantage "
                             "estimators (--advantage rloo|reinforce_pp); REINFORCE++ can be more stable",
                             "command": None})
    return method, reward_spec


def _learned_branch(data: DataProfile | None, names: list[str], reward: str | None, model_arg: str | None,
                    n_params: float, reasons: list[str], alternatives: list[dict[str, Any]]) -> str | None:
    """3. nuanced preferences: a learned reward model in --reward -> PPO + reward model."""
    if not any(n in LEARNED for n in names):
        reasons.append("nuanced alignment with a reward model? no (no reward_model(...) in --reward)")
        return None
    reasons.append("nuanced alignment? yes: --reward uses a learned reward model -> PPO + reward model "
                   "(doctrine: 'Need nuanced alignment -> PPO + Reward Model')")
    alternatives.append({"method": "grpo", "why": "the reward model as GRPO's reward: no value model, about "
                         "half PPO's memory", "command": _command("grpo", data, model_arg, method_defaults(
                             "grpo", n_params, reward=reward))})
    return "ppo"


def _judge_branch(names: list[str], judge: str | None, reward: str | None, reward_spec: str | None,
                  reasons: list[str], alternatives: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """4. AI feedback: --judge, or judge(...) in --reward -> RLAIF. Returns (method, reward_spec)."""
    judge_in_reward = any(n in JUDGE for n in names)
    if not (judge or judge_in_reward):
        reasons.append("AI feedback? no (no --judge)")
        return None, reward_spec
    if not judge_in_reward:
        reward_spec = f"judge({judge})"
    reasons.append(f"scale with AI feedback? yes: a judge ({judge or reward}) can score completions -> RLAIF: "
                   "the judge's score as GRPO's reward (doctrine: 'Direct RLAIF')")
    alternatives.append({"method": "rlaif-labels+dpo", "why": "sample N responses per prompt, let the judge "
                         "pick chosen/rejected (`posttrain label`), then DPO: cheaper, offline",
                         "command": f"posttrain label --judge {shlex.quote(judge or 'judge.yaml')} --data "
                         "responses.jsonl --out pairs.jsonl"})
    return "rlaif", reward_spec


def _no_signal_reason(data: DataProfile | None, names: list[str], judge: str | None) -> str:
    """Why no method was chosen."""
    if data is None and not names and not judge:
        return "nothing to decide from: give --data (and --reward or --judge for prompt-only data)"
    from posttrain.rewards import list_rewards

    return ("no training signal: prompt-only data needs a reward (--reward, one of "
            f"{', '.join(list_rewards())}), a judge (--judge judge.yaml) or preference pairs")


def _pairs_command(data: DataProfile | None, model_arg: str | None, reward_spec: str | None) -> str:
    """The `posttrain pairs` command that makes the pairs DPO needs from prompt-only data."""
    source = data.source if data and data.source else "prompts.jsonl"
    src = ["--task", data.task] if data and data.task else ["--data", source]
    model_flag = ["--model", f"<a {model_arg} model>" if parse_size(model_arg) else model_arg] if model_arg else []
    return " ".join(shlex.quote(x) for x in ["posttrain", "pairs", *model_flag, *src, "--reward",
                                            reward_spec or "judge(judge.yaml)", "--n", "8", "--out", "pairs.jsonl"])


RANK_TABLE = {"dpo": "DPO table", "online-dpo": "DPO table", "sft": "SFT rank", "rft": "SFT rank"}


def _defaults_reason(defaults: dict[str, Any], n_params: float, train_method: str) -> str:
    rank = defaults.get("lora_rank")
    return (f"defaults: LoRA rank {rank} for a {n_params / 1e9:.3g}B model "
            f"({RANK_TABLE.get(train_method, 'LoRA for RL table')}), lr {_fmt(defaults['lr'])}"
            + (f", beta {_fmt(defaults['beta'])}" if "beta" in defaults else "")
            + (f", group size {defaults['group_size']}" if "group_size" in defaults else ""))


def _env_branch(env: str, model_arg: str | None, n_params: float) -> Recommendation:
    """An environment (``--env``) gives both the rows and the reward: GRPO on its episodes."""
    from posttrain.envs import get_env

    factory = get_env(env)  # an EnvError (a UserError) names the spec
    tools = ", ".join(getattr(fn, "__name__", "?") for fn in factory.tools) or "none"
    reasons = [f"an environment? yes: {env} (tools: {tools}) -> GRPO on its episodes: a group is K episodes of one "
               "row, the episode's reward (the sum of its turns') is the reward, the environment's tokens are "
               "context and never trained"]
    defaults = {"env": env, "max_turns": factory.max_turns or 4, **method_defaults("grpo", n_params)}
    reasons.append(_defaults_reason(defaults, n_params, "grpo"))
    alts = [{"method": "rloo", "why": "the group's leave-one-out mean as the baseline, no std division",
             "command": _command("grpo", None, model_arg, {**defaults, "advantage": "rloo"})},
            {"method": "ppo", "why": "a critic instead of the group's baseline: credit per token across the turns, "
             "for one more adapter and its passes", "command": _command(
                 "ppo", None, model_arg, {"env": env, "max_turns": defaults["max_turns"], "group_size": 2,
                                          **method_defaults("ppo", n_params)})}]
    if factory.tools:
        alts.append({"method": "sft", "why": f"a base model that never calls {tools} in the form the system prompt "
                     "shows scores 0 on every episode: SFT on a few demonstrations first (README: "
                     "examples/tool_arithmetic_sft_then_grpo.sh), then GRPO from its final/"})
    return Recommendation("grpo", reasons, _command("grpo", None, model_arg, defaults), defaults, alts, "grpo")


def recommend(data_path: str | None = None, columns: Sequence[str] | None = None, judge: str | None = None,
              reward: str | None = None, gpu_memory_gb: float | str | None = None,
              model: str | None = None, teacher: str | None = None, probe: Any = None,
              env: str | None = None) -> Recommendation:
    """Walk the doctrine's decision tree (module docstring); every branch taken becomes a reason.
    ``teacher``: a model spec whose tokenizer the caller checked; ``probe``: ``probe(reward_spec) ->
    posttrain.doctrine.probe.Probe``, called when the tree reaches GRPO with a verifiable reward;
    ``env``: an environment spec, which decides alone (GRPO on its episodes)."""
    from posttrain.models import EMBEDDED

    if env is not None:
        return _env_branch(env, model, model_shape(model or EMBEDDED).n_params)
    data = inspect_data(data_path, columns)
    budget = parse_memory(gpu_memory_gb) if gpu_memory_gb is not None else None
    model_arg = model
    model = model or EMBEDDED
    n_params = model_shape(model).n_params
    names = _reward_names(reward)
    reasons: list[str] = [_data_reason(data)] if data else []
    alternatives: list[dict[str, Any]] = []

    if data is not None and data.kind == "demonstrations":  # 0.
        reasons.append("demonstrations? yes: the data is in an SFT format (messages, prompt + completion, or text) "
                       "-> SFT, the stage before RL: imitate the examples; then DPO on pairs or GRPO with a reward")
        defaults = method_defaults("sft", n_params)
        reasons.append(_defaults_reason(defaults, n_params, "sft"))
        return Recommendation("sft", reasons, _command("sft", data, model_arg, defaults), defaults, alternatives, "sft",
                              None, data)
    reward_spec = reward or (data.reward if data is not None and data.kind == "verifiable" else None)
    from posttrain.doctrine.stages import probe_branch, teacher_branch

    method = teacher_branch(data, teacher, model_arg, n_params, reward_spec, reasons, alternatives)  # 0b.
    reward_spec = reward if method is None else reward_spec
    measured = None
    if method is None:  # 1.
        method = _preference_branch(data, model_arg, reasons, alternatives)
    if method is None:  # 2.
        method, reward_spec = _verifiable_branch(data, names, reward, reasons, alternatives)
        if method == "grpo" and probe is not None:  # 2b.
            method, measured = probe_branch(probe, data, model_arg, n_params, reward_spec, teacher, reasons,
                                            alternatives)
    if method is None:  # 3.
        method = _learned_branch(data, names, reward, model_arg, n_params, reasons, alternatives)
    if method is None:  # 4.
        method, reward_spec = _judge_branch(names, judge, reward, reward_spec, reasons, alternatives)
    if method is None:
        reasons.append(_no_signal_reason(data, names, judge))
        return Recommendation(None, reasons, "", {}, alternatives, None, None, data)
    # 5. limited compute
    method, lora_fit, fits = _limited_compute(method, data, model, model_arg, n_params, budget, reward_spec,
                                              reasons, alternatives)
    train_method = "grpo" if method == "rlaif" else method
    defaults = method_defaults(method, n_params, reward=reward_spec)
    if method == "distill":
        defaults = {"teacher": teacher, **defaults}
    if method == "rft" and measured:
        defaults["group_size"] = measured["group_size"]
    command = _command(train_method, data, model_arg, defaults)
    reasons.append(_defaults_reason(defaults, n_params, train_method))
    return Recommendation(method, reasons, command, defaults, alternatives, train_method, lora_fit, data,
                          fits=fits, probe=measured)


def choose_method(data: str | None = None, task: str | None = None, reward: str | None = None,
                  judge: str | None = None, model: str | None = None,
                  gpu_memory_gb: float | str | None = None, teacher: str | None = None,
                  probe: Any = None) -> tuple[str, list[str], dict[str, Any]]:
    """For `posttrain train auto`: ``(train_method, reasons, config_fields)``.

    ``train_method`` is a `posttrain train` method ('sft', 'distill', 'dpo', 'grpo', 'rft', 'ppo',
    'online-dpo'; RLAIF runs as 'grpo' with a judge reward); ``config_fields`` are the doctrine
    defaults to apply where the user set nothing (reward, teacher, lora, lora_rank, lr, beta,
    group_size, ...). Raises NoMethodError (with the reasons) when no method can train directly on
    these inputs (no signal, or nothing fits --gpu-memory)."""
    rec = recommend(data or task, None, judge, reward, gpu_memory_gb, model, teacher, probe)
    if rec.method is None or not rec.fits:
        raise NoMethodError("cannot pick a method to train directly:\n- " + "\n- ".join(rec.reasons))
    return rec.train_method, rec.reasons, dict(rec.defaults)


def check_reward_columns(source: str, rows: Sequence[dict], spec: str) -> None:
    """Refuse data that the rewards in ``spec`` could never score: a column a built-in reward scores
    against (``doctrine.select.REWARD_NEEDS``: math needs ``answer``...) that no row holds, unless the
    spec passes it as an option. A ``DataError`` naming the file and field, before any model loads
    (eval printed nan and exited 0; pairs sampled every prompt and made no pair). Rows that lack it
    here and there are scored None and counted, as before."""
    from posttrain.data import DataError
    from posttrain.rewards import parse_spec

    for name, _, options in parse_spec(spec):
        for column in REWARD_NEEDS.get(name, ()):
            if column not in options and all(row.get(column) is None for row in rows):
                raise DataError(str(source), None, column, f"no row holds it, and the reward {name!r} scores each "
                                "completion against it: add the column, or use a reward that does not need it")
