"""before, as the issue's user did: the embedded model served by llm-katan as an OpenAI-compatible judge
(no logprobs: scoring auto falls back to parsing)."""
import subprocess, sys, time
from posttrain.models import ensure_embedded
from posttrain.rlaif.katan import KatanServer
with KatanServer(ensure_embedded(), providers=("openai",), threads=2, ready_timeout=240) as s:
    ROWS = __import__("os").path.join(__import__("os").path.dirname(__file__), "rows.jsonl")
    open("judge_katan.yaml", "w").write(f"backend: openai\nmodel: judge\nbase_url: {s.openai_url}\ncache: false\ntimeout: 300\nconcurrency: 2\n")
    for strategy in ("score",):
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "posttrain", "label", "--judge", "judge_katan.yaml", "--data", ROWS,
                            "--out", f"pairs_katan_{strategy}.jsonl", "--strategy", strategy, "--overwrite"], capture_output=True, text=True)
        print("== katan", strategy, f"{time.time() - t0:.1f}s", p.returncode)
        print("\n".join(l for l in (p.stdout + p.stderr).splitlines() if not l.startswith("labeled")))
