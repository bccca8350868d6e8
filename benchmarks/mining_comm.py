"""Bytes each rank receives per step for ITC mining across ranks: the all-gather of every rank's
inputs (``objectives.gather_pool``, the reference) vs fetching only the rows the groups need
(``objectives.fetch_rows``: one all-to-all exchange).

Both run ``objectives.training_loss`` on 2, 4 and 8 gloo CPU ranks (a tiny model) with synthetic
micro-batches; the bytes are COUNTED by ``objectives.COMM`` from the tensors the collectives filled
(this rank's own part left out). Micro-batches: ``--pairs`` pairs per rank, texts of up to 40 tokens
(each rank pads to its own longest), 36 regions of ``--feature-dim`` features (float16 numbers held
as float32, as the collator holds stored half-precision features) or ``--pixels``-sized images made
by the collator's normalisation. The ITC embeddings are random (an untrained model's would make
every anchor pick the same few rows, which the fetch would move once). Both group kinds are measured (step 0: text-anchored groups, which
fetch images; step 1: image-anchored groups, which fetch texts) and averaged per step, as
``group_kinds: alternate`` trains them.

CPU shapes are small, so every row's bytes are printed per key and scaled linearly by row size to
36 x 2048 region features and 384 x 384 pixels (and ``--itc-dim-at-scale`` embeddings); the
extrapolation to 64 and 512 ranks uses the counted per-row bytes and the rows each exchange moves:
(world - 1) x pairs for the all-gather, at most anchors x candidates (the fetched rows are unique and
never this rank's own, so also at most (world - 1) x pairs) for the fetch. About 45 s on 2 cores.

    python benchmarks/mining_comm.py [--worlds 2 4 8] [--pairs 64] [--feature-dim 64] [--pixels 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iais_scale import objectives as ob
from iais_scale.config import ObjectiveConfig
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import PixelFields
from iais_scale.data.transforms import ImageTransform
from iais_scale.model import CrossModalConfig, CrossModalModel

MAX_TEXT, REGIONS, AT_SCALE_FEATURES, AT_SCALE_PIXELS = 40, 36, 2048, 384


def cases(args) -> dict[str, tuple[str, ObjectiveConfig]]:
    """(image input, objectives): the recipe's shortlist (configs/flickr30k_uniter_base_iais_itc_mining:
    8 anchors, 63 ITC candidates re-scored, 31 kept) and plain ITC top-k."""
    common = dict(mining="itc", mlm_weight=0.0, itc_weight=1.0, anchors_per_batch=args.anchors,
                  group_kinds="alternate", itm_rank_loss="hinge")
    top = dict(num_candidates=args.top, num_hard=args.top)
    return {
        f"regions, ITC top-{args.top}": ("regions", ObjectiveConfig(**top, **common)),
        f"regions, ITC {args.shortlist} -> {args.hard}": (
            "regions", ObjectiveConfig(num_candidates=args.shortlist, num_hard=args.hard, **common)),
        f"pixels, ITC top-{args.top}": ("patches", ObjectiveConfig(**top, **common)),
    }


def make_batch(args, image_input: str, rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    b = args.pairs
    length = MAX_TEXT - rank % 7  # ranks pad their texts to different lengths
    tokens = torch.randint(8, length + 1, (b,), generator=g)  # [CLS] words [SEP]
    tokens[0] = length
    ids = torch.randint(5, 1000, (b, length), generator=g)
    ids[:, 0] = 1
    ids[torch.arange(b), tokens - 1] = 2
    attention = torch.arange(length)[None, :] < tokens[:, None]
    batch = {"text_ids": ids.masked_fill(~attention, 0), "text_attention": attention}
    if image_input == "regions":
        batch["region_features"] = torch.randn(b, REGIONS, args.feature_dim, generator=g).half().float()
        batch["region_geometry"] = torch.rand(b, REGIONS, 7, generator=g)
        batch["region_attention"] = torch.ones(b, REGIONS, dtype=torch.bool)
    else:
        collator = Collator(None, MAX_TEXT, PixelFields(ImageTransform(args.pixels)))
        pixels = torch.randint(0, 256, (b, args.pixels, args.pixels, 3), generator=g, dtype=torch.uint8)
        batch["pixel_values"] = collator.images([_Pixels(np.asarray(p)) for p in pixels])["pixel_values"]
    return batch


class _Pixels:  # what PixelFields.collate reads of a drawn sample
    def __init__(self, pixels):
        self.pixels = pixels


def make_model(args, image_input: str) -> CrossModalModel:
    torch.manual_seed(0)
    return CrossModalModel(CrossModalConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=args.feature_dim, image_input=image_input, image_size=args.pixels, patch_size=16,
        iais_layers=[-1], itc_dim=args.itc_dim, cls_token_id=1, sep_token_id=2, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def _worker(rank: int, world: int, init: str, args, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res = {}
        for name, (image_input, cfg) in cases(args).items():
            model, batch = make_model(args, image_input), make_batch(args, image_input, rank)
            # An untrained model embeds every pair alike, so every anchor would shortlist the same
            # few "hub" rows and the fetch would move very few. Random embeddings rank the pool
            # with hardly any shared candidates: the fewest duplicates, the most bytes fetched.
            emb = torch.nn.functional.normalize(torch.randn(2, args.pairs, args.itc_dim,
                                                            generator=torch.Generator().manual_seed(rank)), dim=-1)
            model.itc_embeddings = lambda _batch, emb=emb: (emb[0], emb[1])
            for exchange in ("all_gather", "fetch"):
                for step in (0, 1):  # text-anchored groups (fetch images), image-anchored (fetch texts)
                    ob.COMM.clear()
                    with torch.no_grad():
                        ob.training_loss(model, batch, cfg, step=step, total_steps=10, mask_id=3,
                                         generator=torch.Generator().manual_seed(0), group=dist.group.WORLD,
                                         pool_exchange=exchange)
                    res[name, exchange, step] = dict(ob.COMM)
        out[rank] = res
    finally:
        dist.destroy_process_group()


def measure(args, world: int) -> dict:
    out = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, f"file://{Path(tmp) / 'rendezvous'}", args, out), nprocs=world, join=True)
    return dict(out)


def inputs_bytes(c: dict, exchange: str) -> int:
    prefix = "all_gather." if exchange == "all_gather" else "fetch."
    skip = ("all_gather.rows", "fetch.text_rows", "fetch.image_rows") + tuple(k for k in c if k.startswith("fetch.bytes."))
    return sum(v for k, v in c.items() if k.startswith(prefix) and k not in skip)


def per_step(res: dict, name: str, exchange: str, fn) -> tuple[float, float]:
    """(mean, max) over the ranks of ``fn(counts)`` per step: the mean of the two group kinds' steps."""
    vals = [sum(fn(res[r][name, exchange, s]) for s in (0, 1)) / 2 for r in range(len(res))]
    return sum(vals) / len(vals), max(vals)


