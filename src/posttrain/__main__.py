"""``python -m posttrain`` = the ``posttrain`` command (so ``torchrun -m posttrain train ...`` and
``accelerate launch -m posttrain train ...`` work)."""

from posttrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
