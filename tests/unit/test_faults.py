"""A GRPO run killed with SIGKILL again and again, then resumed each time with ``posttrain train grpo
--resume RUN`` and nothing else, ends with the same metrics, samples and final weights as a run
never stopped. Only the CLI touches the run directory: nothing is ever edited by hand.

Two passes over the same run, compared with one uninterrupted run:
- checkpoints every step, killed at each fault point of ``runtime/faults.py`` (after sampling,
  after the update, in the middle of a checkpoint write, in the middle of a metrics line);
- checkpoints every 3 steps, so a kill falls between checkpoints: the resume replays several
  steps and cuts several logged lines; killed once at a fault point, then at random times while
  it trains (a seeded delay after the resumed process said it resumed: each kill is checked to
  have landed during training, never in the interpreter's or the model's start-up).
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.runtime.tracking import read_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

STEPS = 8
FAULTS = ("collect:2", "update:2", "checkpoint.write:2", "metrics.write:2")
"""Each one kills one process of the first pass, in this order (N: the N-th arrival in that process)."""
BETWEEN = "metrics.write:6"
"""The second pass's first kill: steps 1-5 logged, step 6's line torn, the last checkpoint step 3."""
RANDOM_KILLS = 3


def command(model: str, data: str, out: Path, name: str, every: int = 1) -> list[str]:
    return ["train", "grpo", "--model", model, "--data", data, "--reward", "format(pattern=[a-m].*)",
            "--max-steps", str(STEPS), "--checkpoint-every", str(every), "--group-size", "4", "--prompts-per-step",
            "2", "--max-new-tokens", "8", "--lr", "1e-2", "--device", "cpu", "--rollout-dtype", "float32",
            "--no-eval-at-start", "--seed", "3", "--output-dir", str(out), "--name", name]


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings (every line must be JSON: no torn line may remain)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def resumes(run_dir: Path) -> int:
    path = run_dir / "resumes.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def resume(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return terminal.posttrain("train", "grpo", "--resume", run_dir, env={"POSTTRAIN_FAULT": fault} if fault else None)


def kill_while_training(run_dir: Path, delay: float) -> str:
    """Resume the run, wait until the process says it resumed (its checkpoint loaded, its logs
    open: training has begun), SIGKILL it ``delay`` seconds later; returns its stderr. Fails if
    it ended before the kill."""
    cmd = [sys.executable, "-m", "posttrain", "train", "grpo", "--resume", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_DEBUG", "POSTTRAIN_FAULT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(terminal.ROOT / "src"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(f"resumed {run_dir} at step"):
                started.set()
        started.set()  # the process ended (the assertions below say how)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(120) and proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before its kill {delay:.2f}s in:\n{''.join(lines)[-3000:]}"
        proc.kill()
    finally:
        proc.kill()
        proc.wait(60)
        reader.join(60)
    assert proc.returncode == -signal.SIGKILL
    return "".join(lines)


def same_run(run_dir: Path, straight: Path) -> None:
    """``run_dir`` finished as ``straight`` did: metrics, samples, final weights; nothing left over."""
    assert metrics(run_dir) == metrics(straight)
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    mine = load_file(run_dir / "final" / "adapter_model.safetensors")
    ref = load_file(straight / "final" / "adapter_model.safetensors")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    samples = lambda d: [json.loads(x)["completions"] for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(run_dir) == samples(straight)
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))
    assert all(json.loads(x)["changes"] == {} for x in (run_dir / "resumes.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, peaked_dir, toy_prompts) -> Path:
    """The uninterrupted run (a checkpoint every step) both passes are compared with."""
    out = tmp_path_factory.mktemp("straight")
    proc = terminal.posttrain(*command(peaked_dir, toy_prompts, out, "straight"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "straight"


def test_killed_at_every_fault_point_then_resumed_matches_the_uninterrupted_run(tmp_path, straight, peaked_dir,
                                                                                toy_prompts):
    run_dir = tmp_path / "killed"
    first = terminal.posttrain(*command(peaked_dir, toy_prompts, tmp_path, "killed"), env={"POSTTRAIN_FAULT": FAULTS[0]})
    assert killed(first), first.stderr[-2000:]
    seen = {"tmp": False, "torn": False}
    for fault in FAULTS[1:]:
        proc = resume(run_dir, fault)
        assert killed(proc), f"{fault}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert not (run_dir / "final").exists()
        seen["tmp"] |= any((run_dir / "checkpoints").glob(".tmp-step-*"))
        seen["torn"] |= not (run_dir / "metrics.jsonl").read_text().endswith("\n")
    assert seen == {"tmp": True, "torn": True}, "the faults did not leave what they should"
    final = resume(run_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    same_run(run_dir, straight)
    assert resumes(run_dir) == len(FAULTS)


def test_killed_between_checkpoints_and_at_random_times_then_resumed_matches(tmp_path, straight, peaked_dir,
                                                                             toy_prompts):
    run_dir = tmp_path / "sparse"
    first = terminal.posttrain(*command(peaked_dir, toy_prompts, tmp_path, "sparse", every=3),
                               env={"POSTTRAIN_FAULT": BETWEEN})
    assert killed(first), first.stderr[-2000:]
    assert [m["step"] for m in logged(run_dir)] == [1, 2, 3, 4, 5]  # and step 6's line torn
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-3"]
    step_seconds = sum(m["time/step"] for m in logged(straight)) / STEPS
    rng = random.Random(16)
    for kill in range(RANDOM_KILLS):
        count = resumes(run_dir)
        at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
        delay = rng.uniform(0.0, 0.6 * (STEPS - at) * step_seconds)  # well before the run would end
        said = kill_while_training(run_dir, delay)
        assert resumes(run_dir) == count + 1, said[-2000:]  # the kill landed after the checkpoint loaded
        if kill == 0:  # the first resume replays steps 4 and 5: their lines and step 6's torn one are cut
            assert f"resumed {run_dir} at step 3" in said and "dropped its incomplete last line" in said, said[-2000:]
    final = resume(run_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    same_run(run_dir, straight)
    assert resumes(run_dir) == 1 + RANDOM_KILLS


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl's complete lines, timings kept (a torn last line left out)."""
    return [r for _, r in read_lines(run_dir / "metrics.jsonl")[0]]
