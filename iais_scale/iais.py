"""IAIS: relation matrices, the three alignments, the loss and the ISD metric.

Pure tensor functions, batched over image-text pairs, exactly as ``docs/iais-spec.md`` (the project's
copy of the method spec) defines them. Nothing here knows about models, data or DeepSpeed, so the
encoder, the trainer, the evaluator and the benchmarks all call this one implementation.

Shapes: B pairs, H heads, N sequence positions, d head size; T (V) = the compacted number of word
(region) slots, an upper bound on the valid words (regions) of any pair. Slot t of pair b holds that
pair's t-th valid word in sequence order; slots past a pair's count are padding, masked, and 0.

No function here synchronises with the host (no ``.item()``, ``.tolist()``, boolean indexing or
data-dependent shapes), so they can run inside CUDA graphs and never stall the GPU; the one exception
is building relation matrices without static ``max_words``/``max_regions``, which reads the batch's
largest counts once (the convenient default outside a model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Alignment = Literal["singular", "distributed", "congruence"]
Direction = Literal["L", "V", "both"]
ALIGNMENTS: tuple[str, ...] = ("singular", "distributed", "congruence")
DIRECTIONS: tuple[str, ...] = ("L", "V", "both")

# The reference adds this inside the log of the soft (distributed/congruence) modes only.
_SOFT_EPS = 1e-6


@dataclass
class RelationMatrices:
    """The four head-averaged relation matrices of a batch of pairs and their logs (float32, compacted)."""

    s_l: Tensor  # [B, T, T] linguistic relations  A[W->W]
    s_v: Tensor  # [B, V, V] visual relations      A[R->R]
    t2i: Tensor  # [B, T, V] word-to-region        A[W->R]
    i2t: Tensor  # [B, V, T] region-to-word        A[R->W]
    word_mask: Tensor  # [B, T] bool, valid word slots
    region_mask: Tensor  # [B, V] bool, valid region slots
    word_pos: Tensor  # [B, T] long, sequence position of each word slot (0 where invalid)
    region_pos: Tensor  # [B, V] long
    # Their logs, computed in log space (finite where a probability underflows to 0); 0 where masked.
    log_s_l: Tensor | None = None
    log_s_v: Tensor | None = None
    log_t2i: Tensor | None = None
    log_i2t: Tensor | None = None
    # Per head, before the head average (``per_head=True``, for ISDa): log A[W->W] and log A[R->R],
    # [B, H, T, T] and [B, H, V, V], 0 where masked.
    head_log_s_l: Tensor | None = None
    head_log_s_v: Tensor | None = None

    def log(self, name: str) -> Tensor:
        """log of matrix ``name`` ("s_l", "s_v", "t2i", "i2t"), 0 at masked entries.

        The stored log-space one when present, else log of the probabilities clamped at the
        smallest normal float (finite, but with no gradient where the clamp binds).
        """
        log_m = getattr(self, f"log_{name}")
        if log_m is not None:
            return log_m
        rows, cols = {"s_l": (self.word_mask, self.word_mask), "s_v": (self.region_mask, self.region_mask),
                      "t2i": (self.word_mask, self.region_mask), "i2t": (self.region_mask, self.word_mask)}[name]
        return _clamped_log(getattr(self, name), rows[:, :, None] & cols[:, None, :])

    @property
    def pair_mask(self) -> Tensor:
        """[B] bool: pairs with at least one valid word and one valid region."""
        return self.word_mask.any(1) & self.region_mask.any(1)


# --------------------------------------------------------------------------- relation matrices


def _compact(mask: Tensor, size: int | None, what: str) -> tuple[Tensor, Tensor]:
    """Positions of the valid entries of each row, in order, packed to the front of ``size`` slots.

    ``size=None`` takes the largest count of the batch: one host read, the only one in this module.
    """
    if size is not None and size < 1:
        raise ValueError(f"max_{what} must be at least 1, got {size}")
    if size is None:
        size = max(int(mask.sum(1).max()) if mask.shape[0] else 0, 1)
    else:
        torch._assert_async(
            (mask.sum(1) <= size).all(), f"a pair has more valid {what} than max_{what}={size}"
        )
    size = min(int(size), mask.shape[1])
    # A stable sort of "is invalid" puts valid positions first, in sequence order: no host sync.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :size]
    valid = mask.gather(1, order)
    return torch.where(valid, order, 0), valid


def _gather_tokens(x: Tensor, pos: Tensor) -> Tensor:
    """x [B, H, N, d], pos [B, K] -> [B, H, K, d].

    Rows are picked from the [B * N, H * d] layout that linear projections produce (x is then a
    free transposed view of it): whole contiguous rows in, an index_add of rows in backward.
    """
    b, h, n, d = x.shape
    flat = (pos + torch.arange(b, device=pos.device)[:, None] * n).reshape(-1)
    rows = x.transpose(1, 2).reshape(b * n, h * d).index_select(0, flat)
    return rows.view(b, pos.shape[1], h, d).transpose(1, 2).contiguous()


def _masked_mean_softmax(scores: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax of [B, H, R, C] scores over the valid columns, mean over heads: (probs, log probs, and
    the per-head log probs [B, H, R, C]).

    The log is taken in log space, logsumexp_h(log_softmax_h) - log H, so it stays finite where a
    sharp row's probabilities underflow to 0. Entries with an invalid row or column are 0 in all three.
    """
    # A finite fill (not -inf) keeps fully masked rows NaN-free; they are zeroed below.
    # In place: the product's backward does not need its output.
    scores = scores.masked_fill_(~cols[:, None, None, :], torch.finfo(scores.dtype).min)
    head_log_probs = scores.log_softmax(-1)
    log_probs = head_log_probs.logsumexp(1) - math.log(scores.shape[1])
    valid = rows[:, :, None] & cols[:, None, :]
    log_probs = torch.where(valid, log_probs, 0.0)
    return torch.where(valid, log_probs.exp(), 0.0), log_probs, torch.where(valid[:, None], head_log_probs, 0.0)


