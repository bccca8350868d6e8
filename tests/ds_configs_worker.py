"""Run by tests/test_train.py under ``deepspeed --num_gpus 2``: the trainer, a few steps with each
DeepSpeed file named, one after the other in this process (one launch for all of them).

    deepspeed --num_gpus 2 tests/ds_configs_worker.py OUT zero3_offload,zero2_bf16,/tmp/x.json@12 [overrides...]

A name is a file of configs/deepspeed/ or a path to a .json file; ``@N`` trains N steps instead of
train.steps. Each run writes ``OUT/{name}/`` (the file's stem) as ``launchers/train.py`` would (train_log.jsonl, checkpoints,
hf_model, eval.json). Rank 0 then prints one line per run: ``TRAINED {json}`` with the engine's
parameter dtype, ZeRO stage and optimizer class, and how many weight tensors moved (beyond rounding
of the training dtype) between the initial weights and the exported ``hf_model``.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import load_file

from iais_scale.config import load_config
from iais_scale.engine import Trainer, shutdown


def full_weights(t: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter's full value as float32 (gathered from the partitions under ZeRO-3)."""
    params = dict(t.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=t.engine.zero_optimization_stage() == 3):
        return {k: p.detach().float().clone() for k, p in params.items()}


def main() -> None:
    out, names, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    for spec in names.split(","):
        path, _, steps = spec.partition("@")
        path = path if path.endswith(".json") else f"configs/deepspeed/{path}.json"
        name = Path(path).stem
        cfg = load_config("configs/demo.yaml", [*overrides, f"train.deepspeed_config={path}",
                                                f"train.output_dir={out}/{name}", *([f"train.steps={steps}"] if steps else [])])
        t = Trainer(cfg)
        before = full_weights(t)
        t.fit()
        if t.rank == 0:
            after = load_file(Path(out) / name / "hf_model" / "model.safetensors")
            moved = sum(bool((after[k] - v).abs().max() > 5e-4) for k, v in before.items() if k in after)
            inner = getattr(t.engine.optimizer, "optimizer", t.engine.optimizer)
            print("TRAINED " + json.dumps({
                "name": name, "dtype": str(next(t.module.parameters()).dtype), "stage": t.engine.zero_optimization_stage(),
                "optimizer": type(inner).__name__, "moved": moved, "compared": sum(k in after for k in before),
            }), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
