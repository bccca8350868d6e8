"""Benchmark of top-k re-ranking against all-pairs cross-encoder scoring (ALBEF/BLIP protocol).

The model's contrastive (ITC) embeddings shortlist the top k candidates of every query; the
cross-encoder (ITM head) re-scores only those. Prints R@1 (TR and IR), RSUM, the number of
cross-encoder pairs and the time of both protocols, and of ITC alone.

    python benchmarks/rerank.py [--checkpoint runs/demo/hf_model] [--data data/demo] [--split test] [--k K]

``--checkpoint`` is a Hugging Face folder or a DeepSpeed checkpoint (as for launchers/evaluate.py) of
a model with an ITC head (``config.itc_dim > 0``); without one the benchmark reports that it is
pending and exits with status 3. The default k is the largest with at least 10x fewer cross-encoder
pairs than all pairs (``k * (images + captions) <= images * captions / 10``). Make the demo data with
``python -m data_tools demo --out data/demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from iais_scale import evaluate as ev  # noqa: E402
from iais_scale.checkpoint import load_model  # noqa: E402
from iais_scale.data.collate import Collator  # noqa: E402
from iais_scale.data.retrieval import RetrievalSet  # noqa: E402

PENDING = 3
MIN_REDUCTION = 10.0


def default_k(n_images: int, n_captions: int, reduction: float = MIN_REDUCTION) -> int:
    """The largest k whose shortlists (an upper bound on the pairs scored) are ``reduction``x fewer."""
    return int(n_images * n_captions // (reduction * (n_images + n_captions)))


@torch.no_grad()
def compare(model, collator: Collator, rset: RetrievalSet, k: int, batch_size: int) -> dict:
    """Metrics, cross-encoder pairs and seconds of all-pairs, ITC-only and ITC top-k + re-ranking."""
    model.eval()
    texts, images = collator.texts(rset.captions), collator.images(rset.images)
    n_img, n_txt = len(rset.images), len(rset.captions)
    t0 = time.perf_counter()
    image_idx = torch.arange(n_img).repeat_interleave(n_txt)
    text_idx = torch.arange(n_txt).repeat(n_img)
    scores = ev.score_pairs(model, texts, images, text_idx, image_idx, batch_size).view(n_img, n_txt)
    t1 = time.perf_counter()
    txt, img = ev.sharded_itc_embeddings(model, texts, images, batch_size)
    sim = img @ txt.T
    t2 = time.perf_counter()
    i2t, t2i, n_pairs = ev.rerank_scores(model, texts, images, sim, k, batch_size)
    t3 = time.perf_counter()
    return {
        "all_pairs": {"pairs": n_img * n_txt, "seconds": t1 - t0, **ev.retrieval_metrics(scores, rset.caption_image)},
        "itc": {"pairs": 0, "seconds": t2 - t1, **ev.retrieval_metrics(sim, rset.caption_image)},
        "rerank": {"k": k, "pairs": n_pairs, "seconds": t3 - t1, **ev.split_metrics(i2t, t2i, rset.caption_image)},
    }


def format_result(result: dict, n_img: int, n_txt: int) -> str:
    rows = [f"{n_img} images x {n_txt} captions",
            f"{'protocol':<18} {'TR R@1':>7} {'IR R@1':>7} {'RSUM':>7} {'cross-encoder pairs':>20} {'seconds':>8}"]
    for name, key in (("all pairs", "all_pairs"), ("ITC only", "itc"), (f"ITC top-{result['rerank']['k']} + ITM", "rerank")):
        r = result[key]
        rows.append(f"{name:<18} {r['tr_r1']:>7.2f} {r['ir_r1']:>7.2f} {r['rsum']:>7.2f} {r['pairs']:>20} {r['seconds']:>8.2f}")
    a, r = result["all_pairs"], result["rerank"]
    rows.append(f"re-ranking scores {a['pairs'] / max(r['pairs'], 1):.1f}x fewer cross-encoder pairs;"
                f" R@1 change TR {r['tr_r1'] - a['tr_r1']:+.2f}, IR {r['ir_r1'] - a['ir_r1']:+.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo/hf_model")
    p.add_argument("--model-dir", help="config + tokenizer of a DeepSpeed checkpoint (default: the run's model/)")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, help="shortlist size (default: the largest with >= 10x fewer pairs)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-images", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, info = load_model(args.checkpoint, args.model_dir, device=device)
    if not ev.has_itc(model):
        print(f"PENDING: {args.checkpoint} has no ITC head (config.itc_dim = {getattr(model.config, 'itc_dim', 0)});"
              " re-ranking needs a model trained with ITC (config.itc_dim > 0). Rerun with --checkpoint of one.")
        return PENDING
    data_cfg = ev.experiment_data_config(info.run_dir)
    collator = ev.model_collator(tokenizer, model.config, max_text_len=ev.text_length(None, data_cfg, tokenizer, model.config),
                                max_regions=data_cfg.get("max_regions"))
    rset = ev.build_eval_data(collator, os.path.join(args.data, args.split), max_images=args.max_images).rset
    n_img, n_txt = len(rset.images), len(rset.captions)
    k = args.k or default_k(n_img, n_txt)
    if k < 1:
        print(f"error: {n_img} images x {n_txt} captions is too small for a 10x reduction", file=sys.stderr)
        return 2
    result = compare(model, collator, rset, k, args.batch_size)
    print(f"checkpoint {args.checkpoint}, device {device}")
    print(format_result(result, n_img, n_txt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
