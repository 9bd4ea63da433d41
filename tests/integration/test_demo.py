"""`posttrain demo` (what `make demo` runs) on the real embedded model, cut to one step and a small
held-out set: it prints the accuracy before and after, the example completions and the run dir."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_command_runs_and_prints_accuracy_before_and_after(tmp_path):
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "demo", "--steps", "1", "--eval-size", "4",
                          "--output-dir", str(tmp_path), "--name", "demo"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    m = re.search(r"before (\d+\.\d)%\s+->\s+after (\d+\.\d)%", text)
    assert m, text[-2000:]
    assert 0.0 <= float(m.group(1)) <= 100.0 and 0.0 <= float(m.group(2)) <= 100.0
    assert "before:" in text and "after:" in text  # example completions side by side
    run = tmp_path / "demo"
    assert (run / "final" / "adapter_config.json").is_file() and (run / "report.html").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
