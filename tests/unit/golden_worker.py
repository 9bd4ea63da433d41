"""Runs the single-process golden runs (tests/unit/test_golden.py) in one process with one thread.

usage: python golden_worker.py SPECS.json   (a list of {"method": ..., "config": {...}})
"""

import json
import sys

import torch

from posttrain.commands.train import resolve


def main(path: str) -> None:
    torch.set_num_threads(1)
    for spec in json.loads(open(path).read()):
        cls, train = resolve(spec["method"])
        train(cls(**spec["config"]))


if __name__ == "__main__":
    main(sys.argv[1])
