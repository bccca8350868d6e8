"""Retrieval evaluation: all-pairs scoring sharded over ranks, recall metrics, ISD, relation swaps.

Runs without the trainer: it needs a model, a collator and the evaluation sets. Every rank scores an
equal slice of the (image, caption) pairs in inference micro-batches (equal, so ZeRO-3's collective
parameter gathers stay in step), and the score matrix is gathered on all ranks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from . import iais
from .data.collate import Collator
from .data.retrieval import RetrievalSet, SwapGroup
from .model import CrossModalModel, IaisRequest

RECALL_KS = (1, 5, 10)


# --------------------------------------------------------------------------- metrics


def retrieval_metrics(scores: Tensor, caption_image: Tensor) -> dict[str, float]:
    """Recall@k of the paper's protocol from a score matrix [n_images, n_captions].

    IR (text query): correct at k when the caption's image ranks within the top k images.
    TR (image query): correct at k when any of the image's captions ranks within the top k captions.
    Ties count against the query (a wrong candidate scoring equal ranks ahead), so a constant scorer
    gets no credit. Values are percentages; RSUM is the sum of the six.
    """
    n_img, n_txt = scores.shape
    caption_image = caption_image.long()
    if caption_image.shape != (n_txt,):
        raise ValueError(f"caption_image must have shape [{n_txt}], got {list(caption_image.shape)}")
    if n_txt and (caption_image.min() < 0 or caption_image.max() >= n_img):
        raise ValueError(f"caption_image holds ids outside [0, {n_img}): every caption needs its image")
    captions_per_image = torch.bincount(caption_image, minlength=n_img)
    if (captions_per_image == 0).any():
        missing = torch.nonzero(captions_per_image == 0).flatten()[:10].tolist()
        raise ValueError(f"images without any caption (e.g. {missing}): text retrieval is undefined for them")
    scores = scores.float()
    own = torch.zeros(n_img, n_txt, dtype=torch.bool)
    own[caption_image, torch.arange(n_txt)] = True

    # IR: for each caption, the wrong images scoring at least the right one.
    right = scores[caption_image, torch.arange(n_txt)]  # [n_txt]
    ir_rank = ((scores >= right[None, :]) & ~own).sum(0)
    # TR: for each image, the wrong captions scoring at least its best caption.
    best = scores.masked_fill(~own, -math.inf).max(1).values  # [n_img]
    tr_rank = ((scores >= best[:, None]) & ~own).sum(1)

    out = {}
    for k in RECALL_KS:
        out[f"tr_r{k}"] = 100.0 * (tr_rank < k).float().mean().item()
    for k in RECALL_KS:
        out[f"ir_r{k}"] = 100.0 * (ir_rank < k).float().mean().item()
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("tr", "ir") for k in RECALL_KS)
    return out


def winoground_scores(s: Tensor) -> dict[str, float]:
    """Text, image and group scores (%) from s[g, i, j] = score(caption i, image j) of G groups.

    Text score: each image prefers its own caption; image score: each caption prefers its own
    image; group score: both (Thrush et al., 2022).
    """
    if s.dim() != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"expected scores of shape [G, 2, 2], got {list(s.shape)}")
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {
        "text": 100.0 * text.float().mean().item(),
        "image": 100.0 * image.float().mean().item(),
        "group": 100.0 * (text & image).float().mean().item(),
    }


# --------------------------------------------------------------------------- scoring


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def score_pairs(
    model: CrossModalModel, texts: dict, images: dict, text_idx: Tensor, image_idx: Tensor, batch_size: int
) -> Tensor:
    """ITM logits of the pairs (text_idx[p], image_idx[p]), this rank's equal share, gathered."""
    rank, world = _world()
    n = text_idx.numel()
    per_rank = math.ceil(n / world)
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp_max(max(n - 1, 0))
    out = []
    for s in range(0, per_rank, batch_size):
        rows = mine[s : s + batch_size]
        t, i = text_idx[rows], image_idx[rows]
        inputs = {k: v.index_select(0, t) for k, v in texts.items()}
        inputs.update({k: v.index_select(0, i) for k, v in images.items()})
        out.append(model.itm_logit(model(**inputs)))
    local = torch.cat(out) if out else torch.empty(0)
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        local = torch.cat(gathered)
    return local[:n]


