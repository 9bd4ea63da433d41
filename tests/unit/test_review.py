"""The review page's data and its write path, without a browser: sample ids, flags and filters; labels
written atomically under concurrent writers; the pairs they make (a valid `train dpo` input, checked by
running it); the doctor's human-flagged event; the token and origin guard of a real server; the CLI's
errors at the terminal."""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections import Counter
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import browser  # noqa: E402
import terminal  # noqa: E402

from posttrain.doctrine.doctor import Doctor  # noqa: E402
from posttrain.review import labels as lab  # noqa: E402
from posttrain.review.samples import Filter, apply, conversation, group, same_prompt, samples_of  # noqa: E402

SCRIPT = '<script>window.__pwned = 1; document.title = "pwned"</script>The answer is 5.'
EPISODE = "[user] Guess a number.\n[assistant] 5\n[user] Higher.\n(3 left)\n[assistant] 7"


def make_run(root: Path, name: str = "finished", steps: int = 12, groups: int = 3, k: int = 4) -> Path:
    """A run directory as the tracker writes it: metrics, samples (single-turn groups, one episode
    group), evals. Group 0 asks the same prompt at every step; completion 1 of step 5's group 0 holds a
    script; completion 3 of every group ends with a stock phrase."""
    run = root / name
    run.mkdir(parents=True)
    metrics, samples = [], []
    for s in range(1, steps + 1):
        metrics.append({"step": s, "reward/mean": 0.1 + 0.05 * s, "kl": 0.001 * s, "entropy": 1.0 - 0.02 * s,
                        "len/mean": 20 + s, "len/clipped_frac": 0.1, "clip_frac": 0.02, "loss": 0.1,
                        "grad_norm": 1.0, "reward/math": 0.1 + 0.05 * s})
        for g in range(groups):
            prompt = "What is 2 + 3?" if g == 0 else f"Question {s}-{g}: name a color."
            texts = [f"step {s} group {g}: the answer is {i}" + (" " * 40 * i) for i in range(k)]
            texts[3] = f"It is {s}. I hope this helps!"
            if (s, g) == (5, 0):
                texts[1] = SCRIPT
            rewards = [float(i % 2) for i in range(k)]
            samples.append({"step": s, "prompt": prompt, "completions": texts, "rewards": rewards,
                            "parts": {"math": rewards, "format": [0.5] * k},
                            "advantages": [r - 0.5 for r in rewards]})
    samples.append({"step": steps, "prompt": json.dumps({"secret": 7}), "completions": [EPISODE, EPISODE],
                    "rewards": [1.0, 0.0], "parts": {"env": [1.0, 0.0]}})
    for name_, rows in (("metrics.jsonl", metrics), ("samples.jsonl", samples),
                        ("evals.jsonl", [{"step": 0, "accuracy": 0.2, "n": 10}, {"step": steps, "accuracy": 0.4, "n": 10}])):
        (run / name_).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_samples_have_ids_flags_and_filters(tmp_path):
    run = make_run(tmp_path)
    samples = samples_of(json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines())
    assert len(samples) == 12 * 3 * 4 + 2
    by_id = {s.id: s for s in samples}
    assert by_id["5-0-1"].completion == SCRIPT and by_id["5-0-1"].advantage == 0.5 and by_id["5-0-1"].parts["math"] == 1.0
    assert by_id["12-3-0"].advantage is None and by_id["12-3-0"].to_dict()["conversation"] == [
        {"role": "user", "content": "Guess a number."}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Higher.\n(3 left)"}, {"role": "assistant", "content": "7"}]
    assert conversation("plain text [user] inside") is None
    echo = samples_of([{"step": 1, "prompt": "4, 2, 1, 0, 0, ?\nPut the final answer after 'Answer:'.",
                        "completions": ["4, 2, 1, 0, 0, ?", "Answer: 0", "0"], "rewards": [1.0, 1.0, 1.0]}])
    assert [s.flags for s in echo] == [["echo"], [], []]
    assert "stock_phrase" in by_id["3-1-3"].flags and "stock_phrase" not in by_id["3-1-1"].flags
    # the longest tenth, rewarded above its group's mean: completion 3 is long but stock; 2 is long, reward 0
    assert "long" not in by_id["3-1-2"].flags and all("long" not in s.flags for s in samples if s.reward == 0)
    labels = {"1-0-0": {"label": "good"}}
    assert {s.step for s in apply(samples, Filter(step_min=5, step_max=6), {})} == {5, 6}
    assert all(s.reward == 1.0 for s in apply(samples, Filter(reward_min=0.9), {}))
    assert [s.id for s in apply(samples, Filter(label="good"), labels)] == ["1-0-0"]
    assert len(apply(samples, Filter(label="none"), labels)) == len(samples) - 1
    assert all("stock_phrase" in s.flags for s in apply(samples, Filter(flag="stock_phrase"), {}))
    assert {s.id for s in apply(samples, Filter(reward_fn="env", fn_min=1), {})} == {"12-3-0"}
    assert [s.id for s in apply(samples, Filter(text="<script>"), {})] == ["5-0-1"]
    assert apply(samples, Filter(length_min=10_000), {}) == []
    assert [s.index for s in group(samples, 5, 0)] == [0, 1, 2, 3]
    assert {s.step for s in same_prompt(samples, "What is 2 + 3?")} == set(range(1, 13))


def test_sample_log_reads_a_growing_file_incrementally(tmp_path, monkeypatch):
    """The server's reader of a live run: each read parses only what was appended (each sample's
    own signs computed once), waits for a line still being written, reads afresh a file a resume
    replaced, and gives the flags a whole-file read gives."""
    from posttrain.review import samples as sm
    from posttrain.runtime.tracking import RunFileError, _truncate_after

    run = make_run(tmp_path)
    path = run / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    calls = []
    signs_of = sm.signs_of
    monkeypatch.setattr(sm, "signs_of", lambda s: calls.append(s.id) or signs_of(s))
    path.write_text("".join(lines[:10]))
    log = sm.SampleLog(path)

    def whole(n):  # what a whole-file read gives for the first n lines (its signs not counted)
        out = sm._samples((json.loads(x) for x in lines[:n]), Counter())
        sm.set_flags(out, [signs_of(x) for x in out])
        return [(x.id, x.flags) for x in out]

    assert [(s.id, s.flags) for s in log.read()] == whole(10) and len(calls) == 40
    assert len(log.read()) == 40 and len(calls) == 40  # unchanged: nothing parsed again
    with path.open("a") as f:  # 20 more records and half of the next line, as a writer mid-line leaves it
        f.write("".join(lines[10:30]) + lines[30][:25])
    assert [(s.id, s.flags) for s in log.read()] == whole(30) and len(calls) == 120  # 80 new samples only
    with path.open("a") as f:
        f.write(lines[30][25:] + "".join(lines[31:]))
    got = log.read()
    assert [(s.id, s.flags) for s in got] == whole(len(lines)) and len(calls) == len(got)
    assert any("repeated_closer" in s.flags or "long" in s.flags for s in got)  # flags over the whole run
    _truncate_after(path, 4)  # a resume from step 4: the file rewritten with steps 1-4 only
    assert [(s.id, s.flags) for s in log.read()] == whole(12)
    with path.open("a") as f:
        f.write("{not json\n" + lines[12])
    with pytest.raises(RunFileError, match=r"samples.jsonl:13: not a JSON object"):
        log.read()
    path.unlink()
    assert log.read() == []


def _label_many(run: str, offset: int, n: int) -> None:
    from posttrain.review.samples import read_samples

    samples = read_samples(run)
    for i in range(n):
        lab.add_label(run, samples[offset + i], "good" if i % 2 else "bad", note=f"writer {offset}")


def test_labels_are_atomic_serialised_and_clearable(tmp_path):
    run = make_run(tmp_path)
    from posttrain.review.samples import read_samples

    samples = read_samples(run)
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_label_many, args=(str(run), offset, 25)) for offset in (0, 40)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    lines = (run / lab.REVIEWS).read_text().splitlines()
    assert len(lines) == 50 and all(json.loads(line)["label"] in ("good", "bad") for line in lines)
    assert not list(run.glob("*.tmp"))  # no temporary file left behind
    lab.add_label(run, samples[0], "hacked", "games the format")
    lab.add_label(run, samples[1], "clear")
    current = lab.current(lab.history(run))
    assert current[samples[0].id]["label"] == "hacked" and samples[1].id not in current and len(current) == 49
    with pytest.raises(lab.LabelError, match="label must be one of good, bad, hacked, clear, got 'great'"):
        lab.add_label(run, samples[2], "great")