def _clamped_log(m: Tensor, valid: Tensor) -> Tensor:
    """log of a probability matrix clamped at the smallest normal float (never -inf), 0 where masked."""
    return torch.where(valid, m.clamp_min(torch.finfo(m.dtype).tiny).log(), 0.0)


def relation_matrices(
    query: Tensor,
    key: Tensor,
    text_mask: Tensor,
    image_mask: Tensor,
    *,
    max_words: int | None = None,
    max_regions: int | None = None,
    per_head: bool = False,
) -> RelationMatrices:
    """Spec section 1 from a layer's own projections ``query``/``key`` [B, H, N, d], with the logs
    (``per_head``: also log S_L and log S_V of each head, which ISDa restricts per head).

    ``text_mask``/``image_mask`` [B, N] bool mark the valid word / region positions (anywhere in the
    sequence); scores are computed on the compacted positions only, (T + V)^2 entries, not 4 N^2.
    ``max_words``/``max_regions``: static upper bounds on the per-pair counts (the collator knows
    them). Without them the batch's largest counts are read from the masks, a host sync: pass static
    bounds inside a model/CUDA graph to avoid the host sync.
    """
    if query.shape != key.shape or query.dim() != 4:
        raise ValueError(f"query and key must both be [B, H, N, d], got {query.shape}, {key.shape}")
    if text_mask.shape != query.shape[:1] + query.shape[2:3] or image_mask.shape != text_mask.shape:
        raise ValueError(f"masks must be [B, N] = {tuple(query.shape[:1] + query.shape[2:3])}")
    word_pos, word_mask = _compact(text_mask.bool(), max_words, "words")
    region_pos, region_mask = _compact(image_mask.bool(), max_regions, "regions")

    # Float32 at least (bf16 cannot resolve these KLs); float64 stays float64 (gradcheck).
    dtype = torch.promote_types(query.dtype, torch.float32)
    scale = 1.0 / math.sqrt(query.shape[-1])
    # One gather of words and regions together, split after: backward is one index_add per input
    # (and a cat), not two full-size [B, N] gradients plus their sum.
    pos, sizes = torch.cat([word_pos, region_pos], 1), [word_pos.shape[1], region_pos.shape[1]]
    q_w, q_r = (_gather_tokens(query.to(dtype), pos) * scale).split(sizes, dim=2)
    k_w, k_r = _gather_tokens(key.to(dtype), pos).split(sizes, dim=2)

    def block(q_x: Tensor, k_y: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _masked_mean_softmax(q_x @ k_y.transpose(-1, -2), rows, cols)

    (s_l, log_s_l, head_s_l), (s_v, log_s_v, head_s_v) = (block(q_w, k_w, word_mask, word_mask),
                                                         block(q_r, k_r, region_mask, region_mask))
    (t2i, log_t2i, _), (i2t, log_i2t, _) = block(q_w, k_r, word_mask, region_mask), block(q_r, k_w, region_mask, word_mask)
    return RelationMatrices(
        s_l=s_l, s_v=s_v, t2i=t2i, i2t=i2t,
        word_mask=word_mask, region_mask=region_mask, word_pos=word_pos, region_pos=region_pos,
        log_s_l=log_s_l, log_s_v=log_s_v, log_t2i=log_t2i, log_i2t=log_i2t,
        head_log_s_l=head_s_l if per_head else None, head_log_s_v=head_s_v if per_head else None,
    )


def relation_matrices_from_probs(
    probs: Tensor,
    text_mask: Tensor,
    image_mask: Tensor,
    *,
    max_words: int | None = None,
    max_regions: int | None = None,
    per_head: bool = False,
) -> RelationMatrices:
    """Spec section 1 from materialised attention probabilities [B, H, N, N] (eager attention).

    Restricting a softmax to a key subset and renormalising equals a fresh softmax over that subset,
    so each block is the per-head renormalised crop of ``probs``: no second ``q k^T``. The logs are
    clamped (an underflowed probability has no log left to recover); bounds as ``relation_matrices``.
    """
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be [B, H, N, N], got {tuple(probs.shape)}")
    word_pos, word_mask = _compact(text_mask.bool(), max_words, "words")
    region_pos, region_mask = _compact(image_mask.bool(), max_regions, "regions")
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    b, h, n, _ = p.shape

    def block(row_pos: Tensor, col_pos: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        r, c = row_pos.shape[1], col_pos.shape[1]
        crop = p.gather(2, row_pos[:, None, :, None].expand(b, h, r, n))
        crop = crop.gather(3, col_pos[:, None, None, :].expand(b, h, r, c))
        crop = crop * cols[:, None, None, :]
        crop = crop / crop.sum(-1, keepdim=True).clamp_min(torch.finfo(crop.dtype).tiny)
        return crop * (rows[:, :, None] & cols[:, None, :])[:, None]

    s_l, s_v = block(word_pos, word_pos, word_mask, word_mask), block(region_pos, region_pos, region_mask, region_mask)
    words2d, regions2d = word_mask[:, :, None] & word_mask[:, None, :], region_mask[:, :, None] & region_mask[:, None, :]
    return RelationMatrices(
        s_l=s_l.mean(1),
        s_v=s_v.mean(1),
        t2i=block(word_pos, region_pos, word_mask, region_mask).mean(1),
        i2t=block(region_pos, word_pos, region_mask, word_mask).mean(1),
        word_mask=word_mask,
        region_mask=region_mask,
        word_pos=word_pos,
        region_pos=region_pos,
        head_log_s_l=_clamped_log(s_l, words2d[:, None]) if per_head else None,
        head_log_s_v=_clamped_log(s_v, regions2d[:, None]) if per_head else None,
    )


# --------------------------------------------------------------------------- mapped matrices


def _take(m: Tensor, index: Tensor) -> Tensor:
    """m [B, K, K], index [B, R] -> m[b, index[b, i], index[b, j]] of shape [B, R, R]."""
    b, k, _ = m.shape
    r = index.shape[1]
    rows = m.gather(1, index[:, :, None].expand(b, r, k))
    return rows.gather(2, index[:, None, :].expand(b, r, r))


def _masked_softmax(x: Tensor, valid2d: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of x over the valid entries of each row, and its log (exact: log_softmax); 0 where masked."""
    log_p = x.masked_fill(~valid2d, torch.finfo(x.dtype).min).log_softmax(-1)
    log_p = torch.where(valid2d, log_p, 0.0)
    return torch.where(valid2d, log_p.exp(), 0.0), log_p


def _mapped_logs(rel: RelationMatrices, alignment: str, direction: str) -> tuple[Tensor, ...]:
    """(S_X, log S_X, P_X, log P_X, row mask) of one direction X in {L, V} (spec section 2).

    log S_X comes from log space, as does the singular log P_X (log_softmax). The soft modes' log P_X
    only enters P log P: below the smallest normal float that term and its gradient (|dP/dscore| <=
    2 P) vanish, so a clamped log is exact to float precision, at a matmul's cost, not a logsumexp's.
    """
    if direction == "L":
        (x, y, x2y, y2x), rows = ("s_l", "s_v", "t2i", "i2t"), rel.word_mask
    else:
        (x, y, x2y, y2x), rows = ("s_v", "s_l", "i2t", "t2i"), rel.region_mask
    valid2d = rows[:, :, None] & rows[:, None, :]
    if alignment == "singular":
        # Hard alignment: the index carries no gradient (argmax), the values gathered through it do.
        index = getattr(rel, x2y).argmax(-1)
        p_x, log_p_x = _masked_softmax(_take(getattr(rel, y), index), valid2d)
    elif alignment == "distributed":
        p_x = getattr(rel, x2y) @ getattr(rel, y2x)
        log_p_x = _clamped_log(p_x, valid2d)
    elif alignment == "congruence":
        p_x = getattr(rel, x2y) @ getattr(rel, y) @ getattr(rel, y2x)
        log_p_x = _clamped_log(p_x, valid2d)
    else:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    return getattr(rel, x), rel.log(x), p_x, log_p_x, rows


def _mapped(rel: RelationMatrices, alignment: str, direction: str) -> tuple[Tensor, Tensor, Tensor]:
    """(S_X, P_X, row mask) of one direction X in {L, V} (spec section 2)."""
    s_x, _, p_x, _, rows = _mapped_logs(rel, alignment, direction)
    return s_x, p_x, rows


def _symmetric_kl(
    s: Tensor, log_s: Tensor, p: Tensor, log_p: Tensor, rows: Tensor, pair_ok: Tensor, eps: float
) -> Tensor:
    """Per pair: (1/n) sum over the n valid rows of KL(P row || S row) + KL(S row || P row).

    Matches ``KLDivLoss(batchmean)(log(S + eps), P) + KLDivLoss(batchmean)(log(P + eps), S)`` on the
    cropped matrices. ``log_s``/``log_p`` come from log space, so X log X and the plain logs of the
    singular mode (eps = 0) stay finite, with finite gradients, where a probability underflows to 0.
    Masked entries are 0 in all four inputs and masked after: no 0 * log 0 reaches autograd (spec 6).
    """
    rows = rows & pair_ok[:, None]
    valid2d = rows[:, :, None] & rows[:, None, :]
    if eps > 0:
        # Finite as it stands (eps > 0), with a gradient of at most 1 / eps: the reference's own formula.
        log_s_eps, log_p_eps = torch.log(s + eps), torch.log(p + eps)
    else:
        log_s_eps, log_p_eps = log_s, log_p
    kl = p * (log_p - log_s_eps) + s * (log_s - log_p_eps)
    n_rows = rows.sum(1).clamp_min(1)
    return torch.where(valid2d, kl, 0.0).sum((1, 2)) / n_rows


def _check(alignment: str, direction: str) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _reduce(per_pair: Tensor, pair_ok: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_pair
    if reduction == "mean":
        return per_pair.sum() / pair_ok.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- loss and metric


def iais_loss(
    rel: RelationMatrices,
    *,
    alignment: Alignment,
    direction: Direction,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Spec section 3: symmetric KL between intra-modal and mapped relations, float32.

    ``reduction="none"`` gives [B] (0 for pairs without a valid word or region); ``"mean"`` the mean
    over the valid pairs. Call it on the matched (positive) pairs only.
    """
    _check(alignment, direction)
    eps = 0.0 if alignment == "singular" else _SOFT_EPS
    pair_ok = rel.pair_mask
    per_pair = rel.s_l.new_zeros(rel.s_l.shape[0])
    for x in ("L", "V") if direction == "both" else (direction,):
        s_x, log_s_x, p_x, log_p_x, rows = _mapped_logs(rel, alignment, x)
        per_pair = per_pair + _symmetric_kl(s_x, log_s_x, p_x, log_p_x, rows, pair_ok, eps)
    return _reduce(per_pair, pair_ok, reduction)


@torch.no_grad()
def isd(rel: RelationMatrices, *, alignment: Alignment, direction: Direction) -> Tensor:
    """Spec section 4: Intra-modal Self-attention Distance per pair [B], no gradient."""
    return iais_loss(rel, alignment=alignment, direction=direction, reduction="none").detach()


@torch.no_grad()
def isd_annotated(rel: RelationMatrices, word_to_region: Tensor, *, direction: Direction) -> Tensor:
    """ISDa per pair [B]: singular alignment taken from phrase-box annotations (spec section 4).

    ``word_to_region`` [B, N] gives, at each word's sequence position, the sequence position of its
    annotated region (-1: none). Direction L uses the annotated words as rows and columns: S_L
    restricted to them as section 1 restricts every matrix, per head (a fresh softmax of each head
    over the kept columns, then the head mean), so ``rel`` needs its per-head logs (``per_head=True``).
    P_L[i, j] = softmax_j(S_V[a(i), a(j)]) over the kept j, as the singular alignment. Direction V
    uses the regions some annotated word points to, each mapped back to the first (lowest-position)
    such word, S_V restricted per head to them. An annotation that points at no valid region counts
    as none. Pairs with no annotation give 0.
    """
    _check("singular", direction)
    if rel.head_log_s_l is None or rel.head_log_s_v is None:
        raise ValueError("ISDa restricts S_L and S_V per head: build the relation matrices with per_head=True")
    target = word_to_region.long().gather(1, rel.word_pos)  # [B, T] annotated region position
    # hits[b, t, v]: word slot t is annotated with region slot v.
    hits = (rel.region_pos[:, None, :] == target[:, :, None]) & rel.region_mask[:, None, :]
    hits = hits & (rel.word_mask & (target >= 0))[:, :, None]
    words = hits.any(2)  # [B, T] annotated words
    regions = hits.any(1)  # [B, V] regions some annotated word points to
    pair_ok = words.any(1)

    per_pair = rel.s_l.new_zeros(rel.s_l.shape[0])
    for x in ("L", "V") if direction == "both" else (direction,):
        if x == "L":
            rows, head_log_s_x, s_y = words, rel.head_log_s_l, rel.s_v
            index = hits.float().argmax(2)  # a(i): the region slot of word slot i
        else:
            rows, head_log_s_x, s_y = regions, rel.head_log_s_v, rel.s_l
            index = hits.float().argmax(1)  # b(r): the first word slot annotated with region r
        valid2d = rows[:, :, None] & rows[:, None, :]
        # Each head's restriction to the kept columns is a softmax of its log probabilities over them
        # (exact in log space); then the head mean, in log space as section 1's.
        head_log = _masked_softmax(head_log_s_x, valid2d[:, None])[1]
        log_s_x = torch.where(valid2d, head_log.logsumexp(1) - math.log(head_log.shape[1]), 0.0)
        s_x = torch.where(valid2d, log_s_x.exp(), 0.0)
        p_x, log_p_x = _masked_softmax(_take(s_y, index), valid2d)
        per_pair = per_pair + _symmetric_kl(s_x, log_s_x, p_x, log_p_x, rows, pair_ok, 0.0)
    return per_pair


def attention_entropy(rel: RelationMatrices) -> dict[str, Tensor]:
    """Normalised row entropy (1 = uniform) of S_L, S_V, A_t2i, A_i2t, per pair [B].

    A low ISD is meaningless when the rows are uniform (spec section 7), so reports show this beside
    it, and the entropy guard of ``objectives`` penalises it. Rows with fewer than two columns have
    no defined value; a pair without any such row is NaN (aggregate with ``nanmean``). m log m comes
    from the log-space logs: finite values and gradients where m underflows (spec section 6).
    """
    out = {}
    for name, key, rows, cols in (
        ("S_L", "s_l", rel.word_mask, rel.word_mask),
        ("S_V", "s_v", rel.region_mask, rel.region_mask),
        ("A_t2i", "t2i", rel.word_mask, rel.region_mask),
        ("A_i2t", "i2t", rel.region_mask, rel.word_mask),
    ):
        n_cols = cols.sum(1, keepdim=True).float()  # [B, 1]
        entropy = -(getattr(rel, key) * rel.log(key)).sum(-1) / n_cols.clamp_min(2).log()  # [B, R]
        rows = rows & (n_cols > 1) & rel.pair_mask[:, None]
        count = rows.sum(1)
        value = (entropy * rows).sum(1) / count.clamp_min(1)
        out[name] = torch.where(count > 0, value, float("nan"))
    return out