@torch.no_grad()
def relation_report(
    model: CrossModalModel, texts: dict, images: dict, alignments: list[str], batch_size: int
) -> dict:
    """ISD_L / ISD_V of the matched pairs (text i with image i) per alignment and layer, beside the
    normalised entropy of S_L, S_V, A_t2i and A_i2t: a near-zero ISD with entropies near 1 is the
    degenerate uniform-attention minimum (spec section 7), not alignment."""
    n = texts["text_ids"].shape[0]
    layers = model.config.resolved_iais_layers()
    acc: dict[str, list[Tensor]] = {}
    for s in range(0, n, batch_size):
        rows = torch.arange(s, min(s + batch_size, n))
        inputs = {k: v.index_select(0, rows) for k, v in {**texts, **images}.items()}
        out = model(**inputs, iais_request=IaisRequest(torch.arange(rows.numel()), alignment=None))
        for layer, rel in zip(layers, out.relations):
            ok = rel.pair_mask
            for a in alignments:
                for d in ("L", "V"):
                    acc.setdefault(f"layer{layer}/isd_{d}/{a}", []).append(iais.isd(rel, alignment=a, direction=d)[ok])
            for name, v in iais.attention_entropy(rel).items():
                acc.setdefault(f"layer{layer}/entropy/{name}", []).append(v[ok])
    report = {}
    for key, parts in acc.items():
        v = torch.cat(parts)
        v = v[~v.isnan()]
        report[key] = {
            "mean": v.mean().item() if v.numel() else float("nan"),
            "p10": v.quantile(0.1).item() if v.numel() else float("nan"),
            "p90": v.quantile(0.9).item() if v.numel() else float("nan"),
        }
    return report


@torch.no_grad()
def evaluate(
    model: CrossModalModel,
    collator: Collator,
    rset: RetrievalSet,
    swaps: list[SwapGroup] | None = None,
    *,
    batch_size: int = 512,
    isd_alignments: tuple[str, ...] | list[str] = ("singular", "distributed", "congruence"),
) -> dict:
    """The full report: recall metrics, ISD and entropies, relation-swap scores, throughput."""
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        texts = collator.texts(rset.captions)
        images = collator.images(rset.images)
        n_img, n_txt = len(rset.images), len(rset.captions)
        image_idx = torch.arange(n_img).repeat_interleave(n_txt)
        text_idx = torch.arange(n_txt).repeat(n_img)
        scores = score_pairs(model, texts, images, text_idx, image_idx, batch_size).view(n_img, n_txt)
        elapsed = time.perf_counter() - t0
        report: dict = {
            "images": n_img,
            "captions": n_txt,
            "pairs_scored": n_img * n_txt,
            "pairs_per_second": n_img * n_txt / elapsed,
            **retrieval_metrics(scores, rset.caption_image),
        }
        matched = {k: v for k, v in texts.items()}
        matched_images = {k: v.index_select(0, rset.caption_image) for k, v in images.items()}
        report["relations"] = relation_report(model, matched, matched_images, list(isd_alignments), batch_size)
        if swaps:
            captions = [c for g in swaps for c in g.captions]
            swap_texts = collator.texts(captions)
            swap_images = collator.images([im for g in swaps for im in g.images])
            g = torch.arange(len(swaps))
            # Pair (caption i, image j) of group g: text row 2g+i, image row 2g+j.
            ci = torch.tensor([0, 0, 1, 1]).repeat(len(swaps)) + 2 * g.repeat_interleave(4)
            ij = torch.tensor([0, 1, 0, 1]).repeat(len(swaps)) + 2 * g.repeat_interleave(4)
            s = score_pairs(model, swap_texts, swap_images, ci, ij, batch_size).view(-1, 2, 2)
            report["relation_swap"] = {"groups": len(swaps), **winoground_scores(s)}
        return report
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- reports


def markdown_table(report: dict) -> str:
    """The report as markdown: recall table, relation table, relation-swap line."""
    r = report
    lines = [
        f"Retrieval on {r['images']} images x {r['captions']} captions ({r['pairs_scored']} pairs,"
        f" {r['pairs_per_second']:.0f} pairs/s)",
        "",
        "| TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | RSUM |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(f"{r[k]:.2f}" for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")) + " |",
    ]
    rel = r.get("relations", {})
    if rel:
        lines += ["", "| relation statistic (matched pairs) | mean | p10 | p90 |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['mean']:.4f} | {v['p10']:.4f} | {v['p90']:.4f} |" for k, v in sorted(rel.items())]
        lines.append("(normalised entropy 1.0 = uniform attention: a low ISD beside it is the degenerate minimum)")
    if "relation_swap" in r:
        s = r["relation_swap"]
        lines += ["", f"Relation swap ({s['groups']} groups): text {s['text']:.1f}  image {s['image']:.1f}  group {s['group']:.1f}"]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path, step: int | None = None) -> Path:
    """Write ``eval.json`` and ``eval.md`` and append to ``eval_history.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    (out_dir / "eval.md").write_text(markdown_table(report) + "\n")
    with open(out_dir / "eval_history.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **report}) + "\n")
    return out_dir / "eval.json"
