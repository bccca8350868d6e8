"""Train-step cost of the cross-modal model, measured in one run.

CPU (``--device cpu``, the default):
  (a) base model (12 x 768), IAIS off, vs a bare ``transformers.BertModel`` of the same shape and
      token count: step-time ratio (target <= 1.10);
  (b) IAIS on (last layer, the matched quarter of the rows, as in training groups) vs off (<= 1.05);
  (c) activation memory with per-layer checkpointing vs without, 12 layers (target >= 2x lower),
      measured as the bytes autograd keeps for backward (saved-tensor hooks).
GPU (``--device cuda``), or ``--sweep`` on any device: for each size (base 12 x 768, large
  24 x 1024) in bf16 with SDPA, the micro-batch is sized to fill memory (doubling from ``--start-pairs``
  while the predicted peak stays under ``--mem-fraction`` of the GPU's memory, at most
  ``--max-pairs``), then forward + backward is timed with IAIS off/on and activation checkpointing
  off/on: samples/s, tokens/s, peak memory, model FLOPs utilisation (MFU) against the device's dense
  bf16 peak (H200/H100 SXM: 989 TFLOP/s by the datasheet), and a bare ``BertModel`` of the same
  shape and token count (framework-step ratio). Model FLOPs: 6 x (weight-matrix parameters x the
  tokens they apply to) + 12 x layers x hidden x sequence x tokens (attention), recomputation under
  checkpointing not counted. Targets: MFU >= 40% (large), IAIS overhead <= 1.05x, framework step
  <= 1.10x. Each row is also printed as ``RESULT {json}`` for benchmarks/gpu_suite.py.
``--backbone`` (any device): the raw-image path (``model.image_input: backbone``). A ViT vision tower
  (``--backbone-size``: tiny = ViT-Ti/16, small = ViT-S/16, base = ViT-B/16, all at 224 px, random
  weights saved to a temporary folder and loaded as a pretrained one) feeds the encoder
  (``--encoder-size``) its 14 x 14 grid (pooled to ``--max-tokens``): train-step time (forward +
  backward, ITM + IAIS on a quarter of the rows) with the backbone frozen, its last 2 blocks trainable
  and all of it trainable; then the throughput (images/s) of ``python -m data_tools features
  --backbone`` (JPEG decode, transform, frozen forward, shard writing) over ``--extract-images``
  synthetic 320 x 240 JPEGs.

    python benchmarks/model_step.py [--pairs 8] [--repeats 5] [--threads 2] [--size base]
    python benchmarks/model_step.py --device cuda [--sizes base,large] [--max-pairs 4096]
    python benchmarks/model_step.py --sweep --sizes tiny --max-pairs 8 --repeats 2   # the sweep on the CPU
    python benchmarks/model_step.py --backbone [--backbone-size tiny] [--encoder-size tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest
from iais_scale.model.configuration import MODEL_SIZES

TEXT, REGIONS, FEAT = 40, 36, 2048


def cross_modal(size: str, **kw) -> CrossModalModel:
    h, layers, heads, inter = MODEL_SIZES[size]
    cfg = CrossModalConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, region_feature_dim=FEAT, **kw)
    return CrossModalModel(cfg)


def inputs(pairs: int, device: str, dtype: torch.dtype = torch.float32) -> dict:
    ids = torch.randint(1000, 30000, (pairs, TEXT), device=device)
    ids[:, 0], ids[:, -1] = 101, 102
    return dict(
        text_ids=ids, text_attention=torch.ones(pairs, TEXT, dtype=torch.bool, device=device),
        region_features=torch.randn(pairs, REGIONS, FEAT, device=device, dtype=dtype),
        region_geometry=torch.rand(pairs, REGIONS, 7, device=device, dtype=dtype),
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
    ours = cross_modal(args.size, attn_implementation="sdpa").train()
    h, layers, heads, inter = MODEL_SIZES[args.size]
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=inter, attn_implementation="sdpa")).train()
    ids = torch.randint(1000, 30000, (args.pairs, TEXT + REGIONS))
    t_bert = timed(bert_step(bert, ids), args.repeats, "cpu")
    t_off = timed(ours_step(ours, batch, False), args.repeats, "cpu")
    t_on = timed(ours_step(ours, batch, True), args.repeats, "cpu")
    tokens = args.pairs * (TEXT + REGIONS)
    print(f"CPU, {torch.get_num_threads()} threads, {args.size} ({layers} x {h}), {args.pairs} pairs x {TEXT + REGIONS} tokens"
          f" = {tokens} tokens per step, median of {args.repeats}")
    print(f"  bare BertModel          {t_bert * 1000:8.0f} ms")
    print(f"  ours, IAIS off          {t_off * 1000:8.0f} ms   (a) ratio {t_off / t_bert:.3f}  (target <= 1.10)")
    print(f"  ours, IAIS on           {t_on * 1000:8.0f} ms   (b) ratio {t_on / t_off:.3f}  (target <= 1.05)")

    plain = saved_bytes(ours_step(ours, batch, True))
    ckpt_model = cross_modal(args.size, attn_implementation="sdpa", gradient_checkpointing_every=1).train()
    ckpt_model.load_state_dict(ours.state_dict())
    ckpt = saved_bytes(ours_step(ckpt_model, batch, True))
    print(f"  activations kept for backward: {plain / 2**20:.0f} MiB without checkpointing, "
          f"{ckpt / 2**20:.0f} MiB with   (c) {plain / ckpt:.1f}x lower  (target >= 2x)")


# Dense bf16 peaks by the vendors' datasheets (no sparsity), matched against the device name in order.
PEAK_BF16 = (("H200 NVL", 835e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def peak_bf16(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in name), None)


def step_flops(model: torch.nn.Module, pairs: int, bert: bool = False) -> float:
    """Model FLOPs of one forward + backward over ``pairs`` sequences of TEXT + REGIONS tokens:
    6 x each weight matrix's parameters x the tokens it applies to, plus attention's 12 L h S per
    token. Embedding tables and unused heads (MLM, MRFR, ITC) do not count."""
    seq = TEXT + REGIONS
    cfg = model.config
    per_pair = 0
    layers = model.encoder.layer if bert else model.layers
    per_pair += seq * sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    per_pair += sum(p.numel() for p in model.pooler.parameters() if p.dim() >= 2)  # one token
    if not bert:
        per_pair += sum(p.numel() for p in model.itm.parameters() if p.dim() >= 2)
        emb = model.region_embeddings
        per_pair += REGIONS * (emb.feature_linear.weight.numel() + emb.box_linear.weight.numel())
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq * seq
    return pairs * (6 * per_pair + attention)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(step, device: str) -> int | None:
    """Peak allocated bytes during one step (CUDA only)."""
    if device != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def fill_pairs(model: CrossModalModel, device: str, dtype: torch.dtype, args) -> tuple[int, list]:
    """The micro-batch (pairs) that fills memory: doubling from ``start_pairs`` while the next
    doubling's predicted peak (static memory + twice the activations) stays under ``mem_fraction``
    of the device memory, at most ``max_pairs``. Without a memory limit to read (CPU): ``max_pairs``."""
    total = torch.cuda.mem_get_info()[1] if device == "cuda" else None
    pairs, best, probes = args.start_pairs, None, []
    while pairs <= args.max_pairs:
        batch = inputs(pairs, device, dtype)
        model.zero_grad(set_to_none=True)
        _free(device)
        static = torch.cuda.memory_allocated() if device == "cuda" else 0
        try:
            peak = peak_memory(ours_step(model, batch, True), device)
            if device != "cuda":
                ours_step(model, batch, True)()
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            probes.append({"pairs": pairs, "peak_gib": "OOM"})
            del batch
            model.zero_grad(set_to_none=True)
            _free(device)
            break
        del batch
        probes.append({"pairs": pairs, "peak_gib": None if peak is None else round(peak / 2**30, 2)})
        best = pairs
        if total is not None and 2 * peak - static > args.mem_fraction * total:
            break
        pairs *= 2
    model.zero_grad(set_to_none=True)
    _free(device)
    if best is None:
        raise RuntimeError(f"not even {args.start_pairs} pairs fit: {probes}")
    return best, probes


def emit(row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)


def sweep(args) -> None:
    """The GPU measurements (on the CPU only with ``--sweep``, as a dry run of the same code)."""
    device = args.device
    dtype = getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_bf16(name) if device == "cuda" and dtype == torch.bfloat16 else None
    peak_note = (f"{peak / 1e12:.0f} TFLOP/s dense bf16 ({name}, datasheet)" if peak
                 else "none: MFU not computed (no known dense bf16 peak for this device)")
    emit({"kind": "device", "device": device, "device_name": name, "dtype": args.dtype, "peak_flops": peak,
          "peak_note": peak_note, "torch": torch.__version__, "seq": TEXT + REGIONS})
    print(f"{name}, {args.dtype}, SDPA, {TEXT}+{REGIONS} tokens per pair; MFU against {peak_note}", flush=True)
    for size in args.sizes.split(","):
        h, layers, heads, inter = MODEL_SIZES[size]
        torch.manual_seed(0)
        with torch.device(device):
            model = cross_modal(size, attn_implementation="sdpa").to(dtype).train()
            bert = BertModel(BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers,
                                        num_attention_heads=heads, intermediate_size=inter,
                                        attn_implementation="sdpa")).to(dtype).train()
        for every in (0, 1):
            model.config.gradient_checkpointing_every = every
            pairs, probes = fill_pairs(model, device, dtype, args)
            emit({"kind": "fill", "size": size, "checkpointing": bool(every), "pairs": pairs, "probes": probes})
            batch = inputs(pairs, device, dtype)
            tokens = pairs * (TEXT + REGIONS)
            runs = [("ours", iais, ours_step(model, batch, iais)) for iais in (False, True)]
            if every == 0:
                ids = torch.randint(1000, 30000, (pairs, TEXT + REGIONS), device=device)
                runs.insert(0, ("bert", False, bert_step(bert, ids)))
            for kind, iais, step in runs:
                t = timed(step, args.repeats, device)
                mem = peak_memory(step, device)
                flops = step_flops(bert if kind == "bert" else model, pairs, bert=kind == "bert")
                row = {"kind": "step", "size": size, "model": kind, "iais": iais, "checkpointing": bool(every),
                       "pairs": pairs, "tokens": tokens, "step_s": t, "samples_per_s": pairs / t,
                       "tokens_per_s": tokens / t, "peak_gib": None if mem is None else mem / 2**30,
                       "model_tflops": flops / 1e12, "mfu": flops / t / peak if peak else None}
                emit(row)
                mfu = f"{row['mfu']:.1%}" if peak else "n/a"
                mem_s = f"{row['peak_gib']:.1f} GiB" if mem is not None else "n/a"
                print(f"  {size:5s} {kind:4s} IAIS {'on ' if iais else 'off'} ckpt {'on ' if every else 'off'}"
                      f" {pairs:5d} pairs: {t * 1000:8.1f} ms  {pairs / t:9.0f} samples/s  {tokens / t:11.0f} tokens/s"
                      f"  peak {mem_s}  MFU {mfu}", flush=True)
            del batch, runs
            _free(device)
        model.config.gradient_checkpointing_every = 0
        del model, bert
        _free(device)


# --------------------------------------------------------------------------- the backbone path

VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # ViT-*/16: (width, heads), 12 layers


def _vit_folder(folder, size: str):
    """A ViT-{size}/16 at 224 px with random weights and its image processor, saved like a download."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    width, heads = VIT_SIZES[size]
    cfg = ViTConfig(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads, intermediate_size=4 * width,
                    image_size=224, patch_size=16)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 224, "width": 224}, resample=3).save_pretrained(folder)
    return folder


