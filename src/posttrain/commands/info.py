"""`posttrain info`: versions, device, and where the embedded model and its cached copy are."""

from __future__ import annotations

import argparse

HELP = "Print versions, the device, and where the embedded model and its cached copy are."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def collect() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    from posttrain import __version__, models

    info = {"posttrain": __version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    info["device"] = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    info["threads"] = str(torch.get_num_threads())
    try:
        info["embedded model"] = f"{models.EMBEDDED}: {models.embedded_gguf_path()}"
    except models.ModelError as e:
        info["embedded model"] = f"missing ({e})"
    cache = models.embedded_cache_dir()
    info["cached copy"] = f"{cache}" + ("" if (cache / "config.json").is_file() else " (not created yet: made on first use)")
    info["POSTTRAIN_HOME"] = str(models.posttrain_home())
    return info


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in collect().items():
        table.add_row(k, v)
    Console().print(table)
    return 0
