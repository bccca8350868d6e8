"""Run by tests/test_reshard.py under ``deepspeed --num_gpus N``: the trainer's own save and load.

``save OUT overrides...``: train 2 steps, save ``step2`` with ``Trainer.save``, dump the gathered state.
``load OUT overrides...``: ``Trainer(resume="auto")`` + ``load`` (resharding when the world size
differs), dump the gathered state. The dump (rank 0): every parameter's fp32 value, Adam's two
moments (gathered by DeepSpeed's ``safe_get_full_*``, collective under ZeRO-3), Adam's step counts,
the engine's step and the LR schedule's position.
"""

import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from iais_scale.config import load_config
from iais_scale.data.pipeline import make_train_stream, train_loader
from iais_scale.engine import Trainer, shutdown


def gathered(t: Trainer) -> dict:
    opt = t.engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 links the moments of its parameters once, after stepping the first parameter group
        # only (the no-decay group stays unlinked): link again now that every group has stepped.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in t.engine.module.named_parameters():
        out[f"fp32/{name}"] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).clone()
    inner = t.engine.optimizer.optimizer if hasattr(t.engine.optimizer, "optimizer") else t.engine.optimizer
    out["adam_steps"] = sorted({float(s["step"]) for s in inner.state.values() if "step" in s})
    out["global_steps"] = t.engine.global_steps
    out["lr_epoch"] = t.scheduler.last_epoch
    return out


def main() -> None:
    mode, dump, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config("configs/demo.yaml", overrides)
    t = Trainer(cfg, resume="none" if mode == "save" else "auto")
    if mode == "save":
        t._stream = make_train_stream(cfg.data, t.collator, cfg.train.micro_batch_size, t.rank, t.world, 0)
        batches = iter(train_loader(t._stream, 0))
        for _ in range(2):
            t.train_step(batches)
        t.save("step2")
    else:
        assert t.resume_from is not None and t.resume_from.name == "step2", t.resume_from
        t.load(t.resume_from)
    state = gathered(t)
    if t.rank == 0:
        torch.save(state, dump)
        print("DUMPED", t.world, t.load_from.name if mode == "load" else "step2")
    shutdown()


if __name__ == "__main__":
    main()
