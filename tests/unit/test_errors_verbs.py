"""The error contract on the verbs other than `train` (issue 16), as a person at the terminal meets it.

Each class of bad input is run through the CLI as a subprocess (exit status, the message naming the
flag or file, no traceback, nothing written or lost); the many variants of one class are checked
in-process through ``cli.main``, which applies the same contract and costs no interpreter start.
"""

import argparse
import collections
import json
import os
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
    (["pairs", *TASK, "--out", "o", "--temperature", "0"], "--temperature", "(0, inf]"),  # n equal greedy samples
    (["constitution", "--data", "d", "--out", "o", "--max-skip-rate", "2"], "--max-skip-rate", "[0, 1]"),
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
    (["constitution", "--data", "d", "--out", "o", "--temperature", "0", "--seed", "3"], "--seed does not apply"),
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


def test_export_refuses_any_run_directory_and_leaves_its_bytes(tmp_path, run_dir, capsys):
    # `export runs/a --merge runs/b --overwrite` replaced all of run b, checkpoints included
    other = tmp_path / "runs" / "b"
    (other / "checkpoints" / "step-1").mkdir(parents=True)
    (other / "checkpoints" / "step-1" / "state.json").write_text('{"step": 1}')
    (other / "config.yaml").write_text("method: dpo\n")
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    archive = tmp_path / "archive"
    shutil.copytree(other, archive / "old-run")
    before = terminal.snapshot(tmp_path)
    proc = terminal.posttrain("export", run_dir, "--merge", other, "--overwrite", cwd=tmp_path)
    terminal.assert_user_error(proc, f"--merge {other}", f"inside the run directory {other.resolve()}")
    for target, fragment in ((other / "checkpoints" / "step-1" / "x", f"inside the run directory {other.resolve()}"),
                             (archive, f"holds the run directory {(archive / 'old-run').resolve()}")):
        assert fragment in user_error(capsys, "export", str(run_dir), "--merge", str(target), "--overwrite")
    assert terminal.snapshot(tmp_path) == before


def test_an_export_that_cannot_put_the_original_back_keeps_it(tmp_path, monkeypatch):
    from posttrain.commands import export

    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("keep me")
    real = os.rename

    def rename(src, dst):  # moving anything into place as `out` fails: the new model, then the original
        if Path(dst) == target:
            raise OSError("device busy")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="could not be put back") as failed:
        export._write_swapped(target, lambda tmp: (tmp / "model.bin").write_bytes(b"x"))
    kept = Path(str(failed.value).rsplit("kept in ", 1)[1])
    assert (kept / "a.txt").read_text() == "keep me"


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


# ------------------------------------------------------------------ constitution: a run that made nothing


def test_constitution_exits_3_when_no_prompt_gives_a_pair(tmp_path, tiny_dir, toy_prompts):
    # it exited 0 with 0 pairs written: the tiny random model's greedy answer is blank lines (token '\n'),
    # so every original answer is empty
    out = tmp_path / "c.jsonl"
    proc = terminal.posttrain("constitution", "--model", tiny_dir, "--data", toy_prompts, "--out", out,
                              "--max-new-tokens", "1", "--temperature", "0", "--principles-per-prompt", "1",
                              cwd=tmp_path)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in ("none of the 8 prompts processed gave a pair", "8 empty original response",
                     f"The 0 pairs written are kept in {out}", "--max-new-tokens"):
        assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "wrote 0 pairs" in proc.stdout
    assert len(out.with_name("c.jsonl.progress.jsonl").read_text().splitlines()) == 8  # kept: a rerun resumes


