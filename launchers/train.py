"""Train: ``deepspeed [--num_gpus N] launchers/train.py --config configs/X.yaml [--resume auto] [key.sub=value ...]``."""

import os
import sys

from iais_scale.preemption import Preemption, StopTraining

# Before the heavy imports: a stop request (Ctrl-C, SIGTERM, the launcher's death) during start-up
# is kept, and the run stops at its first agreement point instead of training on or dying unsaved.
PREEMPTION = Preemption(int(os.environ.get("RANK", "0")))
PREEMPTION.install()

import argparse  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML under configs/")
    parser.add_argument(
        "--resume",
        default=None,
        help="none | auto (newest complete checkpoint in train.output_dir) | a checkpoint folder;"
        " default: auto under SLURM (a requeued job continues), else train.resume",
    )
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options

    from iais_scale.checkpoint import CheckpointError
    from iais_scale.config import ConfigError, load_config
    from iais_scale.engine import run

    try:
        cfg = load_config(args.config, args.overrides)
        resume = args.resume or ("auto" if os.environ.get("SLURM_JOB_ID") else cfg.train.resume)
        run(cfg, resume=resume, preemption=PREEMPTION)
    except (ConfigError, CheckpointError) as e:
        print(e, file=sys.stderr)
        return 2
    except StopTraining as e:
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
