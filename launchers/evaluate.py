"""Evaluate a checkpoint: ``[deepspeed --num_gpus N | torchrun | python] launchers/evaluate.py --checkpoint PATH
--data DIR [...]`` (the same as ``iais-evaluate``; ``--help`` lists the options)."""

import sys

from iais_scale.cli import evaluate as main

if __name__ == "__main__":
    sys.exit(main())