def test_constitution_skip_rate():
    from posttrain.commands.constitution import _failed

    args = argparse.Namespace(max_skip_rate=0.5, out="c.jsonl")
    assert _failed(0, collections.Counter(), args, 3) is None  # a rerun with every prompt done already
    assert _failed(4, collections.Counter({"unchanged": 2}), args, 2) is None  # half: not more than 0.5
    assert "3 of the 4 prompts processed gave no pair, more than --max-skip-rate 0.5 (skipped: 3 unchanged)" \
        in _failed(4, collections.Counter({"unchanged": 3}), args, 1)
    args.max_skip_rate = 1.0
    assert "none of the 2 prompts" in _failed(2, collections.Counter({"empty": 2}), args, 0)


# ------------------------------------------------------------------ inputs that could never work


def test_rows_a_reward_cannot_score_are_refused_before_the_model_loads(tmp_path, tiny_dir):
    # `eval --data` with rows lacking `answer` printed nan and exited 0
    data = tmp_path / "noanswer.jsonl"
    data.write_text('{"prompt": "q1"}\n{"prompt": "q2"}\n')
    proc = terminal.posttrain("eval", "--data", data, "--reward", "math", "--model", tiny_dir, cwd=tmp_path)
    terminal.assert_user_error(proc, f"{data}: field 'answer': no row holds it", "the reward 'math'")


def test_other_inputs_that_could_never_work(tmp_path, tiny_dir, capsys):
    rows = {"noanswer": {"prompt": "q", "completion": "Answer: 5"}, "nocompletion": {"prompt": "q", "answer": "5"},
            "nullcompletion": {"prompt": "q", "answer": "5", "completion": None}}
    for name, row in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "config.json").write_text('{"hidden_size": 64,')
    (tmp_path / "notes.txt").write_text("mine, not a pairs file\n")
    (tmp_path / "adir").mkdir()
    d = {k: str(tmp_path / f"{k}.jsonl") for k in rows}
    cases = [
        (["score", "--reward", "math", "--data", d["noanswer"]], "field 'answer': no row holds it"),
        (["score", "--reward", "math", "--data", d["nocompletion"]], "1 rows lack the field 'completion'"),
        (["score", "--reward", "math", "--data", d["nullcompletion"]], "1 rows hold no completion text"),
        (["score", "--reward", "math", "--data", d["nullcompletion"], "--out", d["nullcompletion"]], "is the --data"),
        (["pairs", "--data", d["noanswer"], "--reward", "math", "--model", tiny_dir, "--out", str(tmp_path / "o")],
         "field 'answer': no row holds it"),
        (["generate", "--prompt", "hi", "--prompt", " "], "--prompt #2 is empty"),
        (["tasks", "show", "arithmetic", "--opt", "digits=40"], "--opt: task 'arithmetic' option digits=40: must be "
                                                                "an integer in 1..18"),
        (["tasks", "show", "countdown", "--opt", "digits=2"], "has no option 'digits' (it takes: count, max_number"),
        (["tasks", "export", "arithmetic", "--out", str(tmp_path / "adir")], "is a directory"),
        (["memory", "--model", str(tmp_path / "badmodel")], "badmodel/config.json:1: not valid JSON"),
        (["recommend", *TASK, "--reward", "nonsense"], "--reward 'nonsense': unknown reward"),
        (["recommend", *TASK, "--judge", str(tmp_path / "judge.yaml")], "judge.yaml: config file not found"),
        (["label", "--judge", "j.yaml", "--data", d["noanswer"], "--out", str(tmp_path / "notes.txt")],
         "notes.txt.progress.jsonl, so `posttrain label` did not make it"),
        (["pairs", *TASK, "--out", str(tmp_path / "adir"), "--model", tiny_dir], "adir is a directory"),
    ]
    before = terminal.snapshot(tmp_path)
    for argv, fragment in cases:
        assert fragment in user_error(capsys, *argv), argv
    assert terminal.snapshot(tmp_path) == before


