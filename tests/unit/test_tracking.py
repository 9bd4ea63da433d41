"""Run directories, metrics.jsonl, samples.jsonl, TensorBoard, resume truncation."""

import json

import pytest
import torch
import yaml

from posttrain.runtime.tracking import RunDirError, Tracker, make_run_dir, read_jsonl


def test_make_run_dir_refuses_to_overwrite(tmp_path):
    run = make_run_dir(tmp_path, "exp1")
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="exists already"):
        make_run_dir(tmp_path, "exp1")
    assert make_run_dir(tmp_path, "exp1", resume=True) == run
    with pytest.raises(RunDirError, match="no such run"):
        make_run_dir(tmp_path, "exp2", resume=True)
    with pytest.raises(RunDirError, match="letters, digits"):
        make_run_dir(tmp_path, "../escape")
    assert make_run_dir(tmp_path, method="grpo").name.startswith("grpo-")


def test_metrics_flushed_each_step_and_tensors_converted(tmp_path):
    t = Tracker(tmp_path, config={"lr": 1e-5, "model": "m"}, tensorboard=True, total_steps=3)
    t.log(1, {"loss": torch.tensor(0.5), "reward/mean": 0.25, "bad": float("nan")})
    # flushed: readable before close
    (rec,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert rec == {"step": 1, "loss": 0.5, "reward/mean": 0.25, "bad": "nan"}
    t.log_samples(1, [{"prompt": "p", "completion": "c", "reward": torch.tensor(1.0)}])
    t.close()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"lr": 1e-5, "model": "m"}
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"step": 1, "prompt": "p", "completion": "c", "reward": 1.0}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_drops_records_after_checkpoint(tmp_path):
    with Tracker(tmp_path) as t:
        for step in range(1, 6):
            t.log(step, {"loss": step})
            t.log_samples(step, [{"completion": str(step)}])
    with Tracker(tmp_path, resume_step=3) as t:
        assert [r["step"] for r in t.history] == [1, 2, 3]
        t.log(4, {"loss": 40})
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 40]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3]


def test_disabled_tracker_writes_nothing(tmp_path):
    t = Tracker(tmp_path / "r", config={"a": 1}, enabled=False)
    t.log(1, {"loss": 1.0})
    t.close()
    assert not (tmp_path / "r").exists()


def test_progress_line_shows_reward_and_kl(tmp_path, capsys):
    with Tracker(tmp_path, total_steps=2) as t:
        t.log(1, {"reward/mean": 0.5, "kl": 0.01, "other": 3})
    err = capsys.readouterr().err
    assert "step 1/2" in err and "reward/mean=0.5" in err and "kl=0.01" in err
