"""Train: ``deepspeed [--num_gpus N] launchers/train.py --config configs/X.yaml [--resume auto] [key.sub=value ...]``
(the same as ``iais-train``; ``--help`` lists the options)."""

import sys

from iais_scale.cli import train

if __name__ == "__main__":
    sys.exit(train())
