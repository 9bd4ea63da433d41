"""A scalar head on a causal LM's trunk: the reward model's score and PPO's value function.

Both read the trunk's hidden states (the decoder stack, ``models.split.split_model``), never the
vocabulary logits:

- ``sequence_scores``: one number per (prompt, completion), the head applied to the hidden state
  of the completion's last token (the reward model; Ouyang et al. 2022, Stiennon et al. 2020).
- ``ValueModel.values``: one number per completion token t, the head applied to the state that
  predicts token t, i.e. V(s_t) of the prefix before it (PPO's critic). Both go through
  ``grouped.rollout_hidden``, so a prompt shared by several completions is run once.

``ValueModel`` is the head on either the policy's own trunk under a separate LoRA adapter (peft
multi-adapter: the adapter is switched in for value passes and switched back) or on a separate
model. ``TrainState`` lets a trainer put the head (and a value adapter) into the atomic checkpoint
that ``algorithms.run.Run`` writes, through the optimizer slot.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from posttrain.models import save_pretrained
from posttrain.runtime import distributed
from posttrain.sampling.generation import Rollouts
from posttrain.objectives.grouped import rollout_hidden
from posttrain.models.split import split_model

HEAD_FILE = "value_head.safetensors"
HEAD_META = "value_head.json"


class ValueHead(nn.Module):
    """``Linear(hidden, 1)``; weight ~ N(0, 1/(H+1)), bias 0 (OpenRLHF's critic head init), so
    initial scores are small whatever the trunk. Works in float32 whatever the trunk's dtype."""

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, hidden_size, generator=g) / (hidden_size + 1))
            self.linear.bias.zero_()

    def forward(self, h_xH: torch.Tensor) -> torch.Tensor:
        return self.linear(h_xH.to(self.linear.weight.dtype)).squeeze(-1)


def hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    size = getattr(cfg, "hidden_size", None)
    if not size:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__} (config.hidden_size)")
    return int(size)


def trunk_of(model) -> nn.Module:
    """The decoder stack whose ``last_hidden_state`` the head reads (works through peft)."""
    split = split_model(model)
    if isinstance(split, str):
        raise ValueError(f"a value/reward head needs the model's trunk: {split}")
    return split[0]


@contextlib.contextmanager
def keep_requires_grad(model):
    """Put every parameter's ``requires_grad`` back as it was when the block ends. peft's
    ``set_adapter`` and the end of ``disable_adapter()`` leave only the active adapter trainable,
    which would silently freeze a second adapter (the critic's) that the optimizer trains."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def use_adapter(model, name: str | None):
    """Run the block with peft adapter ``name`` active (None: leave the model as it is), then switch
    back, with every ``requires_grad`` flag as it was (``keep_requires_grad``)."""
    if name is None or getattr(model, "active_adapter", None) == name:
        yield model
        return
    previous = model.active_adapter
    with keep_requires_grad(model):
        model.set_adapter(name)
        try:
            yield model
        finally:
            model.set_adapter(previous)


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows) + extra)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, :len(r)] = 1
    return ids, mask


def sequence_scores(trunk, head: ValueHead, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    pad_id: int) -> torch.Tensor:
    """``s_B``: the head on the hidden state of the last token of prompt + completion.

    ``len(completions)`` is a multiple G of ``len(prompts)``: completions ``p*G .. p*G+G-1`` follow
    prompt p, which is run once for its G completions. Differentiable when grad is enabled."""
    from posttrain.sampling.generation import left_pad

    P, B = len(prompts), len(completions)
    if P == 0 or B % P:
        raise ValueError(f"{B} completions do not divide into groups over {P} prompts")
    device = next(head.parameters()).device
    prompt_PL, pmask_PL = left_pad(prompts, pad_id)
    # One pad column more than the longest completion: rollout_hidden returns the state that
    # *predicts* token t, so the state after a completion's last token is the one at t = length.
    comp_BC, cmask_BC = _pad_right(completions, pad_id, extra=1)
    rollouts = Rollouts(prompt_PL.to(device), pmask_PL.to(device), comp_BC.to(device), cmask_BC.to(device),
                        torch.zeros(comp_BC.shape, device=device), torch.zeros(B, dtype=torch.bool, device=device),
                        B // P)
    h_BCH = rollout_hidden(trunk, rollouts)
    last_B = torch.tensor([len(c) for c in completions], device=h_BCH.device)
    return head(h_BCH[torch.arange(B, device=h_BCH.device), last_B])


def save_head(head: ValueHead, out_dir: str | Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(out_dir / HEAD_FILE))
    (out_dir / HEAD_META).write_text(json.dumps({"hidden_size": head.hidden_size, **(meta or {})}, indent=1))


def load_head(path: str | Path, device: str | torch.device = "cpu") -> tuple[ValueHead, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_FILE} (not a reward or value model saved by posttrain)")
    meta = json.loads((path / HEAD_META).read_text()) if (path / HEAD_META).is_file() else {}
    state = load_file(str(path / HEAD_FILE))
    head = ValueHead(int(meta.get("hidden_size") or state["linear.weight"].shape[1]))
    head.load_state_dict(state)
    return head.to(device), meta


class ParamSet:
    """Named parameters seen as one state dict (e.g. the tensors of one LoRA adapter)."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]):
        self.named = list(named)

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {n for n, _ in self.named}:
            raise RuntimeError("saved parameters do not match the model's (different adapter or config?)")
        for n, p in self.named:
            distributed.copy_into(p, state[n])  # FSDP: a sharded p takes its saved local shard


