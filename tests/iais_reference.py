"""Plain, per-sample reference implementation of IAIS (docs: /work/shared/docs/iais-spec.md, sections 1-4).

Written straight from the spec, deliberately naive and independent of ``iais_scale.iais``:

* a Python loop over the pairs of the batch;
* for each of the four blocks the full raw scores ``q k^T / sqrt(d)`` over all N positions are
  recomputed (four times per pair), then cropped to rows X / columns Y, softmaxed over the cropped
  columns and averaged over the heads;
* the symmetric KL is ``torch.nn.KLDivLoss(reduction="batchmean")`` in both directions.

Everything is computed in float32 (float64 stays float64 so that it can serve for gradient checks).
Only meant for tests and the benchmark baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-6
ALIGNMENTS = ("singular", "distributed", "congruence")
DIRECTIONS = ("L", "V", "both")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for any half/bf16/float32 input, float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class PairMatrices:
    """The four relation matrices of one pair, cropped to its valid positions (sequence order)."""

    word_pos: torch.Tensor  # [T_b] long, sequence positions of the valid words
    region_pos: torch.Tensor  # [V_b] long
    s_l: torch.Tensor  # [T_b, T_b]
    s_v: torch.Tensor  # [V_b, V_b]
    t2i: torch.Tensor  # [T_b, V_b]
    i2t: torch.Tensor  # [V_b, T_b]
    q: torch.Tensor | None = None  # [H, N, d]: ISDa restricts to the annotated words from the raw scores
    k: torch.Tensor | None = None

    @property
    def valid(self) -> bool:
        return self.word_pos.numel() > 0 and self.region_pos.numel() > 0


def _block(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A[X->Y] of spec section 1 for one pair: q, k [H, N, d]; rows, cols 1-D long index tensors."""
    d = q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [H, N, N], full raw scores, on purpose
    if rows.numel() == 0 or cols.numel() == 0:
        return scores.new_zeros((rows.numel(), cols.numel()))
    cropped = scores[:, rows][:, :, cols]  # [H, |X|, |Y|]
    return torch.softmax(cropped, dim=-1).mean(dim=0)


def pair_matrices(q: torch.Tensor, k: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor) -> PairMatrices:
    """q, k: [H, N, d] of one pair; masks [N] bool."""
    dt = compute_dtype(q.dtype)
    q = q.to(dt)
    k = k.to(dt)
    w = torch.nonzero(text_mask, as_tuple=False).flatten()
    r = torch.nonzero(image_mask, as_tuple=False).flatten()
    return PairMatrices(
        word_pos=w,
        region_pos=r,
        s_l=_block(q, k, w, w),
        s_v=_block(q, k, r, r),
        t2i=_block(q, k, w, r),
        i2t=_block(q, k, r, w),
        q=q,
        k=k,
    )


def reference_matrices(query, key, text_mask, image_mask) -> list[PairMatrices]:
    """Per-pair cropped matrices for a batch: query/key [B, H, N, d], masks [B, N]."""
    return [pair_matrices(query[b], key[b], text_mask[b], image_mask[b]) for b in range(query.shape[0])]


def symmetric_kl(s: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
    """KL(P||S) + KL(S||P) averaged over the n rows, as KLDivLoss(batchmean) twice (spec section 3)."""
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    if eps == 0:
        return kl(torch.log(s), p) + kl(torch.log(p), s)
    return kl(torch.log(s + eps), p) + kl(torch.log(p + eps), s)


def mapped_matrix(m: PairMatrices, alignment: str, direction: str) -> torch.Tensor:
    """P_X of spec section 2 for one pair and one direction in {"L", "V"}."""
    if alignment == "singular":
        if direction == "L":
            a = torch.argmax(m.t2i.detach(), dim=1)  # a(i), no gradient through the index
            return torch.softmax(m.s_v[a][:, a], dim=1)
        b = torch.argmax(m.i2t.detach(), dim=1)  # b(r)
        return torch.softmax(m.s_l[b][:, b], dim=1)
    if alignment == "distributed":
        return m.t2i @ m.i2t if direction == "L" else m.i2t @ m.t2i
    if alignment == "congruence":
        return m.t2i @ m.s_v @ m.i2t if direction == "L" else m.i2t @ m.s_l @ m.t2i
    raise ValueError(f"unknown alignment {alignment!r}")


def pair_loss(m: PairMatrices, alignment: str, direction: str) -> torch.Tensor | None:
    """loss of one pair (spec section 3); None for a pair without words or without regions."""
    if alignment not in ALIGNMENTS:
        raise ValueError(alignment)
    if direction not in DIRECTIONS:
        raise ValueError(direction)
    if not m.valid:
        return None
    eps = 0.0 if alignment == "singular" else EPS
    total = None
    for x in ("L", "V"):
        if direction not in (x, "both"):
            continue
        s = m.s_l if x == "L" else m.s_v
        loss = symmetric_kl(s, mapped_matrix(m, alignment, x), eps)
        total = loss if total is None else total + loss
    return total


def _reduce(per_pair: list[torch.Tensor | None], dtype, device, reduction: str) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=device)
    if reduction == "none":
        return torch.stack([zero if v is None else v for v in per_pair])
    if reduction == "mean":
        valid = [v for v in per_pair if v is not None]
        if not valid:
            return zero
        return torch.stack(valid).sum() / len(valid)
    raise ValueError(reduction)


