"""Train: ``deepspeed [--num_gpus N] launchers/train.py --config configs/X.yaml [key.sub=value ...]``."""

import argparse
import sys

from iais_scale.config import ConfigError, load_config
from iais_scale.engine import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML under configs/")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