def adapter_params(model, adapter: str) -> ParamSet:
    """The LoRA tensors of one peft adapter (``...lora_A.<adapter>.weight``, ...)."""
    tag = f".{adapter}."
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and tag in n]
    if not named:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    return ParamSet(named)


class ValueModel:
    """``V(s_t) = head(trunk(s_t))`` on either

    - the policy's own model under its peft adapter ``adapter`` (``value_model=adapter``): the value
      function shares the policy's frozen base weights and owns a LoRA adapter plus the head;
    - a separate model (``adapter=None``), trained whole or through its own LoRA adapter.
    """

    def __init__(self, model, head: ValueHead, adapter: str | None = None):
        self.model, self.head, self.adapter = model, head, adapter
        self.trunk = trunk_of(model)
        self.refresh()

    def refresh(self) -> None:
        """Look up the model's trained tensors (again after FSDP sharding, which replaces them)."""
        if self.adapter is not None:
            self.weights = adapter_params(self.model, self.adapter)
        else:
            self.weights = ParamSet([(n, p) for n, p in self.model.named_parameters() if p.requires_grad])

    def parameters(self) -> list[torch.Tensor]:
        return self.weights.parameters() + list(self.head.parameters())

    def values(self, rollouts: Rollouts, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``v_BC``: V of the state before each completion token; 0 where the completion mask is 0."""
        mask_BC = rollouts.completion_mask_BC
        if rows is not None:
            G = rollouts.group_size
            mask_BC = mask_BC[(rows[:, None] * G + torch.arange(G, device=rows.device)[None, :]).reshape(-1)]
        with use_adapter(self.model, self.adapter):
            h_BCH = rollout_hidden(self.trunk, rollouts, rows)
        return self.head(h_BCH) * mask_BC.to(torch.float32)

    def state_dict(self) -> dict:
        return {"weights": self.weights.state_dict(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])
        self.head.load_state_dict(state["head"])

    def train(self, mode: bool = True) -> None:
        self.head.train(mode)
        if self.adapter is None:
            self.model.train(mode)

    def save(self, out_dir: str | Path, tokenizer=None, meta: dict | None = None,
             state_dict: dict | None = None) -> Path:
        """A value model directory: the trunk in HF format (LoRA adapter or full model) plus the
        head; ``load_head`` + ``models.load_model`` read it back (as a reward model's).
        ``state_dict``: the model's weights to write instead of its own (an FSDP-sharded model's
        gathered ``distributed.full_state_dict``)."""
        out_dir = Path(out_dir)
        kw = {"state_dict": state_dict} if state_dict is not None else {}
        if self.adapter is None:
            save_pretrained(self.model, out_dir, **kw)
        else:  # peft writes a non-default adapter to <dir>/<name>/: save beside, then move up
            tmp = out_dir.parent / f".{out_dir.name}.tmp"
            save_pretrained(self.model, tmp, selected_adapters=[self.adapter], **kw)
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in (tmp / self.adapter).iterdir():
                f.replace(out_dir / f.name)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        save_head(self.head, out_dir, meta)
        return out_dir


class TrainState:
    """Stands in for the optimizer in ``Run.checkpoint`` / ``Run.restore``: its state dict holds the
    optimizer's state *and* the extra trainable modules' tensors (a head, a value adapter, a
    separate value model), so they are written inside the same atomic checkpoint (``optimizer.pt``)
    and restored exactly. ``Run`` itself saves only the policy in HF format."""

    def __init__(self, optimizer: torch.optim.Optimizer, **parts):
        self.optimizer, self.parts = optimizer, parts

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **{k: v.state_dict() for k, v in self.parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.parts.items():
            v.load_state_dict(state[k])
        self.optimizer.load_state_dict(state["optimizer"])


def clip_and_norm(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip ``params``' gradients to ``max_norm`` (0 = no clipping); returns their norm before.
    FSDP-sharded gradients among them: the global norm (``distributed.clip_grad_norm``)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if any(distributed.is_dtensor(p) for p in params):
        return float(distributed.clip_grad_norm(params, max_norm))
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params])))