def reference_loss(query, key, text_mask, image_mask, *, alignment, direction, reduction="mean"):
    mats = reference_matrices(query, key, text_mask, image_mask)
    per_pair = [pair_loss(m, alignment, direction) for m in mats]
    return _reduce(per_pair, compute_dtype(query.dtype), query.device, reduction)


def reference_isd(query, key, text_mask, image_mask, *, alignment, direction):
    with torch.no_grad():
        return reference_loss(query, key, text_mask, image_mask,
                              alignment=alignment, direction=direction, reduction="none")


def pair_isd_annotated(m: PairMatrices, word_to_region: torch.Tensor, direction: str) -> torch.Tensor | None:
    """ISDa of one pair. word_to_region: [N] long, the region's sequence position at each word's
    position (-1 = no annotation). None when the pair has no annotated word (or no word/region)."""
    if not m.valid:
        return None
    region_slot = {int(p): j for j, p in enumerate(m.region_pos.tolist())}
    ann_words, ann_regions = [], []  # slot indices into m.word_pos / m.region_pos, sequence order
    for i, p in enumerate(m.word_pos.tolist()):
        r = int(word_to_region[p])
        if r >= 0 and r in region_slot:
            ann_words.append(i)
            ann_regions.append(region_slot[r])
    if len(ann_words) < 1:
        return None
    dev = m.s_l.device
    total = None
    if direction in ("L", "both"):
        wp = torch.tensor(ann_words, device=dev)
        a = torch.tensor(ann_regions, device=dev)
        s = _block(m.q, m.k, m.word_pos[wp], m.word_pos[wp])  # A[W_a -> W_a]: per head, then the mean
        p = torch.softmax(m.s_v[a][:, a], dim=1)
        loss = symmetric_kl(s, p, 0.0)
        total = loss if total is None else total + loss
    if direction in ("V", "both"):
        first_word = {}  # region slot -> lowest-position annotated word slot
        for i, r in zip(ann_words, ann_regions):
            first_word.setdefault(r, i)
        regs = sorted(first_word)  # region slots in sequence order
        rp = torch.tensor(regs, device=dev)
        b = torch.tensor([first_word[r] for r in regs], device=dev)
        s = _block(m.q, m.k, m.region_pos[rp], m.region_pos[rp])  # A[R_a -> R_a]
        p = torch.softmax(m.s_l[b][:, b], dim=1)
        loss = symmetric_kl(s, p, 0.0)
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError(direction)
    return total


def reference_isd_annotated(query, key, text_mask, image_mask, word_to_region, *, direction):
    with torch.no_grad():
        mats = reference_matrices(query, key, text_mask, image_mask)
        per_pair = [pair_isd_annotated(m, word_to_region[b], direction) for b, m in enumerate(mats)]
        return _reduce(per_pair, compute_dtype(query.dtype), query.device, "none")


def scattered_masks(word_counts, region_counts, n: int, generator: torch.Generator):
    """Masks [B, N] with the words and regions of each pair at random, non-contiguous positions in
    1..N-1 (position 0 plays [CLS]); the remaining positions are neither (special tokens/padding)."""
    b = len(word_counts)
    text = torch.zeros(b, n, dtype=torch.bool)
    image = torch.zeros(b, n, dtype=torch.bool)
    for i, (t, v) in enumerate(zip(word_counts, region_counts)):
        if t + v > n - 1:
            raise ValueError("too many positions")
        perm = torch.randperm(n - 1, generator=generator) + 1
        text[i, perm[:t]] = True
        image[i, perm[t:t + v]] = True
    return text, image