def test_pairs_from_labels_and_episodes_left_out(tmp_path):
    run = make_run(tmp_path)
    from posttrain.review.samples import read_samples

    s = {x.id: x for x in read_samples(run)}
    for sid, label in (("2-0-0", "good"), ("2-0-1", "bad"), ("3-0-2", "hacked"), ("4-1-0", "good"),
                       ("12-3-0", "good"), ("12-3-1", "bad")):
        lab.add_label(run, s[sid], label)
    pairs, episodes = lab.pairs(lab.current(lab.history(run)))
    assert episodes == 2
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == sorted(
        [(s["2-0-0"].completion, s["2-0-1"].completion), (s["2-0-0"].completion, s["3-0-2"].completion)])
    assert all(p["prompt"] == "What is 2 + 3?" for p in pairs)  # 4-1-0 has no rejected answer of its prompt


def test_export_pairs_at_the_terminal_feeds_train_dpo(tmp_path, tiny_dir):
    run = make_run(tmp_path / "runs")
    out = tmp_path / "pairs.jsonl"
    proc = terminal.posttrain("review", run, "--export-pairs", out)
    terminal.assert_user_error(proc, "--export-pairs: no preference pair yet")
    assert not out.exists()
    from posttrain.review.samples import read_samples

    s = {x.id: x for x in read_samples(run)}
    for sid, label in (("2-0-0", "good"), ("2-0-1", "bad"), ("6-0-3", "hacked")):
        lab.add_label(run, s[sid], label)
    proc = terminal.posttrain("review", tmp_path / "runs", "--export-pairs", out)  # a directory of runs
    assert proc.returncode == 0, proc.stderr
    assert "2 preference pair(s) from 1 run(s)" in proc.stdout
    written = out.read_bytes()
    terminal.assert_user_error(terminal.posttrain("review", run, "--export-pairs", out), "the file exists", "--overwrite")
    assert out.read_bytes() == written  # a user's file is never replaced unasked
    assert terminal.posttrain("review", run, "--export-pairs", out, "--overwrite").returncode == 0
    terminal.assert_user_error(terminal.posttrain("review", run, "--export-pairs", tmp_path), "is a directory")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    terminal.assert_user_error(terminal.posttrain("review", run, "--export-pairs", blocker / "pairs.jsonl"),
                               "cannot write it")
    proc = terminal.posttrain("train", "dpo", "--model", tiny_dir, "--data", out, "--max-steps", "1", "--no-lora",
                              "--eval-fraction", "0", "--output-dir", tmp_path / "dpo", "--name", "from-review")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "dpo" / "from-review" / "final").is_dir()


