"""Train-step cost of the cross-modal model, measured in one run.

CPU (always):
  (a) base model (12 x 768), IAIS off, vs a bare ``transformers.BertModel`` of the same shape and
      token count: step-time ratio (target <= 1.10);
  (b) IAIS on (last layer, the matched quarter of the rows, as in training groups) vs off (<= 1.05);
  (c) activation memory with per-layer checkpointing vs without, 12 layers (target >= 2x lower),
      measured as the bytes autograd keeps for backward (saved-tensor hooks), and on a GPU also as
      peak allocated memory.
GPU (when CUDA is available): bf16 base and large: samples/s, tokens/s and model FLOPs utilisation.

    python benchmarks/model_step.py [--pairs 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from iais_scale.config import MODEL_SIZES
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest

TEXT, REGIONS, FEAT = 40, 36, 2048


def cross_modal(size: str, **kw) -> CrossModalModel:
    h, layers, heads, inter = MODEL_SIZES[size]
    cfg = CrossModalConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, region_feature_dim=FEAT, **kw)
    return CrossModalModel(cfg)


def inputs(pairs: int, device: str) -> dict:
    ids = torch.randint(1000, 30000, (pairs, TEXT), device=device)
    ids[:, 0], ids[:, -1] = 101, 102
    return dict(
        text_ids=ids, text_attention=torch.ones(pairs, TEXT, dtype=torch.bool, device=device),
        region_features=torch.randn(pairs, REGIONS, FEAT, device=device),
        region_geometry=torch.rand(pairs, REGIONS, 7, device=device),
        region_attention=torch.ones(pairs, REGIONS, dtype=torch.bool, device=device),
    )


def timed(step, repeats: int, device: str) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_step(model: CrossModalModel, batch: dict, iais: bool):
    rows = torch.arange(0, batch["text_ids"].shape[0], 4, device=batch["text_ids"].device)

    def step():
        model.zero_grad(set_to_none=True)
        request = IaisRequest(rows, "singular", "L") if iais else None
        out = model(**batch, iais_request=request)
        loss = model.itm_logit(out).sum()
        if iais:
            loss = loss + out.iais_loss.sum()
        loss.backward()

    return step


def bert_step(model: BertModel, ids: torch.Tensor):
    mask = torch.ones_like(ids)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask).pooler_output.sum().backward()

    return step


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward + backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def cpu_section(args) -> None:
    torch.manual_seed(0)
    batch = inputs(args.pairs, "cpu")
    ours = cross_modal("base", attn_implementation="sdpa").train()
    h, layers, heads, inter = MODEL_SIZES["base"]
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=inter, attn_implementation="sdpa")).train()
    ids = torch.randint(1000, 30000, (args.pairs, TEXT + REGIONS))
    t_bert = timed(bert_step(bert, ids), args.repeats, "cpu")
    t_off = timed(ours_step(ours, batch, False), args.repeats, "cpu")
    t_on = timed(ours_step(ours, batch, True), args.repeats, "cpu")
    tokens = args.pairs * (TEXT + REGIONS)
    print(f"CPU, {torch.get_num_threads()} threads, base (12 x 768), {args.pairs} pairs x {TEXT + REGIONS} tokens"
          f" = {tokens} tokens per step, median of {args.repeats}")
    print(f"  bare BertModel          {t_bert * 1000:8.0f} ms")
    print(f"  ours, IAIS off          {t_off * 1000:8.0f} ms   (a) ratio {t_off / t_bert:.3f}  (target <= 1.10)")
    print(f"  ours, IAIS on           {t_on * 1000:8.0f} ms   (b) ratio {t_on / t_off:.3f}  (target <= 1.05)")

    plain = saved_bytes(ours_step(ours, batch, True))
    ckpt_model = cross_modal("base", attn_implementation="sdpa", gradient_checkpointing_every=1).train()
    ckpt_model.load_state_dict(ours.state_dict())
    ckpt = saved_bytes(ours_step(ckpt_model, batch, True))
    print(f"  activations kept for backward: {plain / 2**20:.0f} MiB without checkpointing, "
          f"{ckpt / 2**20:.0f} MiB with   (c) {plain / ckpt:.1f}x lower  (target >= 2x)")


def gpu_section(args) -> None:
    if not torch.cuda.is_available():
        print("GPU: no CUDA device here; run this script on a GPU machine for the bf16 figures")
        return
    peak_tflops = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in peak_tflops.items() if k in name), None)
    for size, pairs in (("base", 128), ("large", 64)):
        model = cross_modal(size, attn_implementation="sdpa").cuda().to(torch.bfloat16).train()
        batch = inputs(pairs, "cuda")
        batch["region_features"] = batch["region_features"].bfloat16()
        t = timed(ours_step(model, batch, True), args.repeats, "cuda")
        tokens = pairs * (TEXT + REGIONS)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        h, layers, _, _ = MODEL_SIZES[size]
        flops = 6 * params * tokens + 12 * layers * h * (TEXT + REGIONS) * tokens  # weights + attention
        mfu = f"{flops / t / peak:.1%}" if peak else "n/a (unknown peak)"
        print(f"GPU {name} bf16 {size}: {pairs / t:.0f} samples/s, {tokens / t:.0f} tokens/s, MFU {mfu}")
        for every in (0, 1):
            model.config.gradient_checkpointing_every = every
            torch.cuda.reset_peak_memory_stats()
            ours_step(model, batch, True)()
            print(f"  checkpointing every {every} layer(s): peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        model.config.gradient_checkpointing_every = 0
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