def mb(n: float) -> str:
    return f"{n / 1e6:10.2f} MB" if n >= 1e5 else f"{n / 1e3:10.1f} KB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--pairs", type=int, default=64, help="pairs per rank and micro-batch")
    ap.add_argument("--anchors", type=int, default=8)
    ap.add_argument("--top", type=int, default=7, help="plain ITC: candidates = negatives")
    ap.add_argument("--shortlist", type=int, default=63)
    ap.add_argument("--hard", type=int, default=31)
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--pixels", type=int, default=32, help="image side on CPU (patch 16)")
    ap.add_argument("--itc-dim", type=int, default=16)
    ap.add_argument("--itc-dim-at-scale", type=int, default=256)
    args = ap.parse_args()

    runs = {w: measure(args, w) for w in args.worlds}
    print(f"Bytes received per rank per step (counted; mean over ranks [max]), {args.pairs} pairs/rank, "
          f"{args.anchors} anchors/rank, texts <= {MAX_TEXT} tokens, {REGIONS} regions x {args.feature_dim} features,"
          f" pixels {args.pixels}x{args.pixels}, ITC dim {args.itc_dim}; each step = mean of a text- and an"
          f" image-anchored step:\n")
    print(f"{'case':26s} {'world':>5s} {'all-gather inputs':>26s} {'fetch inputs':>26s} {'fetched rows':>13s}"
          f" {'<= bound':>9s} {'mining emb. ref':>15s} {'new':>9s} {'ITC loss emb.':>14s}")
    per_row: dict[str, dict] = {}
    rows_seen: dict[str, dict[int, float]] = {}
    for name, (_, cfg) in cases(args).items():
        for w, res in runs.items():
            ranks = range(w)
            ref, ref_max = per_step(res, name, "all_gather", lambda c: inputs_bytes(c, "all_gather"))
            new, new_max = per_step(res, name, "fetch", lambda c: inputs_bytes(c, "fetch"))
            rows, _ = per_step(res, name, "fetch", lambda c: c.get("fetch.text_rows", 0) + c.get("fetch.image_rows", 0))
            emb_ref, _ = per_step(res, name, "all_gather", lambda c: c.get("mining.embeddings", 0))
            emb_new, _ = per_step(res, name, "fetch", lambda c: c.get("mining.embeddings", 0))
            itc, _ = per_step(res, name, "fetch", lambda c: c.get("itc_loss.embeddings", 0))
            bound = min(cfg.anchors_per_batch * cfg.num_candidates, (w - 1) * args.pairs)
            rows_seen.setdefault(name, {})[w] = (  # (images fetched on text-anchored steps, texts on the others)
                sum(res[r][name, "fetch", 0].get("fetch.image_rows", 0) for r in ranks) / w,
                sum(res[r][name, "fetch", 1].get("fetch.text_rows", 0) for r in ranks) / w)
            print(f"{name:26s} {w:5d} {mb(ref)} [{mb(ref_max).strip():>10s}] {mb(new)} [{mb(new_max).strip():>10s}]"
                  f" {rows:13.1f} {bound:9d} {mb(emb_ref)} {mb(emb_new).strip():>9s} {mb(itc).strip():>14s}")
            # Bytes per row by key, from the counted bytes of the largest world.
            c_ref = [res[r][name, "all_gather", 0] for r in ranks]
            c_new = [res[r][name, "fetch", s] for r in ranks for s in (0, 1)]
            n_ref = sum(c["all_gather.rows"] for c in c_ref)
            keys = [k.split(".", 1)[1] for k in c_ref[0] if k.startswith("all_gather.") and k not in
                    ("all_gather.rows", "all_gather.lengths")]
            texts = sum(c.get("fetch.text_rows", 0) for c in c_new)
            images = sum(c.get("fetch.image_rows", 0) for c in c_new)
            per_row[name] = {
                "ref": {k: sum(c[f"all_gather.{k}"] for c in c_ref) / n_ref for k in keys},
                "new_text": sum(c.get("fetch.bytes.texts", 0) for c in c_new) / max(texts, 1),
                "new_image": {k: sum(c.get(f"fetch.bytes.{k}", 0) for c in c_new) / max(images, 1)
                              for k in keys if k not in ob.TEXT_TENSOR_KEYS},
                "header": sum(c["fetch.header"] for c in c_new) / len(c_new) / (w - 1),
            }
        print()

    print("Bytes per row (counted: bytes received / rows received), and scaled to the real row size:")
    scale = {"region_features": AT_SCALE_FEATURES / args.feature_dim, "pixel_values": (AT_SCALE_PIXELS / args.pixels) ** 2}
    at_scale: dict[str, dict] = {}
    for name, pr in per_row.items():
        ref_text = sum(v for k, v in pr["ref"].items() if k in ob.TEXT_TENSOR_KEYS)
        ref_image = {k: v for k, v in pr["ref"].items() if k not in ob.TEXT_TENSOR_KEYS}
        big_ref = {k: v * scale.get(k, 1) for k, v in ref_image.items()}
        big_new = {k: v * scale.get(k, 1) for k, v in pr["new_image"].items()}
        print(f"  {name}: all-gather text {ref_text:.0f} B + image {' + '.join(f'{k} {v:.0f}' for k, v in ref_image.items())} B"
              f"; fetch text {pr['new_text']:.0f} B, image {' + '.join(f'{k} {v:.0f}' for k, v in pr['new_image'].items())} B")
        print(f"  {'':{len(name)}s}  at scale: all-gather image {sum(big_ref.values()) / 1e3:.1f} KB/row, fetch image"
              f" {sum(big_new.values()) / 1e3:.1f} KB/row")
        at_scale[name] = {"ref_row": ref_text + sum(big_ref.values()), "text": pr["new_text"],
                          "image": sum(big_new.values()), "header": pr["header"]}

    emb_row = 4 * args.itc_dim_at_scale  # float32 embedding, bytes
    print(f"\nExtrapolated bytes received per rank per step at scale ({REGIONS} x {AT_SCALE_FEATURES} region features,"
          f" {AT_SCALE_PIXELS}x{AT_SCALE_PIXELS} pixels, ITC dim {args.itc_dim_at_scale}), {args.pairs} pairs/rank:")
    print(f"  all-gather = (world - 1) x pairs x (text + image row) [+ its mining embeddings, "
          f"2 x (world - 1) x pairs x {emb_row} B];")
    print("  fetch = rows x row + rows x 8 B ids + (world - 1) x header, rows = measured up to "
          f"{max(args.worlds)} ranks, beyond it the bound anchors x candidates (no duplicates, none own);")
    print(f"  the ITC loss's own gather (both): 2 x (world - 1) x pairs x {emb_row} B.\n")
    worlds = sorted(set(args.worlds) | {64, 512})
    print(f"{'case':26s} " + " ".join(f"{w:>21d}" for w in worlds))
    for name, (_, cfg) in cases(args).items():
        s = at_scale[name]
        measured = rows_seen[name]
        ref_line, new_line = [], []
        for w in worlds:
            ref_line.append((w - 1) * args.pairs * s["ref_row"])
            bound = min(cfg.anchors_per_batch * cfg.num_candidates, (w - 1) * args.pairs)
            images, texts = measured.get(w, (bound, bound))
            # The step mean: half the steps fetch images, half texts.
            new_line.append((images * (s["image"] + 8) + texts * (s["text"] + 8)) / 2 + (w - 1) * s["header"])
        print(f"{name:26s} " + " ".join(f"{'all-gather':>10s}{mb(v)}" for v in ref_line))
        print(f"{'':26s} " + " ".join(f"{'fetch':>10s}{mb(v)}" for v in new_line))
    print(f"{'(both) ITC loss emb.':26s} " + " ".join(
        f"{'':>10s}{mb(2 * (w - 1) * args.pairs * emb_row)}" for w in worlds))
    print(f"{'(all-gather) mining emb.':26s} " + " ".join(
        f"{'':>10s}{mb(2 * (w - 1) * args.pairs * emb_row)}" for w in worlds))


if __name__ == "__main__":
    main()