def _jpeg_shards(folder, n: int):
    """A one-split data set of ``n`` synthetic 320 x 240 JPEGs with a caption each."""
    import io

    import numpy as np
    from PIL import Image

    from iais_scale.data.format import Manifest, ShardWriter, sample_key

    rng = np.random.default_rng(0)
    with ShardWriter(folder / "train", shard_size=256) as w:
        for i in range(n):
            x = np.linspace(0, 255, 320)[None, :, None] * rng.uniform(0.2, 1, 3)
            img = np.clip(x + rng.integers(-20, 21, (240, 320, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            meta = {"image_id": str(i), "split": "train", "width": 320, "height": 240, "captions": ["a picture"]}
            w.write(sample_key("train", i), meta, image=buf.getvalue(), image_ext="jpg")
    Manifest(splits={"train": n}, generator="benchmark").write(folder)


def backbone_section(args) -> None:
    import tempfile
    from pathlib import Path

    from iais_scale.model.backbone_source import backbone_fields, load_backbone_weights

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    h, layers, heads, inter = MODEL_SIZES[args.encoder_size]
    with tempfile.TemporaryDirectory() as tmp:
        vit = _vit_folder(Path(tmp) / "vit", args.backbone_size)
        fields = backbone_fields(f"hf:{vit}")
        pairs = args.pairs
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (pairs, TEXT), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        batch = dict(text_ids=ids.to(device), text_attention=torch.ones(pairs, TEXT, dtype=torch.bool, device=device),
                     pixel_values=torch.randint(0, 256, (pairs, 3, 224, 224), generator=g, dtype=torch.uint8).to(device))
        grid = min(196, args.max_tokens or 196)
        where = (torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads")
        print(f"{where}, {str(dtype).removeprefix('torch.')}: encoder {args.encoder_size} ({layers} x {h}) +"
              f" ViT-{args.backbone_size}/16 at 224 px ({fields['region_feature_dim']}-d, 196 cells -> {grid} tokens);"
              f" {pairs} pairs x ({TEXT} + {grid}) tokens, median of {args.repeats}")
        variants = []
        for trainable, label in ((0, "frozen"), (2, "last 2 blocks"), (-1, "all trainable")):
            cfg = CrossModalConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=inter, image_input="backbone", backbone_trainable_blocks=trainable,
                                   backbone_max_tokens=args.max_tokens or 0, **fields)
            torch.manual_seed(0)
            model = CrossModalModel(cfg)
            load_backbone_weights(model, f"hf:{vit}")
            model = model.to(device=device, dtype=dtype).train()
            variants.append((trainable, label, model, ours_step(model, batch, True)))
        # Round-robin over the variants: a shared machine's load changes hit all of them alike.
        times: dict[int, list[float]] = {t: [] for t, *_ in variants}
        for r in range(args.repeats + 1):
            for trainable, _, _, step in variants:
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                if r:  # the first round warms up
                    times[trainable].append(time.perf_counter() - t0)
        base = statistics.median(times[0])
        for trainable, label, model, _ in variants:
            t = statistics.median(times[trainable])
            n_train = sum(p.numel() for p in model.image_backbone.parameters() if p.requires_grad)
            emit({"kind": "backbone_step", "device": device, "backbone": args.backbone_size, "encoder": args.encoder_size,
                  "trainable_blocks": trainable, "pairs": pairs, "step_s": t, "samples_per_s": pairs / t,
                  "backbone_trainable_params": n_train})
            print(f"  backbone {label:14s} {t * 1000:9.0f} ms/step  {pairs / t:8.1f} pairs/s  x{t / base:.2f} vs frozen"
                  f"  ({n_train / 1e6:.1f}M backbone parameters train)", flush=True)
        del variants
        _free(device)

        from data_tools.features import extract_backbone_features

        data = Path(tmp) / "images"
        _jpeg_shards(data, args.extract_images)
        t0 = time.perf_counter()
        extract_backbone_features(str(data), str(Path(tmp) / "features"), f"hf:{vit}", max_tokens=args.max_tokens,
                                  device=device, batch_size=args.extract_batch, workers=args.threads, out=lambda *_: None)
        elapsed = time.perf_counter() - t0
        rate = args.extract_images / elapsed
        emit({"kind": "backbone_features", "device": device, "backbone": args.backbone_size,
              "images": args.extract_images, "seconds": elapsed, "images_per_s": rate})
        print(f"  data_tools features --backbone: {args.extract_images} JPEGs (320 x 240) in {elapsed:.1f} s ="
              f" {rate:.1f} images/s (batch {args.extract_batch}, {args.threads} decode threads; includes loading"
              " the backbone and writing shards)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sweep", action="store_true", help="the GPU sweep on this device (implied by --device cuda)")
    ap.add_argument("--pairs", type=int, default=8, help="CPU section: pairs per step")
    ap.add_argument("--size", default="base", help="CPU section: the model size (MODEL_SIZES; tiny for a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="base,large", help="sweep: model sizes (iais_scale.model.configuration.MODEL_SIZES)")
    ap.add_argument("--dtype", default="bfloat16", help="sweep: parameter and input dtype")
    ap.add_argument("--start-pairs", type=int, default=32, help="sweep: first micro-batch of the doubling search")
    ap.add_argument("--max-pairs", type=int, default=4096, help="sweep: cap of the doubling search")
    ap.add_argument("--mem-fraction", type=float, default=0.85, help="sweep: fill at most this share of GPU memory")
    ap.add_argument("--backbone", action="store_true", help="the raw-image path: vision backbone step and extraction")
    ap.add_argument("--backbone-size", default="tiny", choices=sorted(VIT_SIZES), help="backbone: ViT-*/16 at 224 px")
    ap.add_argument("--encoder-size", default="tiny", help="backbone: the encoder's size (MODEL_SIZES)")
    ap.add_argument("--max-tokens", type=int, default=49, help="backbone: pool the 14 x 14 grid to at most this")
    ap.add_argument("--extract-images", type=int, default=128, help="backbone: images of the extraction run")
    ap.add_argument("--extract-batch", type=int, default=32, help="backbone: extraction batch size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.backbone:
        backbone_section(args)
    elif args.device == "cuda" or args.sweep:
        sweep(args)
    else:
        cpu_section(args)


if __name__ == "__main__":
    main()
