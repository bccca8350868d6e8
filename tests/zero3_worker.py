"""Run by tests/test_zero3.py under ``deepspeed --num_gpus 2``: ZeRO-3 checks on 2 CPU ranks.

1. ITM + IAIS gradients with activation checkpointing on and off agree (full gradients gathered
   with DeepSpeed's ``safe_get_full_grad``).
2. (argument ``xl``) the >1B model is built inside zero.Init: each rank holds half the weights and
   its memory, at its peak during the build (VmHWM) too, stays well below the full model's size.
"""

import gc
import sys

import deepspeed
import psutil
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from transformers.integrations import HfDeepSpeedConfig

from iais_scale.engine import shutdown
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest
from iais_scale.model.configuration import MODEL_SIZES

DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}


def config(size: tuple[int, int, int, int], every: int = 0) -> CrossModalConfig:
    h, layers, heads, inter = size
    return CrossModalConfig(
        vocab_size=50, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        region_feature_dim=6, cls_token_id=2, sep_token_id=3, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, iais_layers=[0, -1], gradient_checkpointing_every=every,
    )


def build(cfg: CrossModalConfig) -> CrossModalModel:
    keep = HfDeepSpeedConfig(DS)  # noqa: F841  (transformers builds inside zero.Init while it lives)
    torch.manual_seed(0)
    return CrossModalModel._from_config(cfg)


def gradients(every: int) -> list[torch.Tensor]:
    model = build(config((32, 3, 4, 64), every))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0), config=DS)
    g = torch.Generator().manual_seed(10 + dist.get_rank())
    ids = torch.randint(5, 50, (4, 8), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    batch = dict(
        text_ids=ids, text_attention=torch.ones(4, 8, dtype=torch.bool),
        region_features=torch.randn(4, 5, 6, generator=g), region_geometry=torch.rand(4, 5, 7, generator=g),
        region_attention=torch.ones(4, 5, dtype=torch.bool),
    )
    engine.train()
    out = engine(**batch, iais_request=IaisRequest(torch.tensor([0, 2]), "distributed", "both"))
    loss = engine.module.itm_logit(out).sum() + out.iais_loss.sum()
    engine.backward(loss)
    grads = [safe_get_full_grad(p).clone() for p in engine.module.parameters()]
    return grads


def peak_rss() -> int:
    """This process's peak resident size in bytes (VmHWM: the most it ever held, not what it holds now)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    deepspeed.init_distributed(dist_backend=None)
    torch.set_num_threads(1)
    if "grads" in sys.argv[1:]:  # (the launcher adds --local_rank=N)
        plain, ckpt = gradients(0), gradients(1)
        assert any(g.abs().sum() > 0 for g in plain)
        for a, b in zip(plain, ckpt):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
        print(f"rank {dist.get_rank()}: GRADS EQUAL over {len(plain)} tensors", flush=True)
    else:
        model = build(config(MODEL_SIZES["xl"]))
        total = sum(p.ds_numel for p in model.parameters())
        local = sum(p.ds_tensor.numel() for p in model.parameters())
        gc.collect()
        rss = psutil.Process().memory_info().rss
        peak = peak_rss()  # the high-water mark: a full copy that existed for a moment shows here
        full_bytes = total * 4
        assert total > 1e9, total
        assert abs(local - total / 2) < 0.01 * total, (local, total)
        assert rss < 0.75 * full_bytes, (rss, full_bytes)
        assert peak < 0.8 * full_bytes, (peak, full_bytes)
        print(f"rank {dist.get_rank()}: XL {total / 1e9:.3f}B parameters, {local / 1e9:.3f}B here, "
              f"RSS {rss / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB < full {full_bytes / 2**30:.2f} GiB", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
