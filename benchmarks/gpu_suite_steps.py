"""Workers of benchmarks/gpu_suite.py that import torch (the suite itself imports none, so that it can
report a missing or broken torch). Each prints ``RESULT {json}`` lines as it goes, so that a step
stopped at its time cap still leaves what it measured.

    python benchmarks/gpu_suite_steps.py demo --out DIR [--tiny]
    python benchmarks/gpu_suite_steps.py mining --device cuda [--size base] [--pool 400] [--anchors 32]
    python benchmarks/gpu_suite_steps.py rerank --device cuda [--size base] [--images 1000]

``mining``: per training step, the reference's cross-encoder mining (``pool - 1`` = 399 random in-batch
candidates per anchor, the hardest ``--hard`` kept) against ITC mining (the ITC embeddings' shortlist of
``--shortlist`` = 63 that the cross-encoder re-scores, and the plain ITC top ``--hard``, nothing scored),
through ``benchmarks/mining.py``'s ``ranking_config``/``mining_seconds`` on a synthetic pool of
UNITER-shaped pairs (TEXT + REGIONS tokens of benchmarks/model_step.py). Random weights: the cost of
the mining does not depend on them.

``rerank``: evaluation throughput at the paper's 1K test shape (``--images`` 1000 x 5 captions):
all-pairs cross-encoder scoring (``iais_scale.evaluate.score_pairs``, timed on as many images as fit
into ``--allpairs-seconds``, then extrapolated to all pairs) against ITC top-k re-ranking
(``sharded_itc_embeddings`` + ``rerank_scores`` on the whole set; k from benchmarks/rerank.py's
``default_k``). Random weights: pairs/s and seconds only, no recall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402


def emit(row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)


def device_info(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"kind": "device", "device": device, "device_name": name, "torch": torch.__version__}


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")


def build_model(size: str, itc_dim: int, device: str, dtype: torch.dtype):
    from model_step import cross_modal

    torch.manual_seed(0)
    with torch.device(device):
        model = cross_modal(size, attn_implementation="sdpa", itc_dim=itc_dim)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- demo data


def cmd_demo(args) -> int:
    from iais_scale.data.demo import make_demo

    t0 = time.perf_counter()
    if args.tiny:  # the test suite's tiny set (tests/conftest.py)
        make_demo(args.out, seed=1, n_train=96, n_val=8, n_test=16, n_swap_groups=6, shard_size=32)
    else:
        make_demo(args.out)
    emit({"kind": "demo", "out": str(args.out), "seconds": time.perf_counter() - t0})
    return 0


# --------------------------------------------------------------------------- mining


def cross_on_device(model, batch: dict, cfg, anchor: str, device: str) -> tuple[float, float]:
    """The reference mining's work with its random candidates drawn onto the model's device: what
    ``objectives.hardest_negatives`` does, for when the library's own call fails on a GPU."""
    import mining

    from iais_scale import objectives as ob

    o = cfg.objectives
    b = batch["text_ids"].shape[0]
    a = o.anchors_per_batch or b
    noise = torch.rand(a, b, generator=torch.Generator().manual_seed(0))
    noise[torch.arange(a), torch.arange(a)] = -1.0
    candidates = noise.topk(o.num_candidates, dim=1).indices.to(device)
    anchors = torch.arange(a, device=device)
    return mining.timed(lambda: ob.keep_hardest(model, batch, anchors, candidates, anchor=anchor,
                                                num_hard=o.num_hard)), 0.0


