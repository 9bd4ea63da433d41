"""Resume and run directories as a careless user meets them (issue 16): through the CLI, each bad
input gives exit 2, one message naming what is wrong and no traceback, and leaves the run
directory's bytes as they were; a damaged newest checkpoint, a torn last line and a stale temporary
checkpoint are repaired on resume with a message; a fresh run that fails before its first step
leaves no directory. Function-level tests for the pieces: the resume table, checkpoint damage and
fallback, torn-line reading, the run lock and default run names."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

from posttrain.errors import ResumeError, RunLockedError
from posttrain.runtime import checkpoint as ckpt
from posttrain.runtime import tracking
from posttrain.runtime.tracking import RunFileError, RunLock, read_jsonl, read_lines


def train_args(model: str, data: str, out: Path, name: str, steps: int = 2) -> list[str]:
    return ["train", "grpo", "--model", model, "--data", data, "--reward", "format(pattern=[a-m].*)",
            "--max-steps", str(steps), "--checkpoint-every", "1", "--group-size", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--rollout-dtype", "float32", "--no-eval-at-start",
            "--output-dir", str(out), "--name", name]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, peaked_dir, toy_prompts) -> Path:
    """A finished 2-step GRPO run with checkpoints step-1 and step-2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs")
    proc = terminal.posttrain(*train_args(peaked_dir, toy_prompts, out, "base"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "base"


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


def unlocked(snap: dict) -> dict:
    """A snapshot without run.lock (the owner's PID: the only file a refused resume may touch)."""
    return {k: v for k, v in snap.items() if k != tracking.LOCK_FILE}


# ------------------------------------------------------------------------------- through the CLI


def test_resume_refuses_settings_that_cannot_change_and_writes_nothing(run_copy, tmp_path, toy_prompts):
    before = terminal.snapshot(run_copy)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Another prompt."}) + "\n")
    proc = terminal.posttrain("train", "grpo", "--resume", run_copy, "--no-lora", "--group-size", "8",
                              "--data", other, "--max-steps", "3")
    err = terminal.assert_user_error(proc, "--lora: the run has True, given False", "--group-size: the run has 4, given 8",
                                     f"--data: the run has {toy_prompts!r}", "cannot change")
    assert "--max-steps: the run" not in err  # a setting a resume may change is not listed
    cfg = tmp_path / "new.yaml"
    cfg.write_text("seed: 7\nmax_steps: 3\n")
    proc = terminal.posttrain("train", "grpo", "--resume", run_copy, "--config", cfg)
    terminal.assert_user_error(proc, "--seed: the run has 0, given 7")
    assert terminal.snapshot(run_copy) == before  # config.yaml is still the run's: it can be resumed


def test_resume_of_what_cannot_be_resumed(run_copy, tmp_path):
    terminal.assert_user_error(terminal.posttrain("train", "grpo", "--resume", tmp_path / "missing"),
                               "missing: no such directory")
    (tmp_path / "notarun").mkdir()
    terminal.assert_user_error(terminal.posttrain("train", "grpo", "--resume", tmp_path / "notarun"),
                               "notarun: not a run directory")
    for step in ckpt.checkpoint_dirs(run_copy):  # a run killed before its first checkpoint was complete
        (step / "state.json").unlink()
    before = terminal.snapshot(run_copy)
    terminal.assert_user_error(terminal.posttrain("train", "grpo", "--resume", run_copy), "no complete checkpoint")
    assert terminal.snapshot(run_copy) == before


def test_a_run_directory_has_one_owner(run_copy):
    lock = RunLock(run_copy)  # this test process owns the run, as a live training process would
    try:
        before = unlocked(terminal.snapshot(run_copy))
        proc = terminal.posttrain("train", "grpo", "--resume", run_copy, "--max-steps", "3")
        terminal.assert_user_error(proc, f"in use by another process (PID {os.getpid()})")
        assert unlocked(terminal.snapshot(run_copy)) == before
    finally:
        lock.release()


def test_resume_falls_back_repairs_and_applies_what_may_change(run_copy):
    newest = run_copy / "checkpoints" / "step-2" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged after it was written
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # torn by a kill
    stale = run_copy / "checkpoints" / ".tmp-step-3-x1"
    stale.mkdir()
    (stale / "rng.pt").write_bytes(b"partial")
    proc = terminal.posttrain("train", "grpo", "--resume", run_copy, "--max-steps", "3", "--lr", "1e-3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for said in (f"skipped checkpoint {run_copy}/checkpoints/step-2: adapter_model.safetensors has 100 bytes",
                 f"renamed the damaged checkpoint {run_copy}/checkpoints/step-2 to .damaged-step-2",
                 f"{run_copy}/metrics.jsonl: dropped its incomplete last line", f"removed {stale}",
                 f"resumed {run_copy} at step 1"):
        assert said in out, f"{said!r} not said:\n{out[-3000:]}"
    assert not stale.exists()
    kept = run_copy / "checkpoints" / ".damaged-step-2" / "adapter_model.safetensors"
    assert kept.stat().st_size == 100  # kept for inspection: the new step-2 did not overwrite it
    assert [p.name for p in ckpt.checkpoint_dirs(run_copy)][-2:] == ["step-2", "step-3"]
    history = read_jsonl(run_copy / "metrics.jsonl")
    assert [m["step"] for m in history] == [1, 2, 3]
    assert [m["lr"] for m in history[1:]] == [1e-3, 1e-3]  # the new lr is the one applied
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert (saved["lr"], saved["max_steps"], saved["lora"]) == (1e-3, 3, True)
    (record,) = read_jsonl(run_copy / "resumes.jsonl")
    assert record["step"] == 1 and record["checkpoint"] == "step-1"
    assert record["changes"] == {"max_steps": [2, 3], "lr": [None, 1e-3]}


def test_a_fresh_run_failing_before_its_first_step_leaves_no_directory(run_copy, tmp_path, peaked_dir, toy_prompts):
    out = tmp_path / "out"
    fault = {"POSTTRAIN_FAULT": "collect:1:raise"}
    proc = terminal.posttrain(*train_args(peaked_dir, toy_prompts, out, "fails"), env=fault)
    assert proc.returncode == 1 and "InjectedFault" in proc.stderr  # not a user error: its traceback shows
    assert not (out / "fails").exists()
    proc = terminal.posttrain("train", "grpo", "--resume", run_copy, "--max-steps", "3", env=fault)
    assert proc.returncode == 1 and "InjectedFault" in proc.stderr
    assert [p.name for p in ckpt.checkpoint_dirs(run_copy)] == ["step-1", "step-2"]  # a resumed run keeps all


def test_doctor_and_report_skip_a_torn_last_line_and_name_a_bad_one(run_copy):
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(run_copy / name, "a") as f:
            f.write('{"step": 3, "compl')
    proc = terminal.posttrain("doctor", run_copy)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert proc.stderr.count(f"{run_copy / name}: skipped its incomplete last line") == 1
    proc = terminal.posttrain("report", run_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"{run_copy / 'metrics.jsonl'}: skipped its incomplete last line") == 1
    lines = (run_copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_copy / "metrics.jsonl").write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    terminal.assert_user_error(terminal.posttrain("doctor", run_copy), f"{run_copy / 'metrics.jsonl'}:2: not a JSON object")


def test_a_run_name_of_dots_is_refused(tmp_path, peaked_dir, toy_prompts):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not a run")
    before = terminal.snapshot(tmp_path)
    proc = terminal.posttrain(*train_args(peaked_dir, toy_prompts, out, ".."))
    terminal.assert_user_error(proc, "--name '..'", "letter, digit")
    assert terminal.snapshot(tmp_path) == before  # out/.. is tmp_path: nothing made or removed there


def test_dpo_run_sized_by_epochs_changes_its_length_on_resume_by_epochs_only(tmp_path, tiny_dir):
    data = tmp_path / "prefs.jsonl"
    words = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light"]
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": f"Not {w}."}) + "\n"
                            for w in words))
    from posttrain.algorithms.dpo import DPOConfig, train_dpo

    run_dir = train_dpo(DPOConfig(model=tiny_dir, data=str(data), lora=False, batch_size=4, epochs=1, eval_fraction=0,
                                  checkpoint_every=1, eval_at_start=False, device="cpu", output_dir=str(tmp_path),
                                  name="dpo")).run_dir  # in-process: the resumes below are the CLI's
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]  # 8 pairs / 4 a step
    before = terminal.snapshot(run_dir)
    proc = terminal.posttrain("train", "dpo", "--resume", run_dir, "--max-steps", "5")
    terminal.assert_user_error(proc, "--max-steps 5 would be ignored", "set by --epochs 1 (now 2 steps)",
                               "with --epochs alone")
    assert terminal.snapshot(run_dir) == before
    proc = terminal.posttrain("train", "dpo", "--resume", run_dir, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changed on resume: epochs 1.0 -> 2.0" in proc.stderr and "max_steps 2 -> 4" in proc.stderr
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    (record,) = read_jsonl(run_dir / "resumes.jsonl")
    assert record["changes"] == {"epochs": [1.0, 2.0], "max_steps": [2, 4]}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["max_steps"] == 4


# ------------------------------------------------------------------------------- function level


def test_resume_table_refuses_fixed_settings_and_returns_the_mutable_ones():
    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.algorithms.run import MUTABLE, resume_changes

    saved = GRPOConfig(data="d.jsonl", reward="math")
    given = GRPOConfig(data="d.jsonl", reward="math", lr=1e-4, max_steps=9, resume="runs/x")
    assert resume_changes(saved, given, "runs/x") == {"lr": (None, 1e-4), "max_steps": (saved.max_steps, 9)}
    assert {"lr", "max_steps", "checkpoint_every"} <= set(MUTABLE) and not {"lora", "seed", "data"} & set(MUTABLE)
    with pytest.raises(ResumeError) as e:
        resume_changes(saved, GRPOConfig(data="e.jsonl", reward="math", group_size=4, lr=1e-4), "runs/x")
    assert "--data: the run has 'd.jsonl', given 'e.jsonl'" in str(e.value) and "--group-size" in str(e.value)
    assert "--lr: the run" not in str(e.value)


def test_checkpoint_damage_is_found_and_load_latest_falls_back(tmp_path, tiny):
    model, _ = tiny
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt)
    step1, step2, step3 = ckpt.checkpoint_dirs(tmp_path)
    assert ckpt.damage(step3) is None
    (step3 / "optimizer.pt").write_bytes((step3 / "optimizer.pt").read_bytes()[:10])
    (step2 / "rng.pt").unlink()
    assert "optimizer.pt has 10 bytes" in ckpt.damage(step3) and ckpt.damage(step2) == "rng.pt is missing"
    said = []
    path, state = ckpt.load_latest(tmp_path, model, opt, say=said.append)
    assert path == step1 and state["step"] == 1
    assert [s.split(":")[0] for s in said[:2]] == [f"skipped checkpoint {step3}", f"skipped checkpoint {step2}"]
    assert said[2:] == [f"renamed the damaged checkpoint {step} to .damaged-{step.name} (kept for inspection; it is "
                        f"not loaded again)" for step in (step3, step2)]
    assert ckpt.checkpoint_dirs(tmp_path) == [step1] and (tmp_path / "checkpoints" / ".damaged-step-3").is_dir()
    ckpt.save_checkpoint(tmp_path, 3, model, opt)  # the resumed run saves step 3 again: the damaged one stays
    assert (tmp_path / "checkpoints" / ".damaged-step-3" / "optimizer.pt").stat().st_size == 10
    shutil.rmtree(tmp_path / "checkpoints" / "step-3")
    (step1 / "state.json").write_text('{"step": 1, "fil')  # torn
    assert "state.json is unreadable" in ckpt.damage(step1)
    before = terminal.snapshot(tmp_path)
    with pytest.raises(ResumeError, match="no complete checkpoint.*every checkpoint it has is damaged.*step-1"):
        ckpt.load_latest(tmp_path, model, opt, say=said.append)
    assert terminal.snapshot(tmp_path) == before  # nothing loaded: nothing renamed
    (tmp_path / "checkpoints" / ".tmp-step-4-abc").mkdir()
    assert ckpt.remove_stale_temporaries(tmp_path) == [".tmp-step-4-abc"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_torn_last_line_is_skipped_and_a_bad_middle_line_is_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    records, torn = read_lines(path)
    assert [r for _, r in records] == [{"step": 1}, {"step": 2}] and torn
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert capsys.readouterr().err.count("skipped its incomplete last line") == 1  # said once
    path.write_text('{"step": 1}\n{"step": 2}')  # complete, only its newline missing: kept
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl:2: not a JSON object"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with tracking.Tracker(tmp_path, resume_step=1) as t:  # a resume truncates to the step, torn line or not
        assert [r["step"] for r in t.history] == [1]


def test_run_lock_names_its_owner_and_default_names_never_collide(tmp_path, monkeypatch):
    lock = RunLock(tmp_path)
    with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()  # free again once released

    class Frozen:
        @staticmethod
        def now():
            import datetime

            return datetime.datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(tracking, "datetime", Frozen)
    names = [tracking.make_run_dir(tmp_path / "runs", method="grpo").name for _ in range(3)]
    assert names == ["grpo-20260101-120000", "grpo-20260101-120000-2", "grpo-20260101-120000-3"]


DAMAGE_FOUND_BY_READING = (  # (file, how it is damaged, what reading it raises): checkpoint.DAMAGE
    ("model.safetensors", lambda b: bytes(len(b)), "SafetensorError"),  # overwritten, same size
    ("model.safetensors", lambda b: b[:len(b) // 2], "SafetensorError"),
    ("optimizer.pt", lambda b: b"", "EOFError"),
    ("optimizer.pt", lambda b: b[:len(b) // 2], "RuntimeError"),  # PytorchStreamReader: no central directory
    ("rng.pt", lambda b: b[:len(b) // 2], "OSError"),  # a file under 64 KB cut: [Errno 22] from torch's zip reader
    ("optimizer.pt", lambda b: bytes(len(b)), "KeyError"),  # overwritten: "filename 'storages' not found"
    ("scheduler.pt", lambda b: b"garbage!" * 50, "UnpicklingError"),
    ("scheduler.pt", None, "FileNotFoundError"),  # deleted
)


def test_damage_found_only_by_reading_falls_back_and_is_set_aside(tmp_path, tiny):
    """Checkpoints whose state.json has no file sizes (written before it kept them) or whose damage
    keeps a file's size: the error reading it says damage, the older checkpoint loads."""
    model, _ = tiny
    for i, (name, spoil, raised) in enumerate(DAMAGE_FOUND_BY_READING):
        run = tmp_path / f"run{i}"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.step()  # an optimizer state to save
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        for step in (1, 2):
            ckpt.save_checkpoint(run, step, model, opt, sched)
        newest = run / "checkpoints" / "step-2"
        state = json.loads((newest / "state.json").read_text())
        del state["files"]
        (newest / "state.json").write_text(json.dumps(state))
        target = newest / name
        if spoil is None:
            target.unlink()
        else:
            target.write_bytes(spoil(target.read_bytes()))
        assert ckpt.damage(newest) is None, name  # not visible before reading
        said: list[str] = []
        path, _ = ckpt.load_latest(run, model, opt, sched, say=said.append)
        assert path.name == "step-1", name
        assert f"skipped checkpoint {newest}: reading it failed: {raised}" in said[0], (name, said)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".damaged-step-2", "step-1"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), torch.OutOfMemoryError("CUDA out of memory")],
                         ids=["bug", "oom"])
def test_an_error_that_is_not_damage_goes_on_and_nothing_is_renamed(tmp_path, tiny, monkeypatch, error):
    model, _ = tiny
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model)
    before = terminal.snapshot(tmp_path)

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt, "load_weights", fails)
    said: list[str] = []
    with pytest.raises(type(error), match=str(error)):
        ckpt.load_latest(tmp_path, model, say=said.append)
    assert said == [] and terminal.snapshot(tmp_path) == before  # no fallback, nothing renamed or deleted


def test_a_run_failing_while_it_opens_gives_back_its_directory_and_lock(tmp_path, monkeypatch):
    import torch.utils.tensorboard

    from posttrain.algorithms import run as runmod
    from posttrain.algorithms.grpo import GRPOConfig

    def no_writer(*args, **kwargs):
        raise OSError("No space left on device")

    released = []
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", no_writer)
    monkeypatch.setattr(RunLock, "release", lambda self: released.append(self.path))
    config = GRPOConfig(data="d.jsonl", reward="math", tensorboard=True, output_dir=str(tmp_path), name="tb")
    with pytest.raises(OSError, match="No space left"):
        runmod.Run(config, "grpo", total_steps=2)
    assert not (tmp_path / "tb").exists() and runmod._OPEN == []
    assert released == [tmp_path / "tb" / tracking.LOCK_FILE]


def test_run_names_of_dots_only_are_refused():
    for name in (".", "..", "..."):
        with pytest.raises(tracking.RunDirError, match=f"--name '{re.escape(name)}'"):
            tracking.check_run_name(name)
    for name in ("a.b", ".hidden", "v1..2", "run_1-x"):
        tracking.check_run_name(name)
    with pytest.raises(tracking.RunDirError, match="--name 'a/b': a run name may use letters"):
        tracking.check_run_name("a/b")
