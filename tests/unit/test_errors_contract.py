"""The error contract itself (``posttrain.errors``, ``cli.main``), as a person at the terminal meets it:
a user error is one message and exit 2 with no traceback unless asked for (``--debug``,
``POSTTRAIN_DEBUG=1``); an unexpected exception keeps its traceback; a judge endpoint that is down
stops a training run at its first step with the reason, keeping a checkpoint to resume from.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

BAD_FLAG = ("train", "grpo", "--task", "arithmetic", "--max-new-tokens", "0")


def test_a_user_error_shows_its_traceback_only_when_asked(tmp_path):
    plain = terminal.posttrain(*BAD_FLAG, cwd=tmp_path)
    terminal.assert_user_error(plain, "--max-new-tokens", "must be > 0")
    assert plain.stderr.strip().count("\n") == 0  # one line

    for debug in (terminal.posttrain("--debug", *BAD_FLAG, cwd=tmp_path),
                  terminal.posttrain(*BAD_FLAG, cwd=tmp_path, env={"POSTTRAIN_DEBUG": "1"})):
        assert debug.returncode == 1, debug.stderr[-2000:]
        assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr and "must be > 0" in debug.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unexpected_exception_keeps_its_traceback_and_a_failed_start_leaves_nothing(tmp_path, tiny_dir,
                                                                                     toy_prompts):
    args = ("train", "grpo", "--model", tiny_dir, "--data", toy_prompts, "--reward", "format(pattern=[a-m].*)",
            "--max-steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "4",
            "--device", "cpu", "--no-eval-at-start", "--output-dir", str(tmp_path / "runs"), "--name", "r")
    proc = terminal.posttrain(*args, cwd=tmp_path, env={"POSTTRAIN_FAULT": "collect:1:raise"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "InjectedFault" in proc.stderr  # not disguised as a user error
    assert not (tmp_path / "runs" / "r").exists()  # nothing logged, no checkpoint: the directory went


def test_a_dead_judge_stops_training_at_the_first_step_and_keeps_a_checkpoint(tmp_path, tiny_dir, toy_prompts):
    from posttrain.rlaif.katan import free_port

    judge = tmp_path / "judge.yaml"
    judge.write_text(f"backend: openai\nmodel: judge\nbase_url: http://127.0.0.1:{free_port()}/v1\n"
                     "max_retries: 1\nbackoff_base: 0.01\nbackoff_max: 0.02\ntimeout: 2\ncache: false\n")
    run = tmp_path / "runs" / "j"
    proc = terminal.posttrain("train", "grpo", "--model", tiny_dir, "--data", toy_prompts, "--reward",
                              f"judge({judge})", "--max-steps", "3", "--group-size", "2", "--prompts-per-step", "2",
                              "--max-new-tokens", "4", "--device", "cpu", "--no-eval-at-start",
                              "--output-dir", str(tmp_path / "runs"), "--name", "j", cwd=tmp_path)
    terminal.assert_user_error(proc, "judge 'openai:judge' has not answered once", "4 of 4 requests failed",
                               "Connection", "base_url")
    assert "stopped at step 1" in proc.stderr and f"--resume {run}" in proc.stderr
    assert (run / "checkpoints" / "step-0" / "state.json").is_file()  # the run can resume once the judge is up
    assert not (run / "final").exists()


def test_a_model_spec_that_cannot_load_names_its_flag_before_anything_loads(tmp_path, toy_prompts):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    runs = tmp_path / "runs"
    cases = [
        (("train", "grpo", "--model", str(tmp_path / "nope"), "--data", toy_prompts, "--reward", "math"),
         ["--model", "nope"]),
        (("train", "dpo", "--ref-model", str(empty), "--data", str(pairs)), ["--ref-model", "not a model directory"]),
    ]
    for args, fragments in cases:
        proc = terminal.posttrain(*args, "--output-dir", str(runs), cwd=tmp_path)
        terminal.assert_user_error(proc, *fragments)
    assert not runs.exists()


def test_flags_that_cannot_work_are_refused_before_anything_is_made(tmp_path, tiny_dir):
    """Each case: exit 2, one message naming the flag, no traceback, and the output directory untouched."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1}\n'
                     '{"prompt": "a", "chosen": "b", "rejected": "d", "margin": "big"}\n')
    (tmp_path / "afile").write_text("x")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "taken").write_text("a file where the run would go")
    before = terminal.snapshot(tmp_path)
    grpo = ("train", "grpo", "--model", tiny_dir, "--task", "arithmetic", "--output-dir", str(runs))
    cases = [
        (grpo + ("--device", "tpu"), ["--device", "not a device torch knows"]),
        (grpo + ("--no-lora", "--lora-rank", "8"), ["--lora-rank", "--no-lora"]),
        (grpo + ("--lora-target", "nosuchmodule"), ["--lora-target nosuchmodule", "not found"]),
        (grpo + ("--max-sampling-rounds", "5"), ["--max-sampling-rounds applies only with --dynamic-sampling"]),
        (grpo + ("--eval-fraction", "0.1"), ["--eval-fraction applies only with --data"]),
        (grpo[:-1] + (str(tmp_path / "afile" / "sub"),), ["--output-dir", "is a file, not a directory"]),
        (grpo + ("--name", "taken"), ["taken exists already"]),
        (("train", "ppo", "--model", tiny_dir, "--task", "arithmetic", "--no-lora", "--value-model", "adapter",
          "--output-dir", str(runs)), ["--value-model", "needs --lora"]),
        (("train", "rm", "--model", tiny_dir, "--data", str(pairs), "--output-dir", str(runs)),
         ["pairs.jsonl:2: field 'margin'", "finite number"]),
        (("train", "dpo", "--data", str(pairs), "--reward", "math"), ["unrecognized arguments: --reward math"]),
        (("generate", "--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", "99999999"),
         ["--max-new-tokens 99999999", "over the model's context"]),
    ]
    for args, fragments in cases:
        err = terminal.assert_user_error(terminal.posttrain(*args, cwd=tmp_path), *fragments)
        assert "usage:" not in err and err.count("\n") == 1, err  # one line, not argparse's usage block
    assert terminal.snapshot(tmp_path) == before


def test_resume_refuses_what_would_change_or_redo_a_finished_run(tmp_path, tiny_dir, toy_prompts):
    run = tmp_path / "runs" / "r"
    args = ("train", "grpo", "--model", tiny_dir, "--data", toy_prompts, "--reward", "format(pattern=[a-m].*)",
            "--max-steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "4",
            "--device", "cpu", "--no-eval-at-start", "--output-dir", str(run.parent), "--name", "r")
    assert terminal.posttrain(*args, cwd=tmp_path).returncode == 0
    copy = tmp_path / "runs" / "no-config"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    before = terminal.snapshot(tmp_path / "runs")
    cases = [
        (("train", "grpo", "--resume", str(run)), ["done 2 steps and max_steps is 2", "nothing to do", "--max-steps N > 2"]),
        (("train", "grpo", "--resume", str(run), "--max-steps", "1"), ["max_steps is 1", "nothing to do"]),
        (("train", "grpo", "--resume", str(run), "--name", "other", "--max-steps", "3"), ["--name does not apply"]),
        (("train", "dpo", "--resume", str(run)), ["trained with 'grpo', not 'dpo'", f"train grpo --resume {run}"]),
        (("train", "grpo", "--resume", str(copy), "--max-steps", "3"), ["config.yaml is missing"]),
    ]
    for case, fragments in cases:
        terminal.assert_user_error(terminal.posttrain(*case, cwd=tmp_path), *fragments)
    assert terminal.snapshot(tmp_path / "runs") == before
