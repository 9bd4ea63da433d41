"""The review page in a real headless browser (Debian's chromium through chromedriver, `tests/browser.py`):
a finished run (plots, doctor events, filters, a group, three labels kept over a reload, pairs exported
and trained on, a `<script>` completion shown and not run, a label write without the token refused) and
a running one (a real training run of a tiny model whose new steps appear without a reload)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import browser  # noqa: E402
import terminal  # noqa: E402
from test_review import SCRIPT, make_run  # noqa: E402

pytestmark = pytest.mark.skipif(not browser.HAVE_BROWSER, reason=browser.SKIP_REASON)


def _cards(d):
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, "#samples .sample")


def _card(d, sample_id: str):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, f'#samples .sample[data-id="{sample_id}"]')


def _set(d, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    node = d.find_element(By.ID, f"f-{field}")
    if node.tag_name == "select":
        Select(node).select_by_value(value)
    else:
        node.clear()
        node.send_keys(value)


def _shown(d) -> str:
    return d.find_element("id", "shown").text


def test_a_finished_run_filter_group_label_reload_export(tmp_path, tiny_dir):
    from selenium.webdriver.common.by import By

    run = make_run(tmp_path / "runs")
    with browser.review_server(run) as url, browser.chromium() as d:
        d.get(url)
        browser.wait_for(lambda: "step 12" in d.find_element(By.ID, "status").text, what="the run's last step")
        browser.wait_for(lambda: _shown(d) == f"(50 of {12 * 3 * 4 + 2})", what="the first page of samples")
        # the report's plots drew and loaded
        images = browser.wait_for(lambda: [i for i in d.find_elements(By.CSS_SELECTOR, "#plots img")
                                           if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)],
                                  what="the plots")
        assert {"Reward and KL", "Entropy", "Held-out evaluation"} <= {i.get_attribute("alt") for i in images}

        # filter: steps 5-6 and the stock-phrase flag
        _set(d, "step_min", "5")
        _set(d, "step_max", "6")
        d.find_element(By.ID, "apply").click()
        browser.wait_for(lambda: _shown(d) == "(24 of 24)", what="the step filter")
        assert {c.find_element(By.CSS_SELECTOR, ".meta span").text for c in _cards(d)} == {"step 5", "step 6"}
        _set(d, "flag", "stock_phrase")
        d.find_element(By.ID, "apply").click()
        browser.wait_for(lambda: _shown(d) == "(6 of 6)", what="the flag filter")
        assert all("stock_phrase" in c.text for c in _cards(d))

        # the <script> completion is shown as text and runs nothing
        d.find_element(By.ID, "reset").click()
        _set(d, "text", "<script>")
        d.find_element(By.ID, "apply").click()
        browser.wait_for(lambda: _shown(d) == "(1 of 1)", what="the text filter")
        assert _card(d, "5-0-1").find_element(By.CSS_SELECTOR, ".completion").text == SCRIPT
        assert d.execute_script("return window.__pwned") is None and d.title == "posttrain review"

        # a multi-turn episode is shown as a conversation
        _set(d, "text", "Guess a number")
        d.find_element(By.ID, "apply").click()
        browser.wait_for(lambda: _shown(d) == "(2 of 2)", what="the episodes")
        turns = _card(d, "12-3-0").find_elements(By.CSS_SELECTOR, ".turn")
        assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant", "turn user", "turn assistant"]
        assert turns[2].find_element(By.CSS_SELECTOR, ".content").text == "Higher.\n(3 left)"

        # the group: its K completions side by side with rewards and advantages
        _set(d, "text", "<script>")
        d.find_element(By.ID, "apply").click()
        browser.wait_for(lambda: _shown(d) == "(1 of 1)", what="the text filter")
        _card(d, "5-0-1").find_element(By.CSS_SELECTOR, ".open-group").click()
        panel = browser.wait_for(lambda: d.find_element(By.ID, "panel").is_displayed() and d.find_element(By.ID, "panel"),
                                 what="the group panel")
        group = panel.find_elements(By.CSS_SELECTOR, ".sample")
        assert [g.get_attribute("data-id") for g in group] == ["5-0-0", "5-0-1", "5-0-2", "5-0-3"]
        assert [g.find_element(By.CSS_SELECTOR, ".advantage").text for g in group] == [
            "advantage -0.5", "advantage 0.5", "advantage -0.5", "advantage 0.5"]
        assert panel.find_element(By.ID, "panel-prompt").text == "What is 2 + 3?"
        # the same prompt across steps
        _card(d, "5-0-1").find_element(By.CSS_SELECTOR, ".open-prompt").click()
        browser.wait_for(lambda: len(panel.find_elements(By.CSS_SELECTOR, ".sample")) == 12 * 4, what="the prompt's history")
        assert {g.get_attribute("data-id").split("-")[0] for g in panel.find_elements(By.CSS_SELECTOR, ".sample")} == \
            {str(s) for s in range(1, 13)}
        d.find_element(By.ID, "panel-close").click()

        # label three samples of one prompt (one with a note), then reload: the labels are kept
        d.find_element(By.ID, "reset").click()
        browser.wait_for(lambda: _shown(d).endswith(f"of {12 * 3 * 4 + 2})"), what="the cleared filter")
        for sid, label, note in (("12-0-1", "good", "correct and short"), ("12-0-0", "bad", ""),
                                 ("11-0-3", "hacked", "stock phrase for the format reward")):
            card = browser.wait_for(lambda sid=sid: _card(d, sid), what=f"sample {sid}")
            card.find_element(By.CSS_SELECTOR, ".note").send_keys(note)
            card.find_element(By.CSS_SELECTOR, f".label-{label}").click()
            browser.wait_for(lambda sid=sid, label=label: _card(d, sid).find_element(By.CSS_SELECTOR, ".label-state").text
                             == f"saved: {label}", what=f"the {label} label of {sid}")
        browser.wait_for(lambda: "good 1 · bad 1 · hacked 1" in d.find_element(By.ID, "counts").text, what="the counts")
        d.refresh()
        browser.wait_for(lambda: len(_cards(d)) == 50, what="the samples after a reload")
        assert [_card(d, sid).get_attribute("data-label") for sid in ("12-0-1", "12-0-0", "11-0-3")] == [
            "good", "bad", "hacked"]
        assert _card(d, "11-0-3").find_element(By.CSS_SELECTOR, ".note").get_attribute("value") == \
            "stock phrase for the format reward"

        # the doctor's table shows the human flag
        browser.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, '#events tr[data-rule="human_flagged_hacking"]'),
                         what="the human-flagged event")

        # a label write without the token, from the page itself, is refused and changes nothing
        before = (run / "reviews.jsonl").read_bytes()
        status = d.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/api/label', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                 body: JSON.stringify({run: 'finished', id: '12-0-2', label: 'good'})})
              .then(r => done(r.status));""")
        assert status == 403 and (run / "reviews.jsonl").read_bytes() == before

    # the labels as preference pairs: a valid `train dpo` input
    pairs = tmp_path / "pairs.jsonl"
    proc = terminal.posttrain("review", run, "--export-pairs", pairs)
    assert proc.returncode == 0 and "2 preference pair(s)" in proc.stdout, proc.stderr
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert {r["chosen"] for r in rows} == {"step 12 group 0: the answer is 1" + " " * 40}
    proc = terminal.posttrain("train", "dpo", "--model", tiny_dir, "--data", pairs, "--max-steps", "1", "--no-lora",
                              "--eval-fraction", "0", "--output-dir", tmp_path / "dpo", "--name", "reviewed")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_running_run_shows_new_steps_without_a_reload(tmp_path, stoppable_dir, toy_prompts):
    from selenium.webdriver.common.by import By

    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(terminal.ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    train = subprocess.Popen([sys.executable, "-m", "posttrain", "train", "grpo", "--model", stoppable_dir, "--data",
                              toy_prompts, "--reward", "length", "--group-size", "4", "--prompts-per-step", "2",
                              "--max-new-tokens", "8", "--max-steps", "5000", "--checkpoint-every", "100000",
                              "--output-dir", out, "--name", "live"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        browser.wait_for(lambda: train.poll() is None and (out / "live" / "samples.jsonl").is_file()
                         and (out / "live" / "samples.jsonl").stat().st_size > 0, timeout=180, what="the first step")
        with browser.review_server(out) as url, browser.chromium() as d:
            d.get(url)
            status = browser.wait_for(lambda: d.find_element(By.ID, "status").text, what="the status line")
            assert "running" in status and "(running)" in d.find_element(By.ID, "run").text
            first = int(status.split()[1])
            d.execute_script("window.__same_page = true")  # gone if the page reloads
            later = browser.wait_for(lambda: int(d.find_element(By.ID, "status").text.split()[1]) >= first + 2
                                     and d.find_element(By.ID, "status").text, timeout=120, what="new steps")
            assert d.execute_script("return window.__same_page") is True
            assert int(later.split()[3]) > int(status.split()[3])  # more samples
            browser.wait_for(lambda: len(_cards(d)) > 2 * 4, what="the new steps' samples")
            assert all(c.find_element(By.CSS_SELECTOR, ".advantage").text != "advantage -" for c in _cards(d))
            # a label made while the run keeps writing its samples is kept
            sid = _cards(d)[0].get_attribute("data-id")
            status = d.execute_async_script("""
                const done = arguments[arguments.length - 1];
                const token = document.querySelector('meta[name="review-token"]').content;
                fetch('/api/label', {method: 'POST', headers: {'Content-Type': 'application/json', 'X-Review-Token': token},
                                     body: JSON.stringify({run: 'live', id: arguments[0], label: 'bad', note: 'live'})})
                  .then(r => done(r.status));""", sid)
            assert status == 200
            steps = len((out / "live" / "metrics.jsonl").read_text().splitlines())
            browser.wait_for(lambda: len((out / "live" / "metrics.jsonl").read_text().splitlines()) >= steps + 2,
                             timeout=120, what="more steps after the label")
            labels = [json.loads(line) for line in (out / "live" / "reviews.jsonl").read_text().splitlines()]
            assert [(r["id"], r["label"], r["note"]) for r in labels] == [(sid, "bad", "live")]
    finally:
        train.terminate()
        _, err = train.communicate(timeout=60)
        assert "Traceback" not in err, err[-3000:]
