"""The episode runner on the tiny model: environments reset per episode with the row's seed, each
turn's decoded text reaches the environment, observations come back as chat-template deltas (the
exact SmolLM2 text), the episode reward is the environment's, and faults end only their episode."""

import pytest
import torch

from posttrain.algorithms.episodes import EpisodeRunner, TemplateError, delta_ids, delta_text
from posttrain.envs import Environment, Step, get_env
from posttrain.sampling.generation import SamplingConfig
from posttrain.sampling.turns import TurnLimits


@pytest.fixture(scope="module")
def stoppable(stoppable_dir):
    from posttrain.models import load_model

    model, tok = load_model(stoppable_dir)
    model.eval()
    return model, tok


def test_delta_is_what_the_template_writes_after_a_turn(stoppable):
    tok = stoppable[1]
    assert delta_text(tok, [{"role": "user", "content": "Higher."}]) == \
        "\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    assert delta_text(tok, [{"role": "tool", "name": "calculator", "content": "42"}]) == \
        "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # a template that rewrites an assistant turn once messages follow it cannot give deltas: refused
    rewriting = tok.chat_template.replace("message['content']", "(message['content'] if loop.last else 'x')")
    assert rewriting != tok.chat_template
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = rewriting
    with pytest.raises(TemplateError, match="renders an assistant turn differently"):
        delta_ids(tok2, [{"role": "user", "content": "Lower."}])


class Echo(Environment):
    """Three turns; reward 0.25 per turn; records what it was given."""

    seen: list = []

    def reset(self, row, seed):
        self.n = 0
        return [{"role": "user", "content": f"Say a word like apple. row {row['k']} seed {seed}"}]

    def step(self, text):
        Echo.seen.append(text)
        self.n += 1
        if self.n == 3:
            return Step([], reward=0.25, done=True, info={"success": 1.0})
        return Step([{"role": "user", "content": f"Say a word like apple. turn {self.n}"}], reward=0.25)


class Crash(Echo):
    def step(self, text):
        raise RuntimeError("boom")


def run(stoppable, cls, rows, G=2, max_turns=4):
    from posttrain.envs import EnvFactory

    model, tok = stoppable
    runner = EpisodeRunner(EnvFactory(cls.__name__, cls, {}, cls.__name__), TurnLimits(max_turns=max_turns))
    gens = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    return runner.generate_and_score(model, tok, rows, G, SamplingConfig(temperature=1.0, max_new_tokens=40),
                                     prompt_generators=gens)


def test_episodes_reach_the_environment_and_carry_its_reward(stoppable):
    Echo.seen = []
    batch, metrics = run(stoppable, Echo, [{"k": 1}, {"k": 2}])
    r = batch.rollouts
    done = [i for i in range(4) if not bool(r.clipped_B[i])]
    assert done, "no episode reached the environment's end"
    for b in done:
        assert batch.rewards_B[b] == pytest.approx(0.75) and "turn 2" in batch.texts[b]
    assert len(Echo.seen) >= 3 * len(done)
    holes = (r.completion_mask_BC == 0) & (r.completion_ids_BC != stoppable[1].pad_token_id)
    assert holes.sum() > 0
    assert metrics["episode/turns"] > 1 and 0 <= metrics["episode/truncated"] <= 1
    # the first messages are the row's (the same for a group: one shared prompt)
    assert "row 1 seed" in batch.texts[0] and "row 2 seed" in batch.texts[2]


def test_an_environment_fault_ends_its_episode_recorded_not_the_run(stoppable):
    batch, metrics = run(stoppable, Crash, [{"k": 1}])
    assert metrics["episode/env_errors"] == 1.0 and batch.rewards_B.tolist() == [0.0, 0.0]
    assert metrics["episode/turns"] == 1.0  # ended at the fault


def test_guess_number_spec_runs_episodes(stoppable):
    factory = get_env("guess_number(hi=8)")
    rows = factory.rows("train", 2, 0)
    model, tok = stoppable
    batch, metrics = EpisodeRunner(factory, TurnLimits(max_turns=3)).generate_and_score(
        model, tok, rows, 2, SamplingConfig(temperature=1.0, max_new_tokens=8),
        prompt_generators=[torch.Generator().manual_seed(i) for i in range(2)])
    assert batch.rewards_B.shape == (4,) and set(batch.rewards_B.tolist()) <= {0.0, 1.0}
    assert "episode/turns" in metrics


class Scripted(torch.nn.Module):
    """The tiny model made to write ``script`` (one forward call, one next token): a batch of one."""

    def __init__(self, model, script):
        super().__init__()
        self.inner, self.script, self.calls = model, list(script), 0
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, **kw):
        out = self.inner(**kw)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        out.logits[:, -1, token] += 1e4
        return out


