"""Retrieval evaluation without the trainer: all-pairs scoring and ITC top-k re-ranking sharded over
ranks, recall metrics, ISD/ISDa beside attention entropies, relation swaps, and the one builder of
evaluation inputs (``build_eval_data``) used by the trainer, ``launchers/evaluate.py`` and ``viz``.
The protocols are described in docs/training.md ("Evaluation").
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from . import iais
from .data import storage
from .data.collate import Collator
from .data.image_fields import ImageFields, PixelFields, RegionFields
from .data.pipeline import DEFAULT_IO, IoOptions
from .data.retrieval import RetrievalSet, SwapGroup, best_region, read_split, swap_groups
from .data.transforms import Augment, ImageTransform
from .metrics import progress
from .model import CrossModalModel, IaisRequest
from .model.image_inputs import image_input_of

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
ENTROPY_NAMES = ("S_L", "S_V", "A_t2i", "A_i2t")
# Mean normalised entropies of all four matrices above this: the attention of that layer is
# (near) uniform and its ISD is trivially low (spec section 7).
DEGENERATE_ENTROPY = 0.98
# Histogram bin edges of the per-pair statistics in the JSON report; values beyond either end are
# counted in the end bins. ISD spans decades, so its bins are logarithmic.
ENTROPY_BINS = [i / 20 for i in range(21)]
ISD_BINS = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]


# --------------------------------------------------------------------------- metrics


def retrieval_metrics(scores: Tensor, caption_image: Tensor) -> dict[str, float]:
    """Recall@k (%) of the paper's protocol from scores [n_images, n_captions]: IR hits when the
    caption's image is in its top k, TR when any of the image's captions is. Ties count against the
    query, so a constant scorer gets no credit. RSUM is the sum of the six."""
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


def authors_ir_recall(scores: Tensor, caption_image: Tensor) -> dict[str, float]:
    """IR recall as UNITER's and the IAIS authors' ``itm_eval.py`` computes it, for comparison with
    published numbers only: scores kept in fp16, each caption's top 10 images by ``topk``, then
    ``(rank < k).sum()`` over both columns of ``nonzero()`` (the caption's row index as well as the
    image's rank), which adds the hits of the first k captions once more: up to k/N too high. The
    report's own ``ir_r*`` is the correct count. Percentages; [n_images, n_captions] as above."""
    n_img, n_txt = scores.shape
    top = scores.t().half().float().topk(min(10, n_img), dim=1).indices  # [n_txt, <=10]
    hits = (top == caption_image.long()[:, None]).nonzero()  # (caption row, rank) of each hit
    return {f"ir_r{k}": 100.0 * (hits < k).sum().item() / n_txt for k in RECALL_KS}


def split_metrics(i2t_scores: Tensor, t2i_scores: Tensor, caption_image: Tensor) -> dict[str, float]:
    """Recall metrics when the two directions rank from different score matrices (re-ranking):
    TR (image queries) from ``i2t_scores``, IR (caption queries) from ``t2i_scores``, both
    [n_images, n_captions]."""
    tr = retrieval_metrics(i2t_scores, caption_image)
    ir = retrieval_metrics(t2i_scores, caption_image)
    out = {f"tr_r{k}": tr[f"tr_r{k}"] for k in RECALL_KS}
    out.update({f"ir_r{k}": ir[f"ir_r{k}"] for k in RECALL_KS})
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("tr", "ir") for k in RECALL_KS)
    return out


def winoground_scores(s: Tensor) -> dict[str, float]:
    """Winoground's text, image and group scores (%) from s[g, i, j] = score(caption i, image j)."""
    if s.dim() != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"expected scores of shape [G, 2, 2], got {list(s.shape)}")
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {
        "text": 100.0 * text.float().mean().item(),
        "image": 100.0 * image.float().mean().item(),
        "group": 100.0 * (text & image).float().mean().item(),
    }


