"""The error contract on the verbs other than `train` (issue 16), as a person at the terminal meets it.

Each class of bad input is run through the CLI as a subprocess (exit status, the message naming the
flag or file, no traceback, nothing written or lost); the many variants of one class are checked
in-process through ``cli.main``, which applies the same contract and costs no interpreter start.
"""

import json
import shutil
import socket
import sys
import warnings
from pathlib import Path

import pytest

from posttrain import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

TASK = ["--task", "arithmetic"]


def parse_error(capsys, *argv: str) -> str:
    """The argparse refusal of ``argv``: exit 2 at parse time, the message on stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def user_error(capsys, *argv: str) -> str:
    """The contract in-process: ``cli.main`` returns 2 and prints one ``error:`` line."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def free_port() -> int:
    """A localhost port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_judge(tmp_path: Path) -> Path:
    """A judge config pointing at a closed port: every request fails at once (no retries, no cache)."""
    path = tmp_path / "judge.yaml"
    path.write_text(f"backend: openai\nmodel: judge\nbase_url: http://127.0.0.1:{free_port()}/v1\n"
                    "max_retries: 0\ntimeout: 5\ncache: false\n")
    return path


# ------------------------------------------------------------------ numeric flags


def test_numeric_flags_are_refused_at_parse_time_naming_the_flag(tmp_path):
    # eval --n 0 printed nan and exited 0; --n -1 evaluated all rows but one
    for argv, fragments in ((["eval", *TASK, "--n", "0"], ("--n", "must be >= 1, got 0")),
                            (["pairs", *TASK, "--out", tmp_path / "p.jsonl", "--temperature", "nan"],
                             ("--temperature", "finite"))):
        proc = terminal.posttrain(*argv, cwd=tmp_path)
        terminal.assert_user_error(proc, *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv, flag, problem", [
    (["eval", *TASK, "--n", "-1"], "--n", ">= 1"),
    (["eval", *TASK, "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["eval", *TASK, "--batch-size", "x"], "--batch-size", "expected an integer"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature", "[0, inf]"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["pairs", *TASK, "--out", "o", "--n", "1"], "--n", ">= 2"),
    (["pairs", *TASK, "--out", "o", "--top-p", "0"], "--top-p", "(0, 1]"),
    (["pairs", *TASK, "--out", "o", "--limit", "-3"], "--limit", ">= 0"),
    (["label", "--judge", "j", "--data", "d", "--out", "o", "--min-margin", "1.5"], "--min-margin", "[0, 1)"),
    (["label", "--judge", "j", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["constitution", "--data", "d", "--out", "o", "--temperature", "inf"], "--temperature", "finite"),
    (["score", "--reward", "math", "--data", "d", "--workers", "0"], "--workers", ">= 1"),
    (["memory", "--lora", "abc"], "--lora", "expected an integer"),
    (["memory", "--gpu-memory", "lots"], "--gpu-memory", "not a memory size"),
    (["recommend", "--gpu-memory", "0GB"], "--gpu-memory", "more than 0"),
    (["tasks", "show", "arithmetic", "--n", "0"], "--n", ">= 1"),
    (["demo", "--minutes", "0"], "--minutes", "(0, inf]"),
])
def test_every_numeric_flag_has_a_domain(capsys, argv, flag, problem):
    err = parse_error(capsys, *argv)
    assert f"argument {flag}" in err and problem in err, err


# ------------------------------------------------------------------ flags that do not apply


def test_a_flag_that_does_not_apply_is_refused_with_the_reason(tmp_path, toy_prompts):
    proc = terminal.posttrain("pairs", "--data", toy_prompts, "--reward", "math", "--task-size", "5",
                              "--out", tmp_path / "p.jsonl", cwd=tmp_path)
    terminal.assert_user_error(proc, "--task-size does not apply", "--limit")
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--suite", "sycophancy", "--n", "5"], "--n does not apply here: --suite"),
    (["eval", "--suite", "sycophancy", "--reward", "math"], "--reward does not apply"),
    (["eval", "--data", "d.jsonl", "--reward", "math", "--split", "train"], "--split does not apply"),
    (["eval", *TASK, "--data", "d.jsonl"], "give exactly one of --task, --data, --suite"),
    (["eval"], "give exactly one of --task, --data, --suite"),
    (["eval", "--data", "d.jsonl"], "--data needs --reward"),
    (["eval", "--task", "nope"], "--task 'nope': unknown task"),
    (["eval", *TASK, "--split", "dev"], "--split 'dev'"),
    (["eval", *TASK, "--reward", "nonsense"], "--reward 'nonsense': unknown reward"),
    (["generate", "--prompt", "hi", "--seed", "3"], "--seed does not apply here: greedy"),
    (["label", "--judge", "j", "--data", "d", "--out", "o", "--strategy", "compare", "--min-margin", "0.2"],
     "--min-margin does not apply"),
    (["memory", "--doctrine-table", "--model", "70B"], "--model does not apply here: --doctrine-table"),
    (["memory", "--seq-len", "512", "--prompt-len", "100", "--completion-len", "100"], "--seq-len does not apply"),
    (["recommend", *TASK, "--columns", "prompt,chosen"], "give one of --data, --task, --columns"),
    (["tasks", "show", "arithmetic", "--opt", "digits"], "--opt expects KEY=VALUE"),
    (["tasks", "show", "nope"], "TASK 'nope': unknown task"),
])
def test_inapplicable_or_conflicting_flags(capsys, argv, fragment):
    assert fragment in user_error(capsys, *argv)


def test_pairs_limit_applies_to_a_task_too():
    # `pairs --task arithmetic --limit 8` sampled all 200 task prompts
    from posttrain.commands import pairs

    args = cli.build_parser("pairs").parse_args(["pairs", *TASK, "--limit", "8", "--out", "o"])
    rows, reward = pairs.load_prompts(args)
    assert len(rows) == 8 and reward == "math"


# ------------------------------------------------------------------ export: nothing lost


@pytest.fixture
def run_dir(tmp_path, tiny_dir):
    """A run directory as trainers leave it: config.yaml, metrics.jsonl, final/ (a full model)."""
    run = tmp_path / "runs" / "r1"
    shutil.copytree(tiny_dir, run / "final")
    (run / "config.yaml").write_text("method: grpo\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def test_export_refuses_a_non_empty_target_and_leaves_its_bytes(tmp_path, run_dir):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    (target / "config.json").write_text("{}")
    before = terminal.snapshot(target)
    proc = terminal.posttrain("export", run_dir, "--merge", target, cwd=tmp_path)
    terminal.assert_user_error(proc, f"--merge {target}", "not empty", "--overwrite")
    assert terminal.snapshot(target) == before


def test_export_refuses_the_runs_own_directories(tmp_path, run_dir, capsys):
    before = terminal.snapshot(run_dir)
    for target in (run_dir / "final", run_dir, run_dir / "checkpoints" / "x", run_dir.parent):
        err = user_error(capsys, "export", str(run_dir), "--merge", str(target), "--overwrite")
        assert f"--merge {target}" in err and ("inside the run directory" in err or "overlaps" in err), err
    assert terminal.snapshot(run_dir) == before


def test_export_overwrite_swaps_in_a_complete_model(tmp_path, run_dir, capsys):
    from posttrain.models import load_model

    target = tmp_path / "merged"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    assert cli.main(["export", str(run_dir), "--merge", str(target), "--overwrite"]) == 0
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    load_model(str(target))


def test_a_failed_export_leaves_the_target_as_it_was(tmp_path):
    from posttrain.commands.export import _write_swapped

    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("keep me")
    before = terminal.snapshot(target)

    def write(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write_swapped(target, write)
    assert terminal.snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ a judge that fails


def _response_rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": ["a", "b"]}) + "\n" for i in range(n)))
    return path


def test_label_with_a_dead_judge_exits_non_zero_and_keeps_earlier_pairs(tmp_path):
    judge, data, out = dead_judge(tmp_path), _response_rows(tmp_path / "rows.jsonl", 3), tmp_path / "pairs.jsonl"
    # an earlier run labeled row 0; this run's judge is down for rows 1 and 2
    out.write_text(json.dumps({"prompt": "q0", "chosen": "a", "rejected": "b", "label": {"row": 0}}) + "\n")
    progress = tmp_path / "pairs.jsonl.progress.jsonl"
    progress.write_text(json.dumps({"row": 0, "status": "pair", "reason": ""}) + "\n")
    before = terminal.snapshot(tmp_path)
    proc = terminal.posttrain("label", "--judge", judge, "--data", data, "--out", out, cwd=tmp_path)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in ("4 of 4 requests failed", "Connection error", f"1 pairs are in {out}",
                     "2 left for the next run"):
        assert fragment in proc.stderr, proc.stderr[-2000:]
    # the pair already made is intact, and the rows the judge failed on are not marked done
    assert terminal.snapshot(tmp_path) == before


def test_pairs_with_a_dead_judge_reward_exits_non_zero(tmp_path, tiny_dir):
    judge = dead_judge(tmp_path)
    proc = terminal.posttrain("pairs", *TASK, "--limit", "1", "--n", "2", "--max-new-tokens", "2",
                              "--model", tiny_dir, "--reward", f"judge({judge})", "--out", tmp_path / "p.jsonl",
                              cwd=tmp_path)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "failed 2 of its 2 requests" in proc.stderr and "the pairs made so far are in" in proc.stderr


# ------------------------------------------------------------------ model specs


def test_bad_model_specs_name_the_flag_and_the_path(tmp_path, toy_prompts):
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "x.txt").write_text("hi")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    cases = [
        (["eval", *TASK, "--model", "does/not/exist"], ("--model does/not/exist", "no such file or directory")),
        (["generate", "--prompt", "hi", "--model", "notmodel"], ("--model notmodel", "not a model directory")),
        (["constitution", "--model", "bad.gguf", "--data", toy_prompts, "--out", "c.jsonl"],
         ("--model bad.gguf", "not a GGUF file")),
    ]
    for argv, fragments in cases:
        terminal.assert_user_error(terminal.posttrain(*argv, cwd=tmp_path), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "notmodel"]  # no output written


def test_a_damaged_model_directory_is_a_model_error(tmp_path, tiny_dir):
    from posttrain.models import ModelError, load_model

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="damaged"):
        load_model(str(damaged))


# ------------------------------------------------------------------ warnings a user cannot act on


def test_lora_on_the_embedded_model_and_saving_the_adapter_warn_nothing(tmp_path):
    # `make demo` printed transformers' FutureWarning (is_gradient_checkpointing, read by peft) and peft's
    # "Could not find a config file in smollm2-135m-instruct" when saving the adapter
    from posttrain.models import add_lora, load_model, save_pretrained

    model, _ = load_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = add_lora(model, rank=4)
        save_pretrained(lora, tmp_path / "adapter")
        load_model(str(tmp_path / "adapter"))
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not [m for m in messages if "is_gradient_checkpointing" in m or "Could not find a config" in m], messages
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "smollm2-135m-instruct"