class Lower(Environment):
    def reset(self, row, seed):
        self.n = 0
        return [{"role": "user", "content": "Guess my number."}]

    def step(self, text):
        self.n += 1
        return Step([], reward=1.0, done=True) if self.n == 2 else Step([{"role": "user", "content": "Lower."}])


def test_a_template_that_drops_earlier_thinking_does_not_change_the_trained_tokens(stoppable):
    """Qwen3-style: earlier assistant turns are rendered without their <think> block. Re-rendering the
    conversation (what a rollout that re-tokenizes does) loses the first turn's sampled thinking;
    the episode keeps exactly the sampled ids."""
    from posttrain.envs import EnvFactory

    model, tok = stoppable
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = tok.chat_template.replace(
        "message['content']",
        "((message['content'].split('</think>')[-1]) if message['role'] == 'assistant' and not loop.last "
        "else message['content'])")
    eot = tok.eos_token_id
    turn1 = tok("<think>hmm</think>7", add_special_tokens=False)["input_ids"] + [eot]
    turn2 = tok("<think>lower</think>3", add_special_tokens=False)["input_ids"] + [eot]
    runner = EpisodeRunner(EnvFactory("lower", Lower, {}, "lower"), TurnLimits(max_turns=3))
    batch, _ = runner.generate_and_score(Scripted(model, turn1 + turn2), tok2, [{"k": 1}], 1,
                                         SamplingConfig(temperature=1.0, max_new_tokens=16))
    r = batch.rollouts
    ids, mask = r.completion_ids_BC[0].tolist(), r.completion_mask_BC[0].tolist()
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == turn1 + turn2 and batch.rewards_B.tolist() == [1.0]
    delta = delta_ids(tok2, [{"role": "user", "content": "Lower."}])
    assert ids[:len(turn1) + len(delta) + len(turn2)] == turn1 + delta + turn2
    # the hazard: the template's own rendering of the same conversation drops the first turn's thinking
    messages = [{"role": "user", "content": "Guess my number."}, {"role": "assistant", "content": "<think>hmm</think>7"},
                {"role": "user", "content": "Lower."}, {"role": "assistant", "content": "<think>lower</think>3"}]
    rerendered = tok2.apply_chat_template(messages, tokenize=False)
    assert "<think>hmm</think>" not in rerendered and "<think>lower</think>" in rerendered


def test_tool_arithmetic_episode_calls_the_calculator_and_reports_tool_metrics(stoppable):
    """The model (scripted) calls the calculator in the Hermes form, gets the real product back as a
    tool message, then answers it: reward 1, and the step's metrics count the call; a malformed call
    in the other episode is an error observation, counted, not a crash."""
    model, tok = stoppable
    factory = get_env("tool_arithmetic")
    row = factory.rows("test", 1, 0)[0]
    eos = [tok.eos_token_id]
    call = tok(f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{row["a"]} * {row["b"]}"}}}}\n'
               "</tool_call>", add_special_tokens=False)["input_ids"] + eos
    answer = tok(f"Answer: {row['answer']}", add_special_tokens=False)["input_ids"] + eos
    runner = EpisodeRunner(factory, TurnLimits(max_turns=3))
    batch, metrics = runner.generate_and_score(Scripted(model, call + answer), tok, [row], 1,
                                               SamplingConfig(temperature=1.0, max_new_tokens=64))
    assert batch.rewards_B.tolist() == [1.0] and row["answer"] in batch.texts[0]
    assert metrics["episode/tool_calls"] == 1.0 and metrics["episode/correct"] == 1.0
    assert metrics["episode/tool_parse_failures"] == 0.0 and metrics["episode/turns"] == 2.0
    bad = tok('<tool_call>{"name": "calculator", "arguments": </tool_call>', add_special_tokens=False)["input_ids"] + eos
    batch, metrics = runner.generate_and_score(Scripted(model, bad + answer), tok, [row], 1,
                                               SamplingConfig(temperature=1.0, max_new_tokens=64))
    assert metrics["episode/tool_parse_failures"] == 1.0 and metrics["episode/env_errors"] == 0.0
    assert "error:" in batch.texts[0] and batch.rewards_B.tolist() == [1.0]


def test_episode_metrics_of_a_step_count_every_sampling_round():
    """With dynamic sampling a step samples several rounds; its episode rates are over every episode
    sampled (the last round alone once reported success 0 beside a mean reward of 0.36), counts summed."""
    from posttrain.algorithms.collect import merge_rounds

    rounds = [({"episode/success": 1.0, "episode/turns": 2.0, "env/calls": 4.0, "env/errors/total": 1.0}, 2),
              ({"episode/success": 0.0, "env/calls": 6.0, "env/errors/total": 0.0}, 6)]
    assert merge_rounds(rounds) == {"episode/success": 0.25, "episode/turns": 2.0, "env/calls": 10.0,
                                    "env/errors/total": 1.0}
    assert merge_rounds([]) == {}
