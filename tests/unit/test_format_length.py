"""format reward (regex presets) and the DAPO soft overlong penalty."""

from __future__ import annotations

import time

import pytest

from posttrain.rewards.format import format_reward
from posttrain.rewards.length import count_tokens, length_penalty


@pytest.mark.parametrize(
    "completion,pattern,expected",
    [
        ("17 + 58: 7 + 8 = 15, carry 1.\nAnswer: 75", "answer_line", 1.0),
        ("  reasoning\nmore reasoning\n  Answer: 75  \n", "answer_line", 1.0),  # outer whitespace ignored
        ("reasoning\n**Answer:** 75", "answer_line", 1.0),  # markdown bold marker
        ("Answer: 75", "answer_line", 0.0),  # no reasoning before the answer line
        ("reasoning\nAnswer: 75\nand then more text", "answer_line", 0.0),  # must be the last line
        ("reasoning\nAnswer:", "answer_line", 0.0),  # empty answer
        ("reasoning. Answer: 75", "answer_line", 0.0),  # not on its own line
        ("no answer line at all", "answer_line", 0.0),
        ("<think>add them</think>\n<answer>75</answer>", "think_answer", 1.0),
        ("<think>add them</think><answer>75</answer>", "think_answer", 1.0),
        ("<think> </think>\n<answer>75</answer>", "think_answer", 0.0),  # empty thinking
        ("<think>a</think>\n<answer>75</answer> trailing", "think_answer", 0.0),
        ("<answer>75</answer><think>a</think>", "think_answer", 0.0),  # wrong order
        ("<think>a</think><think>b</think><answer>1</answer>", "think_answer", 0.0),  # two think blocks
        (r"so we get \boxed{75}.", "boxed", 1.0),
        (r"\boxed{75}", "boxed", 0.0),  # nothing before the box
        (r"so \boxed{75} and more words", "boxed", 0.0),
        ("DONE", r"[A-Z]+", 1.0),  # a custom regex
        ("done", r"[A-Z]+", 0.0),
    ],
)
def test_format_reward(completion, pattern, expected):
    assert format_reward("prompt", completion, pattern=pattern) == expected


def test_format_default_is_answer_line_and_accepts_messages():
    assert format_reward("p", "think\nAnswer: 1") == 1.0
    assert format_reward("p", [{"role": "assistant", "content": "think\nAnswer: 1"}]) == 1.0
    assert format_reward("p", None) == 0.0


@pytest.mark.parametrize("pattern", ["answer_line", "think_answer", "boxed"])
def test_format_presets_are_fast_on_adversarial_input(pattern):
    # long single lines and many near-misses must not backtrack quadratically
    texts = ["x" * 200_000, "a\n" * 100_000 + "Answer:", "<think>" * 50_000, "\\boxed{" * 50_000 + "x"]
    start = time.perf_counter()
    for text in texts:
        assert format_reward("p", text, pattern=pattern) == 0.0
    assert time.perf_counter() - start < 5.0


# DAPO, max_len=10, buffer=4: free zone up to 10 - 4 = 6 tokens; R = (6 - L) / 4 for 6 < L <= 10
@pytest.mark.parametrize(
    "n_words,expected",
    [
        (0, 0.0),
        (6, 0.0),  # exactly at the free limit
        (7, -0.25),  # (6 - 7) / 4
        (8, -0.5),  # (6 - 8) / 4
        (10, -1.0),  # (6 - 10) / 4 = -1 exactly at max_len
        (11, -1.0),  # beyond max_len: -1
        (500, -1.0),
    ],
)
def test_length_penalty_dapo_formula(n_words, expected):
    completion = " ".join(["w"] * n_words)
    assert length_penalty("p", completion, max_len=10, buffer=4) == pytest.approx(expected)


def test_length_penalty_buffer_zero_is_a_step():
    # buffer 0: no ramp, 0 up to max_len, -1 after (and no division by zero)
    assert length_penalty("p", "a b c", max_len=3, buffer=0) == 0.0
    assert length_penalty("p", "a b c d", max_len=3, buffer=0) == -1.0


def test_length_penalty_defaults():
    # defaults max_len=1024, buffer=256: 768 words free, 896 words -> (768 - 896) / 256 = -0.5
    assert length_penalty("p", "w " * 768) == 0.0
    assert length_penalty("p", "w " * 896) == -0.5


def test_length_penalty_token_counting_sources():
    text = "Answer: 75, done."  # 3 whitespace words
    assert count_tokens(text) == 3
    # completion_ids (TRL passes the generated ids) take precedence over everything
    assert count_tokens(text, tokenizer=list, completion_ids=[1] * 9) == 9
    # a callable tokenizer returning a list: here characters, 17 of them
    assert count_tokens(text, tokenizer=list) == 17
    # max_len=10, buffer=4: 17 chars > 10 -> -1; 3 words -> 0; 8 ids -> (6 - 8) / 4 = -0.5
    assert length_penalty("p", text, max_len=10, buffer=4, tokenizer=list) == -1.0
    assert length_penalty("p", text, max_len=10, buffer=4) == 0.0
    assert length_penalty("p", text, max_len=10, buffer=4, completion_ids=list(range(8))) == -0.5


def test_length_penalty_with_a_real_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "Answer": 1, ":": 2, "75": 3, ",": 4, "done": 5, ".": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    # Whitespace splits punctuation off: Answer : 75 , done . -> 6 tokens (vs 3 words)
    assert count_tokens("Answer: 75, done.", tokenizer=tok) == 6
    # 6 tokens, max_len=8, buffer=4: free up to 4 -> (4 - 6) / 4 = -0.5
    assert length_penalty("p", "Answer: 75, done.", max_len=8, buffer=4, tokenizer=tok) == -0.5


@pytest.mark.parametrize("max_len,buffer", [(0, 0), (10, 11), (10, -1)])
def test_length_penalty_rejects_bad_settings(max_len, buffer):
    with pytest.raises(ValueError):
        length_penalty("p", "x", max_len=max_len, buffer=buffer)


def test_training_rollouts_count_length_in_tokens(tiny):
    """GRPO/PPO/pairs scoring passes each completion's sampled ids as `completion_ids`, so the
    length penalty counts tokens (a random tiny model's text has few spaces: words would undercount)."""
    import torch

    from posttrain import rewards as rw
    from posttrain.algorithms.collect import generate_and_score
    from posttrain.sampling.generation import SamplingConfig

    model, tok = tiny
    fn = rw.from_spec("length(max_len=12,buffer=8)")
    batch = generate_and_score(model, tok, [{"prompt": "Count with me"}], 6, SamplingConfig(max_new_tokens=12),
                               fn, torch.Generator().manual_seed(0))
    n_B = batch.rollouts.lengths_B.tolist()
    expected = [0.0 if n <= 4 else (-1.0 if n > 12 else (4 - n) / 8) for n in n_B]
    assert batch.rewards_B.tolist() == pytest.approx(expected)
    words = [len(t.split()) for t in batch.texts]
    assert words != n_B  # the word count would have given other rewards