# --------------------------------------------------------------------------- sharding


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sharded_map(fn: Callable[[Tensor], Tensor], n: int, batch_size: int, desc: str | None = None) -> Tensor:
    """``fn(rows)`` ([b] long on the CPU -> [b, ...] on the device) over rows ``0..n-1`` in
    micro-batches, each rank an equal slice, gathered to [n, ...] on the CPU of every rank."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rank, world = _world()
    per_rank = math.ceil(n / world)
    # The last slice repeats row n-1 (cut after the gather): every rank runs as many forwards (ZeRO-3).
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp_max(max(n - 1, 0))
    starts = range(0, per_rank, batch_size)
    out = [fn(mine[s : s + batch_size]) for s in progress(starts, total=len(starts), desc=desc or "",
                                                        unit="batches", show=desc is not None and rank == 0)]
    local = torch.cat(out) if out else torch.empty(0)
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous())
        local = torch.cat(gathered)
    return local[:n].cpu()


def _count(tensors: dict[str, Tensor]) -> int:
    return next(iter(tensors.values())).shape[0]


def _select(tensors: dict[str, Tensor], rows: Tensor, device: torch.device) -> dict[str, Tensor]:
    return {k: v.index_select(0, rows).to(device) for k, v in tensors.items()}


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_pairs(
    model: CrossModalModel, texts: dict, images: dict, text_idx: Tensor, image_idx: Tensor, batch_size: int,
    desc: str | None = None,
) -> Tensor:
    """ITM logits of the pairs (text_idx[p], image_idx[p]), this rank's equal share, gathered."""
    device = _device(model)

    def fn(rows: Tensor) -> Tensor:
        t, i = text_idx[rows], image_idx[rows]
        return model.pair_logits(_select(texts, t, device), _select(images, i, device),
                                 torch.arange(t.numel(), device=device), torch.arange(i.numel(), device=device)).float()

    return sharded_map(fn, text_idx.numel(), batch_size, desc)


def has_itc(model: torch.nn.Module) -> bool:
    """Whether the model has the contrastive interface (``config.itc_dim > 0``)."""
    return (getattr(model.config, "itc_dim", 0) or 0) > 0 and hasattr(model, "itc_text") and hasattr(model, "itc_image")


@torch.no_grad()
def sharded_itc_embeddings(model: CrossModalModel, texts: dict, images: dict, batch_size: int) -> tuple[Tensor, Tensor]:
    """L2-normalised ITC embeddings (text [n_txt, d], image [n_img, d]) from the model's text-only
    and image-only passes (``itc_text(text_ids, text_attention)``, ``itc_image(**image_inputs)``),
    sharded over ranks."""
    device = _device(model)

    def text_fn(rows: Tensor) -> Tensor:
        t = _select(texts, rows, device)
        return model.itc_text(t["text_ids"], t["text_attention"]).float()

    def image_fn(rows: Tensor) -> Tensor:  # keywords: the image inputs are regions or pixels
        return model.itc_image(**_select(images, rows, device)).float()

    return (
        sharded_map(text_fn, texts["text_ids"].shape[0], batch_size),
        sharded_map(image_fn, _count(images), batch_size),
    )