def test_pairs_refuses_an_output_it_cannot_continue(tmp_path):
    from posttrain.algorithms.pairs import PairsFileError, check_output

    out, log = tmp_path / "p.jsonl", tmp_path / "p.jsonl.progress.jsonl"
    out.write_text('{"prompt": "a"}\n')
    for text, fragment in (('{"settings": {"n": 2}}\n{"key": "0:a", "status": "paired"}\nnot json\n{"key": "1:b"}\n',
                            "p.jsonl.progress.jsonl:3: not a JSON line"),
                           ('{"row": 0, "status": "pair", "reason": ""}\n', ":1: not a record of `posttrain pairs`"),
                           ('{"settings": {"n": 3}}\n', "made with other settings")):
        log.write_text(text)
        with pytest.raises(PairsFileError, match=fragment):
            check_output(out, {"n": 2})


def test_a_bug_behind_a_verb_keeps_its_traceback(tmp_path, tiny_dir, monkeypatch):
    # these verbs turned any ValueError / KeyError / TypeError into "error: --out ..." / "--opt ..." (exit 2)
    cases = [("posttrain.data.tasks.get_task", TypeError, ["tasks", "show", "arithmetic"]),
             ("posttrain.doctrine.memory.estimate", KeyError, ["memory", "--model", "8B"]),
             ("posttrain.doctrine.select.recommend", ValueError, ["recommend", *TASK]),
             ("posttrain.algorithms.pairs.make_pairs", ValueError,
              ["pairs", *TASK, "--limit", "1", "--model", tiny_dir, "--out", str(tmp_path / "p.jsonl")])]
    for target, error, argv in cases:
        def bug(*args, **kwargs):
            raise error("a bug, not a user error")

        with monkeypatch.context() as m:
            m.setattr(target, bug)
            with pytest.raises(error, match="a bug"):
                cli.main(argv)


def test_doctor_thresholds_task_sizes_and_auto_are_user_errors(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "demo_run", run)
    cases = [
        (("doctor", str(run), "--set", "nonsense=1"), ["--set nonsense=1", "unknown threshold"]),
        (("doctor", str(run), "--set", "window=abc"), ["--set window=abc", "must be a number"]),
        (("tasks", "show", "arithmetic", "--split", "test", "--opt", "digits=1", "--n", "50"),
         ["only 4 distinct test problems", "asked 50"]),
        (("train", "auto", "--dry-run"), []),
    ]
    for args, fragments in cases:
        terminal.assert_user_error(terminal.posttrain(*args, cwd=tmp_path), *fragments)


def test_a_labeling_output_damaged_before_its_last_line_is_an_error_not_a_silent_cut(tmp_path):
    from posttrain.data import DataError
    from posttrain.rlaif.resume import ResumableJsonl

    out = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "label": {"row": 0}}) + "\n"
    out.write_text(good + "{not json\n" + good.replace('"row": 0', '"row": 2'))
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: not a JSON line, and not the last one"):
        ResumableJsonl(out, "label")
    assert out.read_bytes() == before  # nothing cut
    out.write_text(good + '{"prompt": "torn')  # a crash mid-write tears only the last line: cut on resume
    store = ResumableJsonl(out, "label")
    assert store.done == {0} and out.read_text() == good


def test_score_and_tasks_export_never_replace_a_users_file_unasked(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "q", "completion": "Answer: 4", "answer": "4"}\n')
    precious = tmp_path / "precious.jsonl"
    precious.write_text("my notes\n")
    for args in (("score", "--reward", "math", "--data", str(data), "--out", str(precious)),
                 ("tasks", "export", "arithmetic", "--n", "2", "--out", str(precious))):
        terminal.assert_user_error(terminal.posttrain(*args, cwd=tmp_path), f"--out {precious}",
                                   "exists and is not empty", "--overwrite")
        assert precious.read_text() == "my notes\n"
    proc = terminal.posttrain("tasks", "export", "arithmetic", "--n", "2", "--out", str(precious), "--overwrite",
                              cwd=tmp_path)
    assert proc.returncode == 0 and len(precious.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.jsonl", "rows.jsonl"]  # no temporary left