def test_review_errors_at_the_terminal(tmp_path):
    terminal.assert_user_error(terminal.posttrain("review", tmp_path / "nope"), "no such directory")
    (tmp_path / "empty").mkdir()
    terminal.assert_user_error(terminal.posttrain("review", tmp_path / "empty"), "not a run")
    run = make_run(tmp_path)
    terminal.assert_user_error(terminal.posttrain("review", run, "--port", "70000"), "--port 70000")
    with browser.review_server(run) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]
        before = set(Path(tempfile.gettempdir()).glob("posttrain-review-*"))
        terminal.assert_user_error(terminal.posttrain("review", run, "--port", port), f"--port {port}", "cannot listen")
        assert set(Path(tempfile.gettempdir()).glob("posttrain-review-*")) == before  # nothing left behind


def _post(url: str, body: dict, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "api/label", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_label_writes_need_the_token_and_the_pages_origin(tmp_path):
    run = make_run(tmp_path)
    with browser.review_server(run) as url:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        token = page.split('name="review-token" content="')[1].split('"')[0]
        body = {"run": run.name, "id": "1-0-0", "label": "good", "note": ""}
        assert _post(url, body, {})[0] == 403
        assert _post(url, body, {"X-Review-Token": "guess"})[0] == 403
        assert _post(url, body, {"X-Review-Token": token, "Origin": "http://evil.example"})[0] == 403
        assert not (run / lab.REVIEWS).exists()
        assert _post(url, {**body, "label": "great"}, {"X-Review-Token": token})[0] == 400
        assert _post(url, {**body, "id": "99-0-0"}, {"X-Review-Token": token})[0] == 404
        status, reply = _post(url, body, {"X-Review-Token": token, "Origin": url.rstrip("/")})
        assert status == 200 and reply["label"]["label"] == "good"
        assert lab.current(lab.history(run))["1-0-0"]["label"] == "good"
        headers = urllib.request.urlopen(url, timeout=10).headers
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        rebound = urllib.request.Request(url + "api/samples", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError, match="400"):  # a DNS-rebinding page reads nothing
            urllib.request.urlopen(rebound, timeout=10)


def test_the_doctor_reports_human_flagged_hacking(tmp_path):
    run = make_run(tmp_path)
    from posttrain.review.samples import read_samples

    s = {x.id: x for x in read_samples(run)}
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    doc = Doctor(echo=False)
    assert not [e for e in doc.watch(run, history[:10], force=True) if e.rule == "human_flagged_hacking"]
    lab.add_label(run, s["7-0-3"], "hacked", "appends 'I hope this helps!' for the format reward")
    new = [e for e in doc.watch(run, history, force=True) if e.rule == "human_flagged_hacking"]
    assert len(new) == 1 and new[0].step == 12 and new[0].severity == "error"
    assert "1 sample(s)" in new[0].symptom and "steps 7" in new[0].symptom
    assert not [e for e in doc.watch(run, history, force=True) if e.rule == "human_flagged_hacking"]  # once
    (run / "doctor.jsonl").write_text(json.dumps(new[0].to_dict()) + "\n")  # as the live doctor logged it
    resumed = Doctor(echo=False)  # a resumed run's doctor does not report the same flags again
    assert not [e for e in resumed.watch(run, history, force=True) if e.rule == "human_flagged_hacking"]
    from posttrain.doctrine.doctor import run_events

    assert [e["evidence"]["flagged"] for e in run_events(run) if e["rule"] == "human_flagged_hacking"] == [1]
    lab.add_label(run, s["8-0-3"], "hacked")  # labelled after the run: the report and the page see it
    assert sorted(e["evidence"]["flagged"] for e in run_events(run) if e["rule"] == "human_flagged_hacking") == [1, 2]
    proc = terminal.posttrain("doctor", run)
    assert proc.returncode == 1 and "1 event(s)" in proc.stdout and "reward-hacked" in " ".join(proc.stdout.split())
    proc = terminal.posttrain("doctor", run, "--json")
    event = [json.loads(line) for line in proc.stdout.splitlines() if "human_flagged" in line][0]
    assert event["step"] == 7 and event["evidence"]["ids"] == ["7-0-3", "8-0-3"] and "I hope this helps" in event["symptom"]