def shortlist(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k candidates of every query from similarities [n_images, n_captions]: (captions of each
    image [n_images, k_t], images of each caption [n_captions, k_i]), as rank 0 broke the ties."""
    if k < 1:
        raise ValueError(f"rerank k must be at least 1, got {k}")
    n_img, n_txt = sim.shape
    i2t = sim.topk(min(k, n_txt), dim=1).indices
    t2i = sim.topk(min(k, n_img), dim=0).indices.T.contiguous()
    _, world = _world()
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        for t in (i2t, t2i):
            buf = t.to(device)
            dist.broadcast(buf, src=0)
            t.copy_(buf.cpu())
    return i2t, t2i


@torch.no_grad()
def rerank_scores(
    model: CrossModalModel, texts: dict, images: dict, sim: Tensor, k: int, batch_size: int
) -> tuple[Tensor, Tensor, int]:
    """Cross-encoder scores of the ITC shortlists, -inf elsewhere: (i2t, t2i, pairs scored). The
    union of both shortlists is scored once, image-major (k = all gives the all-pairs batches)."""
    n_img, n_txt = sim.shape
    i2t_idx, t2i_idx = shortlist(sim, k)
    i2t_mask = torch.zeros(n_img, n_txt, dtype=torch.bool)
    i2t_mask[torch.arange(n_img)[:, None], i2t_idx] = True
    t2i_mask = torch.zeros(n_img, n_txt, dtype=torch.bool)
    t2i_mask[t2i_idx, torch.arange(n_txt)[:, None]] = True
    union = i2t_mask | t2i_mask
    pairs = union.nonzero()  # row-major: image-major, the order of boolean-mask assignment below
    scores = score_pairs(model, texts, images, pairs[:, 1], pairs[:, 0], batch_size)
    full = torch.full((n_img, n_txt), -math.inf)
    full[union] = scores
    i2t = full.masked_fill(~i2t_mask, -math.inf)
    t2i = full.masked_fill(~t2i_mask, -math.inf)
    return i2t, t2i, int(pairs.shape[0])


# --------------------------------------------------------------------------- relations


def _relation_keys(layers: list[int], alignments: list[str], isda: bool) -> list[str]:
    keys = []
    for layer in layers:
        keys += [f"layer{layer}/isd_{d}/{a}" for a in alignments for d in ("L", "V")]
        keys += [f"layer{layer}/entropy/{name}" for name in ENTROPY_NAMES]
        if isda:
            keys += [f"layer{layer}/isda_{d}" for d in ("L", "V")]
    return keys


@torch.no_grad()
def relation_values(
    model: CrossModalModel,
    texts: dict,
    images: dict,
    alignments: list[str],
    batch_size: int,
    word_to_region: Tensor | None = None,
) -> dict[str, Tensor]:
    """[n] values per matched pair (text i, image i): ISD_L/ISD_V per alignment and layer, the
    normalised entropies of S_L, S_V, A_t2i, A_i2t and, with ``word_to_region`` [n, Lt] (-1: no
    annotated region), ISDa; NaN for pairs without a valid word or region."""
    n = texts["text_ids"].shape[0]
    layers = model.config.resolved_iais_layers()
    keys = _relation_keys(layers, list(alignments), word_to_region is not None)
    device = _device(model)

    def fn(rows: Tensor) -> Tensor:
        inputs = _select(texts, rows, device)
        inputs.update(_select(images, rows, device))
        b = rows.numel()
        out = model(**inputs, iais_request=IaisRequest(torch.arange(b, device=device), alignment=None,
                                                       per_head=word_to_region is not None))
        cols = []
        for rel in out.relations:
            ok = rel.pair_mask
            nan = torch.full_like(ok, math.nan, dtype=rel.s_l.dtype)
            for a in alignments:
                for d in ("L", "V"):
                    cols.append(torch.where(ok, iais.isd(rel, alignment=a, direction=d), nan))
            entropy = iais.attention_entropy(rel)
            cols += [entropy[name] for name in ENTROPY_NAMES]
            if word_to_region is not None:
                w2r = word_to_region.index_select(0, rows).to(device).long()
                n_text = inputs["text_ids"].shape[1]
                seq = torch.where(w2r >= 0, w2r + n_text, -1)
                pad = seq.new_full((b, out.hidden.shape[1] - n_text), -1)  # the image token positions
                w2r_seq = torch.cat([seq, pad], 1)
                for d in ("L", "V"):
                    v = iais.isd_annotated(rel, w2r_seq, direction=d)
                    cols.append(torch.where(ok & (w2r >= 0).any(1), v, nan))
        return torch.stack(cols, 1).float()

    values = sharded_map(fn, n, batch_size)
    return {key: values[:, j] for j, key in enumerate(keys)}


def histogram(v: Tensor, edges: list[float]) -> dict:
    """Counts of ``v`` in the bins between ``edges``; values beyond the ends go to the end bins."""
    e = torch.tensor(edges, dtype=v.dtype)
    idx = (torch.bucketize(v, e, right=True) - 1).clamp(0, len(edges) - 2)
    return {"edges": list(edges), "counts": torch.bincount(idx, minlength=len(edges) - 1).tolist()}


def summarise(v: Tensor, edges: list[float]) -> dict:
    """Mean, p10/p50/p90, count and histogram of the non-NaN values."""
    v = v[~v.isnan()].double()
    if not v.numel():
        nan = float("nan")
        return {"mean": nan, "p10": nan, "p50": nan, "p90": nan, "n": 0, "hist": histogram(v, edges)}
    q = v.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype)).tolist()
    return {"mean": v.mean().item(), "p10": q[0], "p50": q[1], "p90": q[2], "n": v.numel(), "hist": histogram(v, edges)}


@torch.no_grad()
def relation_report(
    model: CrossModalModel,
    texts: dict,
    images: dict,
    alignments: list[str],
    batch_size: int,
    word_to_region: Tensor | None = None,
) -> dict:
    """ISD_L / ISD_V of the matched pairs (text i with image i) per alignment and layer, beside the
    normalised entropy of S_L, S_V, A_t2i and A_i2t: a near-zero ISD with entropies near 1 is the
    degenerate uniform-attention minimum (spec section 7), not alignment. Each entry has the mean,
    p10/p50/p90, the number of pairs and a histogram."""
    values = relation_values(model, texts, images, alignments, batch_size, word_to_region)
    return {k: summarise(v, ENTROPY_BINS if "/entropy/" in k else ISD_BINS) for k, v in values.items()}


def degenerate_layers(relations: dict, threshold: float = DEGENERATE_ENTROPY) -> list[int]:
    """Layers whose mean normalised entropies of S_L, S_V, A_t2i and A_i2t are all above ``threshold``."""
    layers = sorted({int(m.group(1)) for k in relations if (m := re.match(r"layer(\d+)/entropy/", k))})
    out = []
    for layer in layers:
        means = [relations.get(f"layer{layer}/entropy/{name}", {}).get("mean", math.nan) for name in ENTROPY_NAMES]
        if all(m > threshold for m in means):  # NaN compares False: no claim without the values
            out.append(layer)
    return out


def degenerate_warning(layers: list[int]) -> str:
    where = ", ".join(str(layer) for layer in layers)
    return (
        f"ISD is trivially low at layer {where}: the mean normalised entropies of S_L, S_V, A_t2i and A_i2t"
        f" are all above {DEGENERATE_ENTROPY} (degenerate uniform attention), so a low ISD there measures"
        " no relation alignment (spec section 7)."
    )


def phrase_annotations(rset: RetrievalSet, collator: Collator) -> Tensor | None:
    """ISDa's alignment: word -> annotated region [n_captions, Lt] (-1: none), or None without annotations.

    Each word piece of the collated caption (``collator.texts`` layout, [CLS] at 0) that lies inside an
    annotated phrase's character span maps to the image region whose normalised box has the highest
    IoU with any of the phrase's boxes (docs/data-format.md, ``phrases``).
    """
    if not any(s.meta.get("phrases") for s in rset.images) or not isinstance(collator.image_fields, RegionFields):
        return None
    tok = collator.tokenizer
    if not getattr(tok, "is_fast", False):
        log.warning("ISDa not computed: phrase annotations need a fast tokenizer (character offsets)")
        return None
    if len(rset.captions) != sum(len(s.captions) for s in rset.images):
        raise ValueError("rset.captions must be the captions of rset.images in order (RetrievalSet.from_samples)")
    texts = collator.texts(rset.captions)
    ids, attention = texts["text_ids"], texts["text_attention"]
    out = torch.full(ids.shape, -1, dtype=torch.long)
    counts: Counter[str] = Counter()
    first = 0
    for sample in rset.images:
        phrases = sample.meta.get("phrases") or []
        by_caption: dict[int, list[dict]] = {}
        for ph in phrases:
            by_caption.setdefault(ph["caption"], []).append(ph)
        regions = sample.normalised_boxes()
        for j, group in sorted(by_caption.items()):
            row = first + j
            columns = attention[row].nonzero().flatten()  # the caption's token positions, padding side aside
            targets = [best_region(regions, ph["boxes"]) for ph in group]
            enc = tok(str(rset.captions[row]), return_offsets_mapping=True, return_attention_mask=False,
                      return_token_type_ids=False)
            collated = ids[row, columns].tolist()
            n_words = len(collated) - 2
            # Offsets are valid only if the text tokenizes to the collated ids (stored ids may differ).
            if enc["input_ids"][: n_words + 1] != collated[: n_words + 1]:
                counts["tokenization_mismatch"] += 1
                continue
            counts["captions"] += 1
            for p in range(1, n_words + 1):
                a, b = enc["offset_mapping"][p]
                for ph, region in zip(group, targets, strict=True):
                    if b > a and ph["start"] <= a and b <= ph["end"]:
                        if region >= 0:
                            out[row, columns[p]] = region
                            counts["words"] += 1
                        break
        first += len(sample.captions)
    if counts["tokenization_mismatch"]:
        log.warning("ISDa: %d annotated caption(s) skipped: the tokenizer's pieces of the text differ from the"
                    " collated ids", counts["tokenization_mismatch"])
    if not counts["words"]:
        log.warning("ISDa not computed: no word of an annotated phrase could be aligned to a region")
        return None
    log.info("ISDa: %d words of %d annotated captions aligned to regions", counts["words"], counts["captions"])
    return out


# --------------------------------------------------------------------------- relation-word probe


def relation_token_mask(collator: Collator, captions: list[str], spans: list) -> tuple[dict[str, Tensor], Tensor]:
    """Collated ``captions`` and [n, Lt] bool: the word pieces inside each caption's relation span
    (``spans[c]``: character offsets ``[start, end]`` of e.g. "left of", or None). Captions whose
    tokenizer pieces differ from the collated ids get no mark. Needs a fast tokenizer."""
    texts = collator.texts(captions)
    ids, attention = texts["text_ids"], texts["text_attention"]
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    tok = collator.tokenizer
    if not getattr(tok, "is_fast", False):
        log.warning("relation-word probe not computed: it needs a fast tokenizer (character offsets)")
        return texts, mask
    for row, (text, span) in enumerate(zip(captions, spans, strict=True)):
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)
                and 0 <= span[0] < span[1] <= len(str(text))):
            continue
        columns = attention[row].nonzero().flatten()
        collated = ids[row, columns].tolist()
        enc = tok(str(text), return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False)
        if enc["input_ids"][: len(collated) - 1] != collated[:-1]:
            continue
        for p in range(1, len(collated) - 1):  # the words between [CLS] and [SEP]
            a, b = enc["offset_mapping"][p]
            if b > a and span[0] <= a and b <= span[1]:
                mask[row, columns[p]] = True
    return texts, mask


def masked_prediction_hits(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """[n, 3] per caption: (all marked pieces predicted, marked pieces, pieces predicted), from MLM
    ``logits`` [n, Lt, vocab] (argmax over the vocabulary), the true ids ``labels`` [n, Lt] and the
    marked positions ``mask`` [n, Lt]. A caption without marks counts 0 in every column."""
    right = (logits.argmax(-1) == labels) & mask
    n, k = mask.sum(1), right.sum(1)
    return torch.stack([(n > 0) & (k == n), n, k], 1).float()


@torch.no_grad()
def relation_probe(
    model: CrossModalModel, collator: Collator, captions: list[str], spans: list, images: dict, batch_size: int
) -> dict | None:
    """The relation-word MLM probe: mask each caption's relation pieces at once, encode it with its
    own image, predict them (argmax). Whether the token outputs carry the relation, apart from
    whether the ITM head uses it (the swap scores). ``accuracy``: % of captions with every piece
    right; ``token_accuracy``: % of pieces. None without spans or a [MASK] token."""
    mask_id = getattr(collator.tokenizer, "mask_token_id", None)
    if mask_id is None:
        return None
    texts, mask = relation_token_mask(collator, captions, spans)
    rows = mask.any(1).nonzero().flatten()
    if not rows.numel():
        return None
    texts = {k: v.index_select(0, rows) for k, v in texts.items()}
    images = {k: v.index_select(0, rows) for k, v in images.items()}
    mask = mask.index_select(0, rows)
    masked = texts["text_ids"].masked_fill(mask, mask_id)
    device = _device(model)

    def fn(r: Tensor) -> Tensor:
        ids = masked.index_select(0, r).to(device)
        out = model(text_ids=ids, text_attention=texts["text_attention"].index_select(0, r).to(device),
                    **_select(images, r, device))
        logits = model.mlm_logits(out, ids.shape[1])
        return masked_prediction_hits(logits, texts["text_ids"].index_select(0, r).to(device),
                                      mask.index_select(0, r).to(device))

    hits = sharded_map(fn, rows.numel(), batch_size).sum(0)
    return {"captions": rows.numel(), "accuracy": 100.0 * hits[0].item() / rows.numel(),
            "token_accuracy": 100.0 * hits[2].item() / max(hits[1].item(), 1.0)}


def _spans_of(samples) -> list:
    """Relation spans of every caption of ``samples`` in order (``relation_spans`` meta, else None)."""
    out = []
    for s in samples:
        spans = s.meta.get("relation_spans")
        spans = spans if isinstance(spans, list) and len(spans) == len(s.captions) else [None] * len(s.captions)
        out += spans
    return out


# --------------------------------------------------------------------------- the report


@torch.no_grad()
def evaluate(
    model: CrossModalModel,
    data: EvalData,
    *,
    batch_size: int = 512,
    isd_alignments: tuple[str, ...] | list[str] = ("singular", "distributed", "congruence"),
    rerank_k: int | None = None,
    all_pairs: bool = True,
    relation_probe_enabled: bool = True,
) -> dict:
    """The full report: recall metrics (all-pairs, or re-ranking with ``all_pairs=False``:
    ``report["protocol"]``), ISD and entropies, relation-swap scores, throughput. ``rerank_k`` (an
    ITC model) adds ``itc`` and ``rerank``; captions with relation spans add the relation-word MLM
    probe (``relation_mlm``, ``relation_mlm_swap``) unless ``relation_probe_enabled=False``."""
    if not all_pairs and rerank_k is None:
        raise ValueError("all_pairs=False needs rerank_k: there would be nothing to score")
    if rerank_k is not None and not has_itc(model):
        raise ValueError("re-ranking needs a model with an ITC head (config.itc_dim > 0, itc_text/itc_image)")
    collator, rset, swaps, word_to_region = data.collator, data.rset, data.swaps, data.word_to_region
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        texts = collator.texts(rset.captions)
        images = collator.images(rset.images)
        n_img, n_txt = len(rset.images), len(rset.captions)
        report: dict = {"images": n_img, "captions": n_txt}
        if all_pairs:
            image_idx = torch.arange(n_img).repeat_interleave(n_txt)
            text_idx = torch.arange(n_txt).repeat(n_img)
            scores = score_pairs(model, texts, images, text_idx, image_idx, batch_size,
                                 desc=f"scoring {n_img * n_txt} pairs").view(n_img, n_txt)
            elapsed = time.perf_counter() - t0
            report.update(
                protocol="all_pairs",
                pairs_scored=n_img * n_txt,
                pairs_per_second=n_img * n_txt / elapsed,
                seconds=elapsed,
                **retrieval_metrics(scores, rset.caption_image),
                authors_ir=authors_ir_recall(scores, rset.caption_image),
            )
        if rerank_k is not None:
            t1 = time.perf_counter()
            txt_emb, img_emb = sharded_itc_embeddings(model, texts, images, batch_size)
            sim = img_emb @ txt_emb.T
            t_itc = time.perf_counter() - t1
            report["itc"] = {"seconds": t_itc, **retrieval_metrics(sim, rset.caption_image)}
            t2 = time.perf_counter()
            i2t, t2i, n_pairs = rerank_scores(model, texts, images, sim, rerank_k, batch_size)
            t_cross = time.perf_counter() - t2
            rerank = {
                "k": rerank_k,
                "pairs_scored": n_pairs,  # cross-encoder pairs: the union of both shortlists
                "pairs_shortlisted": min(rerank_k, n_txt) * n_img + min(rerank_k, n_img) * n_txt,
                "pairs_all": n_img * n_txt,
                "reduction": n_img * n_txt / max(n_pairs, 1),
                "pairs_per_second": n_pairs / t_cross,
                "seconds": t_itc + t_cross,
                "cross_encoder_seconds": t_cross,
                **split_metrics(i2t, t2i, rset.caption_image),
            }
            report["rerank"] = rerank
            if not all_pairs:
                report.update(
                    protocol=f"rerank@{rerank_k}",
                    pairs_scored=n_pairs,
                    pairs_per_second=n_pairs / t_cross,
                    seconds=time.perf_counter() - t0,
                    **{k: rerank[k] for k in METRIC_KEYS},
                )
        report["skipped_samples"] = data.skipped
        matched_images = {k: v.index_select(0, rset.caption_image) for k, v in images.items()}
        report["relations"] = relation_report(
            model, texts, matched_images, list(isd_alignments), batch_size, word_to_region
        )
        if word_to_region is None:
            report["isda"] = "not computed: the evaluation shards carry no phrase-box annotations"
        flat = degenerate_layers(report["relations"])
        report["degenerate_layers"] = flat
        report["degenerate"] = bool(flat)
        report["warnings"] = [degenerate_warning(flat)] if flat else []
        if relation_probe_enabled:
            probe = relation_probe(model, collator, rset.captions, _spans_of(rset.images), matched_images, batch_size)
            if probe is not None:
                report["relation_mlm"] = probe
        if swaps:
            swap_texts = collator.texts([c for g in swaps for c in g.captions])
            swap_images = collator.images([im for g in swaps for im in g.images])
            g = torch.arange(len(swaps))
            # Pair (caption i, image j) of group g: text row 2g+i, image row 2g+j.
            ci = torch.tensor([0, 0, 1, 1]).repeat(len(swaps)) + 2 * g.repeat_interleave(4)
            ij = torch.tensor([0, 1, 0, 1]).repeat(len(swaps)) + 2 * g.repeat_interleave(4)
            s = score_pairs(model, swap_texts, swap_images, ci, ij, batch_size).view(-1, 2, 2)
            report["relation_swap"] = {"groups": len(swaps), **winoground_scores(s)}
            kinds = [g.images[0].meta.get("swap_kind") for g in swaps]
            if any(kinds):  # relation data: swapped arguments and swapped relations apart
                report["relation_swap"]["by_kind"] = {
                    k: winoground_scores(s[torch.tensor([x == k for x in kinds])]) for k in sorted(set(kinds) - {None})}
            if relation_probe_enabled:
                swap_captions = [c for g in swaps for c in g.captions]
                probe = relation_probe(model, collator, swap_captions, _spans_of(im for g in swaps for im in g.images),
                                       swap_images, batch_size)  # caption i of a group with image i
                if probe is not None:
                    report["relation_mlm_swap"] = probe
            if has_itc(model):
                t_emb, i_emb = sharded_itc_embeddings(model, swap_texts, swap_images, batch_size)
                s_itc = (t_emb[ci] * i_emb[ij]).sum(-1).view(-1, 2, 2)
                report["relation_swap_itc"] = {"groups": len(swaps), **winoground_scores(s_itc)}
        return report
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- reports


def _metric_row(name: str, pairs, rate, m: dict) -> str:
    pairs = f"{pairs}" if pairs is not None else "-"
    rate = f"{rate:.0f}" if rate is not None else "-"
    return f"| {name} | {pairs} | {rate} | " + " | ".join(f"{m[k]:.2f}" for k in METRIC_KEYS) + " |"


def _f4(x: float) -> str:
    """Four decimals, without the sign of a value that rounds to zero (``-0.0000``)."""
    text = f"{x:.4f}"
    return text[1:] if text == "-0.0000" else text


def markdown_table(report: dict) -> str:
    """The report as markdown: warnings, recall table, relation table, relation-swap lines."""
    r = report
    lines = [f"**WARNING: {w}**" for w in r.get("warnings", [])]
    if lines:
        lines.append("")
    protocol = r.get("protocol", "all_pairs")
    lines += [
        f"Retrieval on {r['images']} images x {r['captions']} captions ({r['pairs_scored']} pairs,"
        f" {r['pairs_per_second']:.0f} pairs/s, protocol {protocol})",
        "",
        "| protocol | cross-encoder pairs | pairs/s | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | RSUM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if protocol == "all_pairs":
        lines.append(_metric_row("all pairs", r["pairs_scored"], r["pairs_per_second"], r))
    if "itc" in r:
        lines.append(_metric_row("ITC only", 0, None, r["itc"]))
    if "rerank" in r:
        rr = r["rerank"]
        lines.append(_metric_row(f"ITC top-{rr['k']} + re-rank", rr["pairs_scored"], rr["pairs_per_second"], rr))
        lines += [
            "",
            f"Re-ranking scored {rr['pairs_scored']} of {rr['pairs_all']} pairs with the cross-encoder"
            f" ({rr['reduction']:.1f}x fewer), {rr['seconds']:.2f} s in all.",
        ]
    if "reported" in r:
        rep, sel = r["reported"], r.get("selected_by")
        lines += ["", f"Reported checkpoint: step {rep['step']}, "
                      + (f"the best RSUM on {sel['split']} ({sel['rsum']:.2f}; eval.report: {rep['eval.report']})" if sel else
                         f"the final step (eval.report: {rep['eval.report']}"
                         + (", no validation selection in this run)" if rep["eval.report"] == "best" else ")"))]
    if "authors_ir" in r:
        a = r["authors_ir"]
        lines += ["", f"IR recall as UNITER's and the IAIS authors' itm_eval.py counts it (fp16 scores, both columns of"
                      f" nonzero(): up to 100k/N points too high, {1000 / max(r['captions'], 1):.1f} at R@10 on these"
                      f" {r['captions']} captions; for comparison with published tables only): R@1 {a['ir_r1']:.2f},"
                      f" R@5 {a['ir_r5']:.2f}, R@10 {a['ir_r10']:.2f}"]
    rel = r.get("relations", {})
    if rel:
        lines += [
            "",
            "| relation statistic (matched pairs) | mean | p10 | p50 | p90 |",
            "|---|---:|---:|---:|---:|",
        ]
        for k, v in sorted(rel.items()):
            p50 = _f4(v["p50"]) if "p50" in v else "-"
            lines.append(f"| {k} | {_f4(v['mean'])} | {_f4(v['p10'])} | {p50} | {_f4(v['p90'])} |")
        lines.append("(normalised entropy 1.0 = uniform attention: a low ISD beside it is the degenerate minimum;"
                     " see the warnings above)" if r.get("warnings") else
                     "(normalised entropy 1.0 = uniform attention: a low ISD beside it is the degenerate minimum)")
    if isinstance(r.get("isda"), str):
        lines.append(f"ISDa {r['isda']}.")
    elif any("/isda_" in k for k in rel):
        lines.append(
            "ISDa (isda_L, isda_V): each word of an annotated phrase is aligned to the region whose box best"
            " overlaps the phrase's boxes; unannotated words are left out (S_L and S_V restricted to the kept"
            " rows per head, docs/iais-spec.md section 4) and n counts the annotated pairs."
        )
    if "relation_swap" in r:
        s = r["relation_swap"]
        lines += ["", f"Relation swap ({s['groups']} groups): text {s['text']:.1f}  image {s['image']:.1f}  group {s['group']:.1f}"]
        lines += [f"  {kind} swaps: group {k['group']:.1f}" for kind, k in s.get("by_kind", {}).items()]
        if "relation_swap_itc" in r:
            s = r["relation_swap_itc"]
            lines.append(f"Relation swap, ITC only: text {s['text']:.1f}  image {s['image']:.1f}  group {s['group']:.1f}")
    for key, where in (("relation_mlm", "retrieval captions"), ("relation_mlm_swap", "relation-swap captions")):
        if key in r:
            p = r[key]
            lines.append(f"Relation-word MLM probe ({p['captions']} {where}, relation phrase masked, with the image):"
                         f" caption accuracy {p['accuracy']:.1f}%, word-piece accuracy {p['token_accuracy']:.1f}%")
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path, step: int | None = None, *, history_only: bool = False) -> Path:
    """Write ``eval.json`` and ``eval.md`` (atomically; not with ``history_only``) and append to
    ``eval_history.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not history_only:
        storage.write_bytes_atomic(str(out_dir / "eval.json"), json.dumps(report, indent=2).encode())
        storage.write_bytes_atomic(str(out_dir / "eval.md"), (markdown_table(report) + "\n").encode())
    with open(out_dir / "eval_history.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **report}) + "\n")
    return out_dir / "eval.json"


# --------------------------------------------------------------------------- inputs


@dataclass
class EvalData:
    """What an evaluation reads: the collator, the retrieval set, relation-swap groups (optional),
    and what was skipped while reading them."""

    collator: Collator
    rset: RetrievalSet
    swaps: list[SwapGroup] | None = None
    word_to_region: Tensor | None = None  # [n_captions, Lt] phrase annotations (ISDa), -1: none
    skipped: dict[str, int] = field(default_factory=dict)


def model_collator(tokenizer, config, *, max_text_len: int, max_regions: int | None = None,
                   augment: Augment | None = None, seed: int = 0) -> Collator:
    """The collator of a model (its ``CrossModalConfig``): the samples' image fields follow its image
    input (``model/image_inputs.py``): region features of its width (at most ``max_regions`` per
    image; None: no bound), or pixels through the transform its config states (size, resampling,
    crop, mean/std), with training ``augment`` seeded by ``seed``."""
    image_input = image_input_of(config)
    if image_input.reads_pixels:
        transform = ImageTransform.from_backbone(config, augment, seed)
        fields: ImageFields = PixelFields(transform, normalise=not image_input.model_normalises)
    else:
        fields = RegionFields(max_regions, config.region_feature_dim)
    return Collator(tokenizer, max_text_len, fields)


def build_eval_data(collator: Collator, split: str, swap_split: str | None = None, *, max_images: int | None = None,
                    io: IoOptions = DEFAULT_IO) -> EvalData:
    """Read an evaluation split (and a relation-swap split) for ``collator``'s model."""
    skipped: Counter = Counter()
    samples = read_split(split, collator.image_fields, limit=max_images, io=io, counts=skipped)
    swaps = swap_groups(read_split(swap_split, collator.image_fields, io=io, counts=skipped)) if swap_split else None
    rset = RetrievalSet.from_samples(samples)
    return EvalData(collator, rset, swaps, phrase_annotations(rset, collator), dict(skipped))


def experiment_data_config(run_dir: Path | None) -> dict:
    """The ``data`` section of the run's experiment config (``{run_dir}/config.json``), or {}."""
    if not run_dir:
        return {}
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text()).get("data", {})
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def text_length(args_len: int | None, data_cfg: dict, tokenizer, config) -> int:
    """Caption truncation length: explicit, else the run's, else the tokenizer's (bounded by the model)."""
    if args_len:
        return args_len
    if data_cfg.get("max_text_len"):
        return int(data_cfg["max_text_len"])
    return int(min(tokenizer.model_max_length, config.max_position_embeddings))
