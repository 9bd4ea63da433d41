"""Run reports: PNGs with real content, HTML that references them and escapes samples, and a
headless-browser render (when chromium is installed). Reports are written as `posttrain report`
writes them: with the doctor's events (doctor.jsonl, else a fresh diagnosis: `run_events`)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from posttrain.doctrine.doctor import run_events
from posttrain.doctrine.report import write_report

BLUE, RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)


def _write(run: Path, name: str, rows: list[dict]) -> None:
    (run / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def grpo_run(root: Path, n: int = 60) -> Path:
    """A GRPO run whose reward starts paying for length at step 30 (the doctor flags it)."""
    run = root / "grpo-run"
    run.mkdir()
    rng = random.Random(0)
    history, samples = [], []
    for s in range(1, n + 1):
        length = 30 + (0 if s <= 30 else 4 * (s - 30)) + rng.gauss(0, 1)
        reward = 0.2 + 0.3 * s / n if s <= 30 else length / 150
        history.append({"step": s, "reward/mean": reward + rng.gauss(0, 0.02), "reward/std": 0.4,
                        "reward/math": reward, "reward/format": 0.5 + 0.1 * rng.random(), "reward/none": 0.0,
                        "kl": 0.002 * s, "entropy": 0.9 - 0.004 * s, "clip_frac": 0.05 + 0.01 * rng.random(),
                        "len/mean": length, "len/clipped_frac": 0.05, "loss": rng.gauss(0, 0.05),
                        "grad_norm": 1 + rng.random(), "frac_zero_std": 0.2})
        samples.append({"step": s, "prompt": "What is <b>2</b> + 2? <script>alert(1)</script>",
                        "completions": [f"step {s}: 2 + 2 = 4 & <i>done</i>", "4"], "rewards": [1.0, None]})
    _write(run, "metrics.jsonl", history)
    _write(run, "samples.jsonl", samples)
    _write(run, "evals.jsonl", [{"step": 0, "accuracy": 0.2, "n": 50, "none": 1,
                                 "examples": [{"prompt": "1+1?", "completion": "2 <eos>", "reward": 1.0}]},
                                {"step": n, "accuracy": 0.45, "n": 50, "none": 0, "examples": []}])
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "grpo", "model": "smollm2-135m-instruct",
                                                     "lr": 1e-5, "beta": 0.04, "reward": "math,format:0.2"}))
    return run


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    if img.dtype != np.uint8:
        img = (img * 255).round().astype(np.uint8)
    return img[..., :3]


def _count(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 30) -> int:
    return int((np.abs(img.astype(int) - np.array(rgb)).max(-1) <= tol).sum())


def test_grpo_report_pngs_have_content_and_html_links_them(tmp_path):
    run = grpo_run(tmp_path)
    html_path = write_report(run, events=run_events(run))
    assert html_path == run / "report.html"
    html = html_path.read_text()
    names = {"reward_kl.png", "length.png", "entropy.png", "clip_frac.png", "reward_parts.png", "loss.png",
             "evals.png", "doctor_timeline.png"}
    for name in names:
        img = _pixels(run / name)
        assert img.std() > 10, f"{name} looks blank"
        assert f"src='{name}'" in html
    reward_kl = _pixels(run / "reward_kl.png")
    assert _count(reward_kl, BLUE) > 200 and _count(reward_kl, RED) > 200, "reward (blue) and KL (red) lines"
    assert not (run / "dpo_rewards.png").exists()  # no DPO metrics: no DPO plot


def test_doctor_events_are_on_the_timeline_and_in_the_table(tmp_path):
    run = grpo_run(tmp_path)
    html = write_report(run, events=run_events(run)).read_text()  # no doctor.jsonl: a fresh diagnosis
    assert "length_hacking" in html and "length penalty" in html
    # with doctor.jsonl present, its events are used as logged
    (run / "doctor.jsonl").write_text(json.dumps({"step": 12, "rule": "kl_exploding", "severity": "error",
                                                  "symptom": "KL grew", "cause": "weak KL", "fix": "raise beta"}) + "\n")
    html = write_report(run, events=run_events(run)).read_text()
    assert "kl_exploding" in html and "length_hacking" not in html
    timeline = _pixels(run / "doctor_timeline.png")
    assert _count(timeline, RED, tol=20) > 50  # the error-level event's marker


def test_samples_are_escaped_and_from_early_and_late(tmp_path):
    run = grpo_run(tmp_path)
    html = write_report(run, events=run_events(run)).read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;i&gt;done&lt;/i&gt;" in html and "&amp;" in html
    shown = [int(m) for m in re.findall(r"<h3>step (\d+)</h3>", html)]
    assert min(shown) <= 2 and max(shown) >= 59


def test_dpo_run_and_missing_metrics(tmp_path):
    run = tmp_path / "dpo-run"
    run.mkdir()
    _write(run, "metrics.jsonl", [{"step": s, "loss": 0.69 - 0.005 * s, "rewards/chosen": 0.01 * s,
                                   "rewards/rejected": -0.01 * s, "rewards/margin": 0.02 * s,
                                   "rewards/accuracy": min(1.0, 0.5 + 0.01 * s), "grad_norm": "nan" if s == 5 else 1.0}
                                  for s in range(1, 41)])
    html = write_report(run, events=run_events(run)).read_text()
    assert (run / "dpo_rewards.png").exists() and (run / "loss.png").exists()
    for absent in ("reward_kl.png", "length.png", "entropy.png", "clip_frac.png", "evals.png"):
        assert not (run / absent).exists() and absent not in html
    assert "No samples logged" in html
    assert "nonfinite" in html  # the NaN gradient norm is diagnosed
    assert _pixels(run / "dpo_rewards.png").std() > 10


def test_empty_and_tiny_runs_still_get_a_report(tmp_path):
    run = tmp_path / "short"
    run.mkdir()
    _write(run, "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    html = write_report(run, events=run_events(run)).read_text()
    assert "loss.png" in html and "No problems found" in html
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No metrics logged" in write_report(empty, events=run_events(empty)).read_text()


def test_cli_report(tmp_path, capsys):
    from posttrain.cli import main

    run = grpo_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out and (run / "report.html").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = grpo_run(tmp_path)
    html = write_report(run, events=run_events(run))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600",
                    f"--screenshot={shot}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = _pixels(shot)
    assert img.std() > 10, "the rendered page is blank"
    # the plots loaded: the reward line's blue and the KL line's red appear on the page
    assert _count(img, BLUE) > 200 and _count(img, RED) > 100
