"""The Constitutional AI loop with a scripted model: the order of stages, what each prompt holds,
the pairs and their kept critiques, skips, and random principle draws."""

import random

from posttrain.rlaif.constitution import (DEFAULT_PRINCIPLES, ConstitutionConfig, Principle, clean_revision,
                                          constitutional_pairs, critique_and_revise)


class Scripted:
    """A fake model for the loop: answers prompts, critiques, and revisions by appending a mark."""

    def __init__(self):
        self.calls = []

    def __call__(self, requests, max_tokens, temperature):
        self.calls.append([r[-1]["content"] for r in requests])
        out = []
        for r in requests:
            text = r[-1]["content"]
            if text.startswith("Here is a request") and "Critique request:" in text:
                principle = text.split("Critique request: ")[1].split("\n")[0]
                out.append(f"critique of [{principle}]")
            elif "Revision request:" in text:
                response = text.split("Assistant response: ")[1].split("\n\nCritique:")[0]
                out.append(f"Revised response: {response}+")
            else:
                out.append("" if text == "empty please" else f"answer to {text}")
        return out


def test_pairs_hold_revised_as_chosen_original_as_rejected_and_critiques():
    model = Scripted()
    out = constitutional_pairs(model, ["Tell me about cats", "empty please"], ConstitutionConfig(max_new_tokens=8))
    pair, why = out[0]
    assert why == ""
    assert pair["prompt"] == "Tell me about cats"
    assert pair["rejected"] == "answer to Tell me about cats"
    assert pair["chosen"] == "answer to Tell me about cats+++"  # one revision per principle, in order
    assert [c["principle"] for c in pair["critiques"]] == [p.name for p in DEFAULT_PRINCIPLES]
    assert pair["critiques"][1]["critique"] == "critique of [Does this encourage violence?]"
    assert pair["critiques"][2]["revision"] == "answer to Tell me about cats+++"
    assert out[1] == (None, "empty original response")
    # 1 answering call + 3 principles x (critique + revision), each batched over both prompts
    assert len(model.calls) == 7 and all(len(c) == 2 for c in model.calls)


def test_unchanged_revision_is_skipped():
    def stubborn(requests, max_tokens, temperature):
        return ["same answer" if "Revision request" in r[-1]["content"] or "Critique" not in r[-1]["content"]
                else "fine" for r in requests]

    out = constitutional_pairs(stubborn, ["q"], ConstitutionConfig())
    assert out == [(None, "the revisions left the response unchanged")]


def test_empty_revision_keeps_the_previous_response():
    def empty_revisions(requests, max_tokens, temperature):
        return ["" if "Revision request" in r[-1]["content"] else "text" for r in requests]

    final, traces = critique_and_revise(empty_revisions, ["q"], ["original"], ConstitutionConfig())
    assert final == ["original"] and [t["revision"] for t in traces[0]] == ["", "", ""]


def test_random_principles_per_prompt_are_seeded():
    principles = tuple(Principle(f"p{i}", f"Q{i}?", f"Fix {i}.") for i in range(5))
    cfg = ConstitutionConfig(principles=principles, principles_per_prompt=2)
    _, t1 = critique_and_revise(Scripted(), ["a", "b", "c"], ["x", "y", "z"], cfg, random.Random(3))
    _, t2 = critique_and_revise(Scripted(), ["a", "b", "c"], ["x", "y", "z"], cfg, random.Random(3))
    assert [[s["principle"] for s in t] for t in t1] == [[s["principle"] for s in t] for t in t2]
    assert all(len(t) == 2 for t in t1)


def test_clean_revision():
    assert clean_revision("Revised response: Hello.") == "Hello."
    assert clean_revision('**Revision:** "Quoted"') == "Quoted"
    assert clean_revision("Plain") == "Plain"
