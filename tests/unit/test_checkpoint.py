"""Checkpoints: atomic, pruned, and a resume in a fresh process reproduces the weights exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.runtime.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint

WORKER = Path(__file__).with_name("ckpt_worker.py")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_in_fresh_process_gives_identical_weights(tmp_path, mode):
    for phase in ("first", "resume"):
        subprocess.run([sys.executable, str(WORKER), str(tmp_path), mode, phase], check=True, timeout=300)
    first, resumed = torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "resume.pt")
    assert first.keys() == resumed.keys()
    trained = [n for n in first if "lora_" in n] if mode == "lora" else list(first)
    assert trained
    for name in first:
        assert torch.equal(first[name], resumed[name]), name
    # the check can fail: the trained weights did move during the last two steps
    at_ckpt = torch.load(tmp_path / "at-checkpoint.pt")
    assert all(not torch.equal(at_ckpt[n], first[n]) for n in trained)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-3"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and state["pos"] == 12


def test_keep_last_prunes_and_leaves_no_temp_dirs(tmp_path, tiny):
    model, _ = tiny
    save_checkpoint(tmp_path, 2, model)
    (tmp_path / "checkpoints" / "step-2").rename(tmp_path / "checkpoints" / ".damaged-step-2")  # set aside on a resume
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-3", "step-4"]
    # a damaged checkpoint set aside is not a checkpoint: not counted, pruned or overwritten
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".damaged-step-2", "step-3", "step-4"]


def test_incomplete_checkpoint_is_ignored(tmp_path, tiny):
    model, _ = tiny
    save_checkpoint(tmp_path, 5, model)
    (tmp_path / "checkpoints" / "step-9").mkdir()  # a crash mid-write would leave no state.json
    (tmp_path / "checkpoints" / ".tmp-step-10-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-5"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step-9", model)


def test_full_model_weights_round_trip(tmp_path, tiny):
    from posttrain.models import tiny_model

    model, _ = tiny
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path, 1, model)
    other, _ = tiny_model(seed=1)
    load_checkpoint(latest_checkpoint(tmp_path), other, restore_rng=False)
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
