"""The text a completion adds after its prompt, as a chat model reads it.

A preference pair's (or a scored response's) completion is tokenized as the text that follows the
prompt's rendering: for a plain prompt without a chat template, the completion and EOS; with a chat
template, the assistant turn's rendering cut off where the prompt's ends (the template must render
the prompt the same way once a completion follows it). Used by DPO's and the reward model's data
(``algorithms/dpo_data``) and by the reward-model scorer (``rewards/reward_model``), so a policy's
completions reach a reward model in the form it was trained on.
"""

from __future__ import annotations

from typing import Any

from posttrain.data import is_conversational, prompt_text


def _templated(tokenizer, prompt: Any, chat_template: bool) -> bool:
    return is_conversational(prompt) or (chat_template and bool(getattr(tokenizer, "chat_template", None)))


def completion_text(tokenizer, prompt: Any, completion: Any, chat_template: bool = True) -> str:
    """The text a completion adds after ``prompt_text(prompt)`` (see the module docstring)."""
    if not _templated(tokenizer, prompt, chat_template):
        if is_conversational(completion):
            raise ValueError("a conversational completion needs a chat template (or a conversational prompt)")
        return completion + (tokenizer.eos_token or "")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational data, but the tokenizer has no chat template")
    p_msgs = prompt if is_conversational(prompt) else [{"role": "user", "content": prompt}]
    c_msgs = completion if is_conversational(completion) else [{"role": "assistant", "content": completion}]
    p_text = prompt_text(tokenizer, prompt, chat_template)
    full = tokenizer.apply_chat_template(list(p_msgs) + list(c_msgs), tokenize=False)
    if not full.startswith(p_text):
        raise ValueError("the chat template renders the prompt differently once a completion follows it, "
                         "so the completion cannot be cut off at the prompt's end")
    text = full[len(p_text):]
    eos = tokenizer.eos_token
    if eos and (k := text.rfind(eos)) >= 0 and not text[k + len(eos):].strip():
        text = text[:k + len(eos)]
    return text
