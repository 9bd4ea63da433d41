"""Benchmark: log-probs of completion tokens, naive (full [B, T, V] logits) vs chunked.

    python bench/logprobs.py                 # B=8, T=512, V=49,152, forward + backward (~5-10 min)
    python bench/logprobs.py --e2e           # also the whole model with LoRA (slow: minutes per step)

Two sections, each variant in a fresh subprocess:

head  The part the technique changes: hidden states [B, T, 576] (from the embedded model's trunk)
      -> log-probs of the completion tokens -> a weighted sum -> backward. "naive" is
      ``lm_head(h)`` over all B*T positions + ``selective_log_softmax`` (what ``model(...).logits``
      then log_softmax + gather does); "chunked" is ``posttrain.objectives.logprobs.head_logprobs`` on the
      scored positions only. Run with the head trainable (full fine-tune: dW is needed, backward
      recomputes each chunk) and frozen (LoRA elsewhere: d/dh is formed in forward), and with half
      / all of the positions scored (prompts are about half the tokens in RL).
e2e   (with --e2e) The whole call, ``completion_logprobs`` vs ``naive_completion_logprobs``, on
      the embedded model with a LoRA r16 adapter (the doctrine's RL setup), prompt half / completion
      half. The trunk's activations (~5 GB here) are the same in both and dilute the memory ratio.

Memory: CPU allocations are not seen by tracemalloc or torch's profiler by default, so each
variant runs in its own process (glibc told to unmap freed blocks >= 128 KiB at once, so RSS follows
live memory), the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs after
setup and a warm-up step, and "peak extra" = VmHWM after the timed steps minus VmRSS before them.
(Where clear_refs is not writable, the growth of ru_maxrss is used and the output says so.)
Time: the fastest timed step over interleaved rounds, wall clock and process CPU time (the machine
may be shared: CPU time is less sensitive to other load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from peak_memory import peak_kb, reset_peak, status_kb  # bench/peak_memory.py

B, T, V, H = 8, 512, 49152, 576


# ----------------------------------------------------------------------------------- memory


def _reset_peak() -> str:
    how = reset_peak()
    return "VmHWM reset via /proc/self/clear_refs" if how == "VmHWM" else (
        "ru_maxrss growth (clear_refs not writable: setup peaks may hide smaller step peaks)")


def _peak_kb(method: str) -> int:
    return peak_kb("VmHWM" if method.startswith("VmHWM") else "ru_maxrss")


# ----------------------------------------------------------------------------------- child


def _model():
    import torch

    try:
        from posttrain.models import load_model

        model, _ = load_model("smollm2-135m-instruct")
        return model, "SmolLM2-135M-Instruct (embedded, float32)"
    except Exception as e:  # noqa: BLE001 - fall back to the same shapes, random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval(), f"random Llama with SmolLM2-135M shapes ({type(e).__name__})"


def _inputs(frac: float, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    comp = torch.zeros(B, T, dtype=torch.long)
    comp[:, T - int(round(T * frac)):] = 1
    weights = torch.randn(B, T, generator=g)
    return ids, torch.ones(B, T, dtype=torch.long), comp, weights


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from posttrain.objectives.logprobs import (completion_logprobs, head_logprobs, naive_completion_logprobs,
                                    selective_log_softmax)

    model, model_desc = _model()
    ids, am, comp, w = _inputs(spec["frac"], model.config.vocab_size)
    chunk = spec["chunk"]

    if spec["section"] == "head":
        head = model.get_output_embeddings()
        for p in model.parameters():
            p.requires_grad_(False)
        head.weight.requires_grad_(spec["head_grad"])
        path = spec.get("hidden_path")
        if path and os.path.exists(path):
            hidden = torch.load(path)
        else:
            with torch.no_grad():
                hidden = model.get_decoder()(input_ids=ids, attention_mask=am).last_hidden_state
            if path:
                torch.save(hidden, path + ".tmp")
                os.replace(path + ".tmp", path)
        del model
        target = comp.bool().clone()
        target[:, 0] = False

        def step():
            h = hidden.detach().requires_grad_(True)
            if spec["variant"] == "naive":
                logits = head(h)
                logp = selective_log_softmax(logits[:, :-1], ids[:, 1:])
                loss = (logp * w[:, 1:] * target[:, 1:]).sum()
            else:
                b, t = target.nonzero(as_tuple=True)
                logp, _ = head_logprobs(head, h[b, t - 1], ids[b, t], chunk)
                loss = (logp * w[b, t]).sum()
            loss.backward()
            head.weight.grad = None
            return float(loss)
    else:
        from posttrain.models import add_lora

        model = add_lora(model, rank=16)
        model.train()
        fn = completion_logprobs if spec["variant"] == "chunked" else naive_completion_logprobs
        kw = {"chunk_size": chunk} if spec["variant"] == "chunked" else {}

        def step():
            logp = fn(model, ids, am, comp, **kw)
            loss = (logp * w).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss)

    import gc

    step()  # warm-up: kernels, allocator, lazy init
    gc.collect()
    base_kb = status_kb("VmRSS")
    method = _reset_peak()
    times, cpu_times, losses = [], [], []
    for _ in range(spec["reps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _peak_kb(method)
    return {"extra_mb": (peak - base_kb) / 1024, "times": times, "cpu_times": cpu_times,
            "loss": losses[0], "method": method, "model": model_desc}


# ----------------------------------------------------------------------------------- parent


def run(spec: dict) -> dict:
    # A fixed mmap threshold makes glibc return every freed block >= 128 KiB to the OS at once, so
    # RSS follows live memory (by default freed medium blocks stay resident and hide later peaks).
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(results: list[dict]) -> dict:
    return {"extra_mb": max(r["extra_mb"] for r in results),
            "wall": min(t for r in results for t in r["times"]),
            "cpu": min(t for r in results for t in r["cpu_times"]),
            "loss": results[0]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=None, help="chunk size (default: the library's)")
    ap.add_argument("--reps", type=int, default=1, help="timed steps per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, interleaved (head section)")
    ap.add_argument("--e2e-rounds", type=int, default=1, help="the same for the (slow) whole-model section")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--e2e", action="store_true", help="add the (slow) whole-model section")
    ap.add_argument("--no-head", action="store_true", help="skip the output-head section")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from posttrain.objectives.logprobs import DEFAULT_CHUNK_SIZE

    chunk = args.chunk or DEFAULT_CHUNK_SIZE
    import tempfile

    tmp = tempfile.mkdtemp(prefix="posttrain-bench-")
    base = {"chunk": chunk, "reps": args.reps, "threads": args.threads,
            "hidden_path": os.path.join(tmp, "hidden.pt")}
    print(f"log-probs, naive vs chunked: B={B} T={T} V={V} H={H}, forward + backward, float32, "
          f"{args.threads} threads, chunk_size={chunk}")
    cases = [] if args.no_head else [("head", hg, frac) for hg in (True, False) for frac in (0.5, 1.0)]
    if args.e2e:
        cases.append(("e2e", False, 0.5))
    rows, method, model_desc = [], "", ""
    for section, head_grad, frac in cases:
        res = {"naive": [], "chunked": []}
        rounds = args.rounds if section == "head" else args.e2e_rounds
        for _ in range(rounds):  # interleaved, so load from other processes hits both alike
            for variant in ("naive", "chunked"):
                r = run(dict(base, section=section, variant=variant, head_grad=head_grad, frac=frac))
                res[variant].append(r)
                method, model_desc = r["method"], r["model"]
        n, c = (_summary(res[v]) for v in ("naive", "chunked"))
        if section == "head":
            label = f"head, W {'trainable' if head_grad else 'frozen   '}, scored {frac:.0%}"
        else:
            label = f"e2e, LoRA r16,           scored {frac:.0%}"
        loss_rel = abs(n["loss"] - c["loss"]) / max(abs(n["loss"]), 1e-12)
        rows.append((label, n, c, loss_rel))
        print(f"  {label}: naive {n['extra_mb']:5.0f} MB {n['wall']:5.2f} s wall {n['cpu']:5.2f} s cpu"
              f" | chunked {c['extra_mb']:5.0f} MB {c['wall']:5.2f} s wall {c['cpu']:5.2f} s cpu"
              f" | ratios: memory {c['extra_mb'] / max(n['extra_mb'], 1e-9):.3f}"
              f"  time {c['wall'] / n['wall']:.3f} wall, {c['cpu'] / n['cpu']:.3f} cpu"
              f"  (loss rel. diff {loss_rel:.1e})", flush=True)
    print(f"model: {model_desc}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"memory: peak extra RSS of the timed steps over the RSS before them, each variant in a fresh "
          f"process with MALLOC_MMAP_THRESHOLD_=131072, {method} (max over rounds)")
    print(f"time: fastest step over {args.rounds} rounds (e2e: {args.e2e_rounds}) x {args.reps} steps after a "
          "warm-up, naive and chunked interleaved; 'cpu' = process CPU time, less sensitive to other load")
    print("target (issue 3): memory ratio <= 0.25, time ratio <= 1.2")


if __name__ == "__main__":
    main()
