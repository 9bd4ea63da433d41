"""Screenshots of the review page for the README, taken with the browser tests' set-up (`tests/browser.py`:
Debian's chromium through chromedriver) from real runs of the embedded model.

    .venv/bin/python docs/review_screenshots.py --run runs/se --episodes runs/guess10 --out docs/img \
        --best-label hacked --best-note "cut off before an answer: its last number scored 1"

``--run``: a single-turn GRPO run (trained here first when the directory does not exist:
``train grpo --task arithmetic``, 8 steps); the README's come from the ``rg:number_sequence`` run of
"Learning on the embedded model". ``--episodes``: a multi-turn run (optional). The script
labels the best- and the worst-rewarded completions of a group the way a reviewer would (clicks), then saves
``review-overview.png`` (status, doctor, plots), ``review-group.png`` (a group with rewards and
advantages, labels) and ``review-episode.png`` (a multi-turn episode as a conversation).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import browser  # noqa: E402


def train(run: Path) -> None:
    subprocess.run([sys.executable, "-m", "posttrain", "train", "grpo", "--task", "arithmetic", "--reward",
                    "math,format:0.2", "--group-size", "6", "--prompts-per-step", "4", "--max-new-tokens", "64",
                    "--samples-per-step", "4", "--max-steps", "8", "--eval-every", "4", "--eval-size", "40",
                    "--output-dir", str(run.parent), "--name", run.name], check=True)


def shoot(run: Path, out: Path, best: tuple[str, str]) -> None:
    from selenium.webdriver.common.by import By

    with browser.review_server(run) as url, browser.chromium(1400, 1100) as d:
        d.get(url)
        browser.wait_for(lambda: "step" in d.find_element(By.ID, "status").text, what="the page")
        browser.wait_for(lambda: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                     for i in d.find_elements(By.CSS_SELECTOR, "#plots img")), what="the plots")
        time.sleep(1)
        d.save_screenshot(str(out / "review-overview.png"))
        step, group_index = _varied_group(url, run.name)
        for field, value in (("step_min", step), ("step_max", step)):
            d.find_element(By.ID, f"f-{field}").send_keys(str(value))
        d.find_element(By.ID, "apply").click()
        card = browser.wait_for(lambda: d.find_element(By.CSS_SELECTOR, f'#samples .sample[data-id="{step}-{group_index}-0"]'))
        card.find_element(By.CSS_SELECTOR, ".open-group").click()
        panel = browser.wait_for(lambda: d.find_element(By.ID, "panel").is_displayed() and d.find_element(By.ID, "panel"))
        group = panel.find_elements(By.CSS_SELECTOR, ".sample")
        by_reward = sorted(group, key=lambda c: float(c.find_element(By.CSS_SELECTOR, ".reward").text.split()[1]))
        for card, label, note in ((by_reward[-1], *best), (by_reward[0], "bad", "")):
            card.find_element(By.CSS_SELECTOR, ".note").send_keys(note)
            card.find_element(By.CSS_SELECTOR, f".label-{label}").click()
            browser.wait_for(lambda c=card, lab=label: c.find_element(By.CSS_SELECTOR, ".label-state").text == f"saved: {lab}")
        browser.wait_for(lambda: "bad 1" in d.find_element(By.ID, "counts").text)
        d.execute_script("arguments[0].scrollIntoView()", panel)
        time.sleep(0.5)
        d.save_screenshot(str(out / "review-group.png"))


def _varied_group(url: str, run: str) -> tuple[int, int]:
    """(step, group) of the latest group whose completions' rewards differ most (a group worth reading)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}api/samples?run={run}&limit=200", timeout=30) as r:
        samples = json.loads(r.read())["samples"]
    groups: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        groups.setdefault((s["step"], s["group"]), []).append(s["reward"] or 0.0)
    return max(groups, key=lambda k: (max(groups[k]) - min(groups[k]), k))


def shoot_episode(run: Path, out: Path) -> None:
    from selenium.webdriver.common.by import By

    with browser.review_server(run) as url, browser.chromium(1400, 900) as d:
        d.get(url)
        cards = browser.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#samples .sample"), what="samples")
        best = max(cards, key=lambda c: float(c.find_element(By.CSS_SELECTOR, ".reward").text.split()[1]))
        d.execute_script("arguments[0].scrollIntoView()", best)
        time.sleep(0.5)
        d.save_screenshot(str(out / "review-episode.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--episodes", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--best-label", default="good", help="the label given to the group's best-rewarded completion")
    parser.add_argument("--best-note", default="", help="its note (what the reviewer saw)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.run.exists():
        train(args.run)
    shoot(args.run, args.out, (args.best_label, args.best_note))
    if args.episodes:
        shoot_episode(args.episodes, args.out)
    print(f"screenshots in {args.out}")


if __name__ == "__main__":
    main()