def cmd_mining(args) -> int:
    import mining
    from model_step import inputs

    check_device(args.device)
    dtype = getattr(torch, args.dtype)
    emit(device_info(args.device))
    model = build_model(args.size, args.itc_dim, args.device, dtype)
    batch = inputs(args.pool, args.device, dtype)
    ns = types.SimpleNamespace(data=os.path.join(_ROOT, "data/demo"), steps=10, lr=2e-4, pool=args.pool,
                               hard=args.hard, anchors=args.anchors)
    kinds = {"cross": ("cross", args.pool - 1), f"itc+{args.shortlist}": ("itc", args.shortlist),
             "itc": ("itc", args.hard)}
    cfgs = {name: mining.ranking_config(m, c, ns) for name, (m, c) in kinds.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
    errors: dict[str, str] = {}

    def once(name: str, anchor: str) -> tuple[float, float]:
        if name in errors:
            return cross_on_device(model, batch, cfgs[name], anchor, args.device)
        try:
            return mining.mining_seconds(model, batch, cfgs[name], anchor)
        except RuntimeError as e:
            errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            if kinds[name][0] != "cross":
                raise
            print(f"{name}: the library's mining failed on {args.device} ({errors[name]}); timing the same work "
                  "with the candidates on the device instead", flush=True)
            return cross_on_device(model, batch, cfgs[name], anchor, args.device)

    with torch.no_grad():
        for name in kinds:  # warm-up (kernels, allocator)
            once(name, "text")
        for r in range(args.repeats):
            for name in kinds:
                times[name].append(once(name, "text" if r % 2 == 0 else "image"))
    cross_ms = statistics.median(t for t, _ in times["cross"]) * 1e3
    for name, (m, c) in kinds.items():
        mine_ms = statistics.median(t for t, _ in times[name]) * 1e3
        passes_ms = statistics.median(p for _, p in times[name]) * 1e3
        row = {"kind": "mining", "name": name, "mining": m, "candidates": c, "anchors": args.anchors,
               "hard": args.hard, "pool": args.pool, "size": args.size, "dtype": args.dtype,
               "cross_encoder_pairs": args.anchors * c if c > args.hard else 0,
               "mining_ms": mine_ms, "itc_passes_ms": passes_ms if m == "itc" else None,
               "speedup_vs_cross": cross_ms / mine_ms,
               "speedup_vs_cross_with_passes": cross_ms / (mine_ms + passes_ms),
               "repeats": args.repeats}
        if name in errors:
            row["library_error"] = errors[name]
            row["note"] = "timed with the candidates moved to the device (the library's call failed)"
        emit(row)
        print(f"{name:7s}: mining {mine_ms:8.1f} ms per step ({row['cross_encoder_pairs']} cross-encoder pairs), "
              f"{cross_ms / mine_ms:5.1f}x cheaper than cross" + (f"; +{passes_ms:.1f} ms unimodal passes" if m == "itc" else ""),
              flush=True)
    return 0


# --------------------------------------------------------------------------- re-ranking


def synthetic_eval_set(n_img: int, per_image: int, seed: int = 0) -> tuple[dict, dict, torch.Tensor]:
    """Collated texts and images as ``Collator.texts``/``images`` give them (CPU, padded to the
    longest): captions of 8 to TEXT - 2 words, 10 to REGIONS regions of FEAT-d features."""
    from model_step import FEAT, REGIONS, TEXT

    g = torch.Generator().manual_seed(seed)
    n_txt = n_img * per_image
    words = torch.randint(8, TEXT - 1, (n_txt,), generator=g)
    ids = torch.randint(1000, 30000, (n_txt, TEXT), generator=g)
    pos = torch.arange(TEXT)
    ids[:, 0] = 101
    ids[torch.arange(n_txt), words + 1] = 102
    text_attention = pos[None, :] <= (words + 1)[:, None]
    ids = ids.masked_fill(~text_attention, 0)
    regions = torch.randint(10, REGIONS + 1, (n_img,), generator=g)
    region_attention = torch.arange(REGIONS)[None, :] < regions[:, None]
    images = {
        "region_features": torch.randn(n_img, REGIONS, FEAT, generator=g) * region_attention[..., None],
        "region_geometry": torch.rand(n_img, REGIONS, 7, generator=g) * region_attention[..., None],
        "region_attention": region_attention,
    }
    texts = {"text_ids": ids, "text_attention": text_attention}
    return texts, images, torch.arange(n_img).repeat_interleave(per_image)


def cmd_rerank(args) -> int:
    from rerank import default_k

    from iais_scale import evaluate as ev

    check_device(args.device)
    dtype = getattr(torch, args.dtype)
    emit(device_info(args.device))
    model = build_model(args.size, args.itc_dim, args.device, dtype)
    texts, images, _ = synthetic_eval_set(args.images, args.captions_per_image)
    n_img, n_txt = args.images, args.images * args.captions_per_image
    k = args.k or default_k(n_img, n_txt)
    bs = args.batch_size
    print(f"{n_img} images x {n_txt} captions, {args.size} {args.dtype}, eval batch {bs}, k={k}", flush=True)

    def all_pairs_block(first: int, count: int) -> int:
        image_idx = torch.arange(first, first + count).repeat_interleave(n_txt)
        text_idx = torch.arange(n_txt).repeat(count)
        ev.score_pairs(model, texts, images, text_idx, image_idx, bs)
        return image_idx.numel()

    with torch.no_grad():
        ev.score_pairs(model, texts, images, torch.arange(min(bs, n_txt)), torch.zeros(min(bs, n_txt), dtype=torch.long), bs)
        block = max(1, bs // n_txt) if n_txt < bs else 1
        done_pairs, first, t0 = 0, 0, time.perf_counter()
        while first < n_img and (time.perf_counter() - t0 < args.allpairs_seconds or done_pairs == 0):
            count = min(block, n_img - first)
            done_pairs += all_pairs_block(first, count)
            first += count
        seconds = time.perf_counter() - t0
        rate = done_pairs / seconds
        full = n_img * n_txt
        emit({"kind": "all_pairs", "images": n_img, "captions": n_txt, "pairs_measured": done_pairs,
              "images_measured": first, "seconds": seconds, "pairs_per_s": rate, "pairs_full": full,
              "seconds_full": full / rate if first < n_img else seconds, "extrapolated": first < n_img,
              "batch_size": bs, "size": args.size, "dtype": args.dtype})
        print(f"all pairs: {done_pairs} pairs ({first} of {n_img} images) in {seconds:.1f} s = {rate:.0f} pairs/s; "
              f"all {full} pairs: {full / rate:.0f} s" + (" (extrapolated)" if first < n_img else ""), flush=True)

        t1 = time.perf_counter()
        txt, img = ev.sharded_itc_embeddings(model, texts, images, bs)
        sim = img @ txt.T
        t_itc = time.perf_counter() - t1
        emit({"kind": "itc", "seconds": t_itc, "passes": n_img + n_txt})
        print(f"ITC embeddings of {n_img} images + {n_txt} captions: {t_itc:.2f} s", flush=True)
        t2 = time.perf_counter()
        _, _, n_pairs = ev.rerank_scores(model, texts, images, sim, k, bs)
        t_cross = time.perf_counter() - t2
    row = {"kind": "rerank", "k": k, "pairs": n_pairs, "seconds_cross": t_cross, "pairs_per_s": n_pairs / t_cross,
           "seconds_total": t_itc + t_cross, "reduction": full / n_pairs,
           "speedup_vs_all_pairs": (full / rate) / (t_itc + t_cross)}
    emit(row)
    print(f"ITC top-{k} + cross-encoder: {n_pairs} pairs in {t_cross:.1f} s = {n_pairs / t_cross:.0f} pairs/s; "
          f"{t_itc + t_cross:.1f} s in all, {row['speedup_vs_all_pairs']:.1f}x faster than all pairs", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--out", required=True)
    d.add_argument("--tiny", action="store_true")
    for name in ("mining", "rerank"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--size", default="base")
        p.add_argument("--itc-dim", type=int, default=256)
        p.add_argument("--threads", type=int, default=None)
    m = sub.choices["mining"]
    m.add_argument("--pool", type=int, default=400, help="pairs per step (cross scores pool - 1 per anchor)")
    m.add_argument("--anchors", type=int, default=32)
    m.add_argument("--hard", type=int, default=31)
    m.add_argument("--shortlist", type=int, default=63)
    m.add_argument("--repeats", type=int, default=5)
    r = sub.choices["rerank"]
    r.add_argument("--images", type=int, default=1000)
    r.add_argument("--captions-per-image", type=int, default=5)
    r.add_argument("--k", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=1024)
    r.add_argument("--allpairs-seconds", type=float, default=15.0)
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return {"demo": cmd_demo, "mining": cmd_mining, "rerank": cmd_rerank}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
