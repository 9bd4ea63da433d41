"""Run reports: `write_report(run_dir, events)` writes ``report.html`` and its PNG plots into the run dir.

What it shows (RL_DOCTRINE.md, Training Tips: "Monitor reward vs KL"; Reward Hacking: "Human
oversight: periodic quality checks"):
- reward and KL against step on one figure (twin axes); for DPO, the implicit rewards (chosen,
  rejected, margin) and the preference accuracy;
- completion length and the share of completions cut at max_new_tokens; entropy; clip fraction;
  the rollout mismatch (sampler vs trainer KL and the share masked, when a correction is on);
  each reward function's mean; loss and gradient norm; held-out evaluations (evals.jsonl);
- the doctor's events as dashed lines on every plot's timeline and as a table with symptom, cause
  and fix. The report does not run the doctor: the caller passes the events (`Doctor.finish`, the
  ones it logged; `posttrain report`, `posttrain.doctrine.doctor.run_events`: doctor.jsonl, else a
  fresh diagnosis), and without them it shows the run's doctor.jsonl, if any;
- a few sample completions from early and late in training, with their rewards (HTML-escaped).

Every plot is drawn only when its metrics are present, so GRPO, PPO and DPO runs (and a run cut
short) all get a report. Plotting uses matplotlib's Agg canvas directly: no pyplot, no global
backend change, no display needed.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from posttrain.runtime.tracking import read_jsonl

SEVERITY_COLORS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
_SKIP_PARTS = ("reward/mean", "reward/std", "reward/none")


def _values(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, h in enumerate(history):
        v = h.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(h.get("step", i + 1)))
            ys.append(float(v))
    return xs, ys


def _has(history: Sequence[dict], *keys: str) -> bool:
    return any(len(_values(history, k)[0]) > 0 for k in keys)


def _smooth(ys: list[float], k: int) -> list[float]:
    out = []
    for i in range(len(ys)):
        window = ys[max(0, i - k + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


def _figure(width: float = 8.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _line(ax, history, key, color, label=None, smooth=True):
    xs, ys = _values(history, key)
    if not xs:
        return None
    k = max(1, len(ys) // 20) if smooth else 1
    if k > 1:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
        return ax.plot(xs, _smooth(ys, k), color=color, linewidth=2, label=label or key)[0]
    return ax.plot(xs, ys, color=color, linewidth=2, marker="o" if len(xs) < 30 else None, markersize=3,
                   label=label or key)[0]


def _mark_events(ax, events: Sequence[dict]) -> None:
    for ev in events:
        ax.axvline(ev["step"], color=SEVERITY_COLORS.get(ev.get("severity"), "#7f7f7f"), linestyle="--",
                   linewidth=1.2, alpha=0.8)
    if events:
        top = ax.get_ylim()[1]
        for ev in events:
            ax.text(ev["step"], top, f" {ev['rule']}", rotation=90, va="top", ha="left", fontsize=7,
                    color=SEVERITY_COLORS.get(ev.get("severity"), "#7f7f7f"))


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    return path


def _twin_plot(history, events, left: list[str], right: list[str], path: Path, title: str,
               left_label: str, right_label: str) -> Path | None:
    if not _has(history, *left, *right):
        return None
    fig = _figure()
    ax = fig.add_subplot(111)
    colors = iter(["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"])
    handles = [h for k in left if (h := _line(ax, history, k, next(colors)))]
    ax.set_xlabel("step")
    ax.set_ylabel(left_label)
    ax.grid(alpha=0.3)
    if _has(history, *right):
        ax2 = ax.twinx()
        rcolors = iter(["#d62728", "#ff7f0e", "#7f7f7f"])
        handles += [h for k in right if (h := _line(ax2, history, k, next(rcolors)))]
        ax2.set_ylabel(right_label)
    _mark_events(ax, events)
    if handles:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="best", fontsize=8)
    return _save(fig, path, title)


def _evals_plot(evals: Sequence[dict], path: Path) -> Path | None:
    key = next((k for k in ("accuracy", "reward", "agreement_rate")
                if any(isinstance(e.get(k), (int, float)) for e in evals)), None)
    if key is None:
        return None
    pts = [(e["step"], e[key]) for e in evals if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
    if not pts:
        return None
    fig = _figure(6, 3.2)
    ax = fig.add_subplot(111)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#2ca02c", linewidth=2)
    for x, y in pts:
        ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {key}")
    ax.grid(alpha=0.3)
    return _save(fig, path, f"Held-out evaluation ({key})")


def _timeline_plot(history, events, path: Path) -> Path | None:
    if not events:
        return None
    rules = sorted({e["rule"] for e in events})
    fig = _figure(8, 1.6 + 0.35 * len(rules))
    ax = fig.add_subplot(111)
    for ev in events:
        ax.scatter(ev["step"], rules.index(ev["rule"]), s=60, color=SEVERITY_COLORS.get(ev.get("severity"), "#7f7f7f"),
                   zorder=3)
    last = max([h.get("step", 0) for h in history] + [e["step"] for e in events])
    ax.set_xlim(0, max(1, last) * 1.02)
    ax.set_yticks(range(len(rules)))
    ax.set_yticklabels(rules, fontsize=8)
    ax.set_ylim(-0.6, len(rules) - 0.4)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return _save(fig, path, "Doctor events")


def render_plots(run_dir: Path, history, events, evals) -> list[tuple[str, Path]]:
    """Draw the plots that have metrics into ``run_dir``: (title, PNG path) of each (the review page
    draws them into its own directory)."""
    parts = sorted({k for h in history for k in h if k.startswith("reward/") and k not in _SKIP_PARTS
                    and not k.endswith("/none")})
    specs = [
        ("Reward and KL", _twin_plot(history, events, ["reward/mean"], ["kl"], run_dir / "reward_kl.png",
                                     "Reward vs KL (monitor both: reward up, KL bounded)", "reward", "KL")),
        ("DPO implicit rewards", _twin_plot(history, events, ["rewards/chosen", "rewards/rejected", "rewards/margin"],
                                            ["rewards/accuracy"], run_dir / "dpo_rewards.png",
                                            "DPO implicit rewards and preference accuracy", "beta * log-ratio", "accuracy")),
        ("Completion length", _twin_plot(history, events, ["len/mean"], ["len/clipped_frac"], run_dir / "length.png",
                                         "Completion length (and share cut at max_new_tokens)", "tokens", "clipped share")),
        ("Entropy", _twin_plot(history, events, ["entropy"], [], run_dir / "entropy.png", "Policy entropy",
                               "nats / token", "")),
        ("Clip fraction", _twin_plot(history, events, ["clip_frac"], [], run_dir / "clip_frac.png",
                                     "Clip fraction", "share of tokens", "")),
        ("Reward functions", _twin_plot(history, events, parts, [], run_dir / "reward_parts.png",
                                        "Each reward function's mean", "reward", "") if parts else None),
        ("Rollout mismatch", _twin_plot(history, events, ["mismatch/kl"], ["mismatch/masked_frac"],
                                        run_dir / "mismatch.png", "Sampler vs trainer log-probs (rollout mismatch)",
                                        "KL(sampler || trainer)", "masked share")),
        ("Loss and gradient norm", _twin_plot(history, events, ["loss"], ["grad_norm"], run_dir / "loss.png",
                                              "Loss and gradient norm", "loss", "grad norm")),
        ("Held-out evaluation", _evals_plot(evals, run_dir / "evals.png")),
        ("Doctor events", _timeline_plot(history, events, run_dir / "doctor_timeline.png")),
    ]
    return [(title, p) for title, p in specs if p is not None]


# -- HTML ---------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;vertical-align:top;font-size:.9em}
th{background:#f5f5f5;text-align:left}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
pre{white-space:pre-wrap;background:#f8f8f8;padding:.5em;margin:.2em 0;font-size:.85em;max-height:18em;overflow:auto}
.error{color:#d62728;font-weight:bold}.warning{color:#e67e00;font-weight:bold}.muted{color:#777}"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _summary(history, config: dict) -> str:
    last = history[-1] if history else {}
    keys = [k for k in ("reward/mean", "kl", "entropy", "len/mean", "rewards/accuracy", "rewards/margin", "loss",
                        "time/step") if k in last]
    rows = [("method", config.get("method", "?")), ("model", config.get("model", "?")),
            ("steps logged", len(history)), ("last step", last.get("step", "-"))]
    for k in ("lr", "beta", "lora", "lora_rank", "group_size", "reward", "task", "data"):
        if config.get(k) is not None:
            rows.append((k, config[k]))
    out = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows) + "</table>"
    if keys:
        first = history[0]
        out += "<table><tr><th>metric</th><th>first step</th><th>last step</th></tr>" + "".join(
            f"<tr><td>{_e(k)}</td><td>{_fmt(first.get(k, '-'))}</td><td>{_fmt(last[k])}</td></tr>" for k in keys) + "</table>"
    return out


def _events_html(events: Sequence[dict]) -> str:
    if not events:
        return "<p>No problems found by the doctor.</p>"
    rows = "".join(
        f"<tr><td>{_e(ev['step'])}</td><td class='{_e(ev.get('severity', ''))}'>{_e(ev.get('severity', ''))}</td>"
        f"<td>{_e(ev['rule'])}</td><td>{_e(ev.get('symptom', ''))}</td><td>{_e(ev.get('cause', ''))}</td>"
        f"<td>{_e(ev.get('fix', ''))}</td></tr>" for ev in events)
    return ("<table><tr><th>step</th><th>severity</th><th>rule</th><th>symptom</th><th>likely cause</th>"
            f"<th>fix</th></tr>{rows}</table>")


def _sample_html(rec: dict, max_completions: int, max_chars: int) -> str:
    rewards = rec.get("rewards") or []
    comps = rec.get("completions")
    if comps is None:  # DPO-style or single completion records
        comps = [rec.get(k) for k in ("completion", "chosen", "rejected") if rec.get(k) is not None]
    items = []
    for i, c in enumerate(comps[:max_completions]):
        text = c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)
        cut = text[:max_chars] + (" [...]" if len(text) > max_chars else "")
        r = rewards[i] if i < len(rewards) else None
        items.append(f"<div class='muted'>completion {i + 1}, reward {_fmt(r)}</div><pre>{_e(cut)}</pre>")
    prompt = rec.get("prompt", "")
    prompt = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return (f"<h3>step {_e(rec.get('step', '?'))}</h3><div class='muted'>prompt</div><pre>{_e(prompt[:max_chars])}</pre>"
            + "".join(items))


def _samples_html(samples: Sequence[dict], n: int = 2, max_completions: int = 3, max_chars: int = 1200) -> str:
    if not samples:
        return "<p>No samples logged.</p>"
    samples = sorted(samples, key=lambda s: s.get("step", 0))
    early, late = samples[:n], samples[-n:] if len(samples) > n else []
    out = "<h3 class='muted'>early</h3>" + "".join(_sample_html(s, max_completions, max_chars) for s in early)
    if late:
        out += "<h3 class='muted'>late</h3>" + "".join(_sample_html(s, max_completions, max_chars) for s in late)
    return out


def _evals_html(evals: Sequence[dict]) -> str:
    if not evals:
        return ""
    keys = [k for k in ("accuracy", "reward", "agreement_rate", "n", "none") if any(k in e for e in evals)]
    rows = "".join("<tr><td>" + _e(e.get("step", "")) + "</td>" + "".join(f"<td>{_fmt(e.get(k, '-'))}</td>" for k in keys)
                   + "</tr>" for e in evals)
    table = "<table><tr><th>step</th>" + "".join(f"<th>{_e(k)}</th>" for k in keys) + f"</tr>{rows}</table>"
    ex = evals[-1].get("examples") or []
    for item in ex[:2]:
        table += (f"<div class='muted'>last evaluation, reward {_fmt(item.get('reward'))}</div>"
                  f"<pre>{_e(item.get('prompt', ''))}\n---\n{_e(item.get('completion', ''))}</pre>")
    return table


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError:  # the report shows what it can; the config is only its header
        return {}
    return data if isinstance(data, dict) else {}


def write_report(run_dir: str | Path, events: Sequence[Any] | None = None) -> Path:
    """Write ``<run_dir>/report.html`` and its PNGs; return the HTML path. ``events`` (doctor
    events or their dicts) default to those of ``doctor.jsonl`` (none when it is missing); for a
    fresh diagnosis of a run the doctor did not watch, pass `posttrain.doctrine.doctor.run_events`."""
    run_dir = Path(run_dir)
    history = read_jsonl(run_dir / "metrics.jsonl")
    samples = read_jsonl(run_dir / "samples.jsonl")
    evals = read_jsonl(run_dir / "evals.jsonl")
    if events is None:
        events = read_jsonl(run_dir / "doctor.jsonl")
    events = [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in events]
    events = [e for e in events if "step" in e and "rule" in e]
    config = _config(run_dir)
    plots = render_plots(run_dir, history, events, evals) if history or evals else []
    figures = "".join(f"<h3>{_e(t)}</h3><img src='{_e(p.name)}' alt='{_e(t)}'>" for t, p in plots)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{_e(run_dir.name)}: posttrain report</title>
<style>{_CSS}</style></head><body>
<h1>{_e(run_dir.name)}</h1>
<p class="muted">posttrain report, written {datetime.now().strftime('%Y-%m-%d %H:%M')}</p>
<h2>Summary</h2>{_summary(history, config) if history else '<p>No metrics logged.</p>'}
<h2>Doctor</h2>{_events_html(events)}
<h2>Plots</h2>{figures or '<p>No metrics to plot.</p>'}
{'<h2>Evaluations</h2>' + _evals_html(evals) if evals else ''}
<h2>Samples</h2>{_samples_html(samples)}
</body></html>
"""
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out)
    return out
