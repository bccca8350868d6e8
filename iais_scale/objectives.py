"""Training objectives: ranking with hard-negative groups plus IAIS (spec section 5), MLM, MRFR, ITC.

Each anchor of the B matched pairs gets a group: its positive and the hardest negatives that the
cross-encoder picks, without gradient, from candidates: random pairs of the micro-batch (``mining:
cross``) or the global batch's nearest under ITC (``mining: itc``). Text-anchored groups carry IAIS
direction L, image-anchored ones V; IAIS is computed on each group's positive row only.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor

from . import iais as iais_math
from .config import IaisConfig, ObjectiveConfig
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .model import CrossModalModel, IaisRequest
from .model.encoder import TEXT_TENSOR_KEYS, image_tensors, select_pairs

# Bytes (and rows) this process has received from other ranks in the pool and embedding exchanges,
# by name; counted from the tensors the collectives filled, this rank's own part left out (an
# all_reduce counts its result once). benchmarks/mining_comm.py reads and clears it.
COMM: collections.Counter[str] = collections.Counter()

PoolExchange = Literal["fetch", "all_gather"]


def iais_weight(step: int, total: int, cfg: IaisConfig) -> float:
    """``weight * schedule(t / T)``; exp is the reference ``exp(5 (t/T - 1))``, rising from e^-5 to 1."""
    if not cfg.enabled:
        return 0.0
    t = min(max(step / max(total, 1), 0.0), 1.0)
    schedule = {
        "constant": 1.0,
        "linear": t,
        "exp": math.exp(5.0 * (t - 1.0)),
        "log": 1.0 - math.exp(-5.0 * t),  # the reference's log_schedule: concave, 0 -> 1 - e^-5
    }[cfg.schedule]
    return cfg.weight * schedule


@torch.no_grad()
def score_candidates(model: CrossModalModel, pool: dict, text_idx: Tensor, image_idx: Tensor, chunk: int) -> Tensor:
    """ITM logits of many pairs of ``pool``, without gradient, in chunks of ``chunk`` pairs."""
    return torch.cat([model.pair_logits(pool, pool, text_idx[s : s + chunk], image_idx[s : s + chunk])
                      for s in range(0, text_idx.numel(), chunk)])


@torch.no_grad()
def keep_hardest(
    model: CrossModalModel, pool: dict, anchors: Tensor, candidates: Tensor, *, anchor: str, num_hard: int,
    chunk: int = 1024,
) -> Tensor:
    """[A, num_hard] of the ``candidates`` [A, C] (rows of ``pool``: negative images of a text anchor,
    negative texts of an image anchor), those the cross-encoder scores highest, without gradient or
    dropout. With ``num_hard == C`` all are kept unscored."""
    if num_hard == candidates.shape[1]:
        return candidates
    own = anchors[:, None].expand_as(candidates)
    texts, images = (own, candidates) if anchor == "text" else (candidates, own)
    was_training = model.training
    model.eval()
    try:
        scores = score_candidates(model, pool, texts.reshape(-1), images.reshape(-1), chunk).view(candidates.shape)
    finally:
        model.train(was_training)
    return candidates.gather(1, scores.topk(num_hard, dim=1).indices)


def hardest_negatives(
    model: CrossModalModel,
    batch: dict,
    *,
    anchor: str,
    num_candidates: int,
    num_hard: int,
    generator: torch.Generator,
    num_anchors: int | None = None,
    first: int = 0,
    chunk: int = 1024,
) -> Tensor:
    """The reference mining: [A, num_hard] indices of the hardest of ``num_candidates`` random
    in-batch negatives for each of the A = ``num_anchors`` pairs from row ``first`` on (all by default)."""
    b, device = batch["text_ids"].shape[0], batch["text_ids"].device
    a = num_anchors or b
    # Drawn on the CPU from the seeded generator: the same candidates on any device.
    noise = torch.rand(a, b, generator=generator)
    noise[torch.arange(a), torch.arange(first, first + a)] = -1.0  # never the positive itself
    candidates = noise.topk(num_candidates, dim=1).indices.to(device)  # a uniform random subset per anchor
    return keep_hardest(model, batch, torch.arange(first, first + a, device=device), candidates, anchor=anchor,
                        num_hard=num_hard, chunk=chunk)


def gather_pool(batch: dict, group: dist.ProcessGroup | None) -> tuple[dict, int]:
    """The global batch (every rank's pairs in rank order, padded to the longest on any rank) and
    this rank's offset in it. The reference exchange of ITC mining (``pool_exchange="all_gather"``),
    which ``fetch_rows`` is tested against. ``group=None``: the batch itself."""
    if group is None or dist.get_world_size(group) == 1:
        return batch, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pool = {}
    for k, v in batch.items():
        if not isinstance(v, Tensor):
            continue
        shape = torch.tensor(v.shape[1:2] if v.dim() > 1 else [0], device=v.device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)  # the padded length
        COMM["all_gather.lengths"] += shape.nbytes
        if v.dim() > 1 and v.shape[1] < int(shape[0]) and k != "pixel_values":
            v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, int(shape[0]) - v.shape[1]))
        wire = v.to(torch.uint8) if v.dtype == torch.bool else v  # gloo gathers no bool
        parts = [torch.empty_like(wire) for _ in range(world)]
        dist.all_gather(parts, wire.contiguous(), group=group)
        COMM[f"all_gather.{k}"] += sum(t.nbytes for r, t in enumerate(parts) if r != rank)
        pool[k] = torch.cat(parts).to(v.dtype)
    COMM["all_gather.rows"] += (world - 1) * batch["text_ids"].shape[0]
    return pool, rank * batch["text_ids"].shape[0]


def mining_group(group: dist.ProcessGroup | None, size: int) -> dist.ProcessGroup | None:
    """The ranks whose micro-batches form this rank's ITC mining pool: ``group`` (``size`` 0 or at
    least its size), else this rank's block of ``size`` consecutive ranks (e.g. one node's GPUs)."""
    if group is None or size <= 0 or size >= dist.get_world_size(group):
        return group
    world = dist.get_world_size(group)
    if world % size:
        raise ValueError(f"objectives.mining_group_size={size} must divide the world size {world}")
    if world != dist.get_world_size():
        raise ValueError("objectives.mining_group_size: the group passed to training_loss must span every"
                         " process, which all create the mining groups")
    ranks = dist.get_process_group_ranks(group)
    default = dist.group.WORLD
    key = (tuple(ranks), size)
    cached = _MINING_GROUPS.get(key)
    if cached is None or cached[0] is not default:  # none yet, or made under an earlier init_process_group
        me = dist.get_rank()
        # new_group is collective: every process creates every block, in the same order, at the same step.
        blocks = [dist.new_group(ranks[s : s + size]) for s in range(0, world, size)]
        cached = _MINING_GROUPS[key] = (default, blocks[ranks.index(me) // size])
    return cached[1]


_MINING_GROUPS: dict[tuple, tuple] = {}


# Wire forms of a tensor key's rows, chosen by the sender when they decode to its rows bit for bit.
_RAW, _F16, _U8_PIXELS = 0, 1, 2
# The collator's normalisation of uint8 pixels, (x / 255 - mean) / std, computed as it computes it.
_PIXEL_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
_PIXEL_SCALE = 1.0 / (255.0 * _PIXEL_STD)
_PIXEL_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / _PIXEL_STD


def _pixels_from_u8(u8: Tensor) -> Tensor:
    out = torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
    out.copy_(u8)
    return out.mul_(_PIXEL_SCALE.to(u8.device)).add_(_PIXEL_SHIFT.to(u8.device))


def _pixels_to_u8(x: Tensor) -> Tensor:
    u = (x - _PIXEL_SHIFT.to(x.device)) / _PIXEL_SCALE.to(x.device)
    return u.round_().clamp_(0, 255).to(torch.uint8)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _wire_form(key: str, v: Tensor) -> int:
    """The narrowest wire form of ``v``'s rows that the receiver turns back into them exactly:
    uint8 for pixels the collator normalised from uint8, float16 for float32 values that are
    float16 numbers (region features stored in half precision), else the tensor as it is."""
    if v.dtype != torch.float32 or v.numel() == 0:
        return _RAW
    if key == "pixel_values" and v.dim() == 4 and v.shape[1] == 3 and _same_bits(_pixels_from_u8(_pixels_to_u8(v)), v):
        return _U8_PIXELS
    if _same_bits(v.half().float(), v):
        return _F16
    return _RAW


def _wire_dtype(v: Tensor, form: int) -> torch.dtype:
    return {_RAW: v.dtype, _F16: torch.float16, _U8_PIXELS: torch.uint8}[form]


def _encode_rows(rows: dict[str, Tensor], keys: list[str], forms: dict[str, int], n: int) -> Tensor:
    """[n, row bytes] uint8: each row's keys in ``keys`` order, in their wire forms."""
    parts = []
    for k in keys:
        x = rows[k]
        if forms[k] == _U8_PIXELS:
            x = _pixels_to_u8(x)
        elif forms[k] == _F16:
            x = x.half()
        parts.append(x.reshape(n, math.prod(x.shape[1:])).contiguous().view(torch.uint8))  # [n, row bytes]
    return torch.cat(parts, 1) if parts else torch.empty(n, 0, dtype=torch.uint8, device=next(iter(rows.values())).device if rows else None)


def _decode_rows(data: Tensor, keys: list[str], forms: dict[str, int], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``_encode_rows``: ``like[k]`` is a row of key ``k`` as the receiver holds it
    (padded shape, dtype)."""
    n, out, at = data.shape[0], {}, 0
    for k in keys:
        row = like[k]
        wire = _wire_dtype(row, forms[k])
        nbytes = row.numel() * wire.itemsize
        buf = data.new_empty(n * nbytes)  # fresh, aligned storage for the dtype view
        buf.view(n, nbytes).copy_(data[:, at : at + nbytes])
        x = buf.view(wire).reshape(n, *row.shape)
        at += nbytes
        if forms[k] == _U8_PIXELS:
            x = _pixels_from_u8(x)
        out[k] = x.to(row.dtype) if forms[k] == _F16 else x
    return out


def _row_bytes(keys: list[str], forms: dict[str, int], like: dict[str, Tensor]) -> int:
    return sum(like[k].numel() * _wire_dtype(like[k], forms[k]).itemsize for k in keys)


@dataclass
class FetchedRows:
    """This rank's ITC mining pool after ``fetch_rows``: its own B pairs (rows 0..B-1), then the
    fetched texts (text keys) and images (image keys), indexed apart as ``select_pairs`` does."""

    pool: dict
    text_global: Tensor  # [texts in pool]: each text row's row in the mining group's global batch
    image_global: Tensor  # [images in pool], likewise
    text_local: Tensor  # [global batch]: the pool row of each global row's text, -1 when not fetched
    image_local: Tensor


def fetch_rows(batch: dict, text_rows: Tensor, image_rows: Tensor, group: dist.ProcessGroup | None) -> FetchedRows:
    """The texts of ``text_rows`` and the images of ``image_rows`` (rows of the global batch, as
    ``gather_pool`` orders it) next to this rank's own pairs, each fetched once from its owner:
    what a rank receives does not grow with the world size. The rows arrive bit for bit as
    ``gather_pool`` delivers them. Every rank's micro-batch must hold the same number of pairs."""
    text_keys = [k for k in TEXT_TENSOR_KEYS if k in batch]
    image_keys = list(image_tensors(batch))
    b = batch["text_ids"].shape[0]
    if group is None or dist.get_world_size(group) == 1:
        rows = torch.arange(b, device=batch["text_ids"].device)
        return FetchedRows(batch, rows, rows, rows, rows)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    keys = text_keys + image_keys
    device = batch["text_ids"].device
    offset = rank * b

    def wanted(rows: Tensor) -> Tensor:  # sorted, unique, not this rank's own
        rows = rows.reshape(-1).to(device).unique()
        return rows[(rows < offset) | (rows >= offset + b)]

    need_t, need_i = wanted(text_rows), wanted(image_rows)
    padded = [k not in ("pixel_values",) and batch[k].dim() > 1 for k in keys]
    forms = {k: _wire_form(k, batch[k]) for k in image_keys}  # texts (ids, masks) travel as they are
    forms.update({k: _RAW for k in text_keys})

    # 1. Header: [texts wanted from r, images wanted from r, my lengths..., my wire forms...] to each r.
    n_t = torch.bincount(need_t // b, minlength=world)
    n_i = torch.bincount(need_i // b, minlength=world)
    mine = torch.tensor([batch[k].shape[1] if pad else 0 for k, pad in zip(keys, padded)]
                        + [forms[k] for k in keys], dtype=torch.long, device=device)
    head = torch.cat([n_t[:, None], n_i[:, None], mine.expand(world, -1)], 1).contiguous()
    their = torch.empty_like(head)
    dist.all_to_all_single(their, head, group=group)
    COMM["fetch.header"] += head[0].nbytes * (world - 1)
    lengths = their[:, 2 : 2 + len(keys)].amax(0).tolist()  # padded lengths over the whole group
    sent_forms = their[:, 2 + len(keys) :].tolist()  # each sender's wire forms, by key

    def pad(v: Tensor, k: str, length: int) -> Tensor:
        if k != "pixel_values" and v.dim() > 1 and v.shape[1] < length:
            v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, length - v.shape[1]))
        return v

    own = {k: pad(batch[k], k, n) for k, n in zip(keys, lengths)}

    # 2. Row ids, local to their owner: texts then images for each owner, owners in rank order.
    ids = torch.cat([need_t, need_i])
    kind = torch.cat([torch.zeros_like(need_t), torch.ones_like(need_i)])
    order = torch.sort((ids // b) * 2 + kind, stable=True).indices
    send_ids = (ids % b)[order]
    asked_t, asked_i = their[:, 0], their[:, 1]  # what each rank wants from me
    recv_ids = torch.empty(int((asked_t + asked_i).sum()), dtype=torch.long, device=device)
    dist.all_to_all_single(recv_ids, send_ids, output_split_sizes=(asked_t + asked_i).tolist(),
                           input_split_sizes=(n_t + n_i).tolist(), group=group)
    COMM["fetch.ids"] += recv_ids.nbytes

    # 3. The rows: per requester, its texts then its images, packed as bytes.
    requester = torch.repeat_interleave(torch.arange(world, device=device), asked_t + asked_i)
    starts = torch.cumsum(asked_t + asked_i, 0) - (asked_t + asked_i)
    is_image = (torch.arange(recv_ids.numel(), device=device) - starts[requester]) >= asked_t[requester]
    text_bytes = _encode_rows({k: own[k][recv_ids[~is_image]] for k in text_keys}, text_keys, forms,
                              int((~is_image).sum()))
    image_bytes = _encode_rows({k: own[k][recv_ids[is_image]] for k in image_keys}, image_keys, forms,
                               int(is_image.sum()))
    pieces, send_split = [], []
    for t, i in zip(text_bytes.split(asked_t.tolist()), image_bytes.split(asked_i.tolist())):
        pieces += [t.reshape(-1), i.reshape(-1)]
        send_split.append(t.numel() + i.numel())
    send = torch.cat(pieces)
    like = {k: own[k][0] for k in keys}
    text_row = _row_bytes(text_keys, forms, like)
    image_row = [_row_bytes(image_keys, dict(zip(keys, f)), like) for f in sent_forms]
    recv_split = [int(t) * text_row + int(i) * image_row[r] for r, (t, i) in enumerate(zip(n_t.tolist(), n_i.tolist()))]
    recv = torch.empty(sum(recv_split), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_split, input_split_sizes=send_split, group=group)
    COMM["fetch.rows"] += recv.nbytes
    COMM["fetch.text_rows"] += int(need_t.numel())
    COMM["fetch.image_rows"] += int(need_i.numel())

    texts, images = [], []
    at = 0
    for r, (t, i) in enumerate(zip(n_t.tolist(), n_i.tolist())):
        if t:
            texts.append(_decode_rows(recv[at : at + t * text_row].view(t, text_row), text_keys, forms, like))
            COMM["fetch.bytes.texts"] += t * text_row
        at += t * text_row
        if i:
            f = dict(zip(keys, sent_forms[r]))
            images.append(_decode_rows(recv[at : at + i * image_row[r]].view(i, image_row[r]), image_keys, f, like))
            for k in image_keys:
                COMM[f"fetch.bytes.{k}"] += i * like[k].numel() * _wire_dtype(like[k], f[k]).itemsize
        at += i * image_row[r]
    pool = {k: torch.cat([own[k]] + [x[k] for x in texts]) for k in text_keys}
    pool.update({k: torch.cat([own[k]] + [x[k] for x in images]) for k in image_keys})

    mine_rows = offset + torch.arange(b, device=device)
    text_global, image_global = torch.cat([mine_rows, need_t]), torch.cat([mine_rows, need_i])
    text_local = torch.full((world * b,), -1, dtype=torch.long, device=device)
    image_local = text_local.clone()
    text_local[text_global] = torch.arange(text_global.numel(), device=device)
    image_local[image_global] = torch.arange(image_global.numel(), device=device)
    return FetchedRows(pool, text_global, image_global, text_local, image_local)


def gather_rows(x: Tensor, group: dist.ProcessGroup | None, *, purpose: str = "embeddings") -> Tensor:
    """Every rank's rows of ``x`` in rank order. Differentiable: the gradient of each row flows back
    to the rank that computed it (pass ``x.detach()`` when none is needed). ``purpose``: the name
    its bytes are counted under in ``COMM``."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    COMM[purpose] += x.nbytes * (dist.get_world_size(group) - 1)
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)
    return torch.cat(dist_nn.all_gather(x, group=group))


def itc_loss(text: Tensor, image: Tensor, logit_scale: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP) of this rank's pairs against the whole global batch, as OpenCLIP's
    ``local_loss`` with ``gather_with_grad``: averaged over ranks, exactly the global batch's gradient."""
    return _itc_loss(text, image, logit_scale, group)[0]


def _itc_loss(text: Tensor, image: Tensor, logit_scale: Tensor,
              group: dist.ProcessGroup | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``itc_loss`` and the gathered (text, image) embeddings of the global batch, detached (ITC
    mining ranks by them without gathering them again)."""
    all_t, all_i = (gather_rows(x, group, purpose="itc_loss.embeddings") for x in (text, image))
    offset = 0 if group is None else dist.get_rank(group) * text.shape[0]
    target = offset + torch.arange(text.shape[0], device=text.device)
    scale = logit_scale.exp().clamp(max=100)
    loss = 0.5 * (F.cross_entropy(scale * text @ all_i.T, target) + F.cross_entropy(scale * image @ all_t.T, target))
    return loss, (all_t.detach(), all_i.detach())


def itc_hardest(anchor_emb: Tensor, pool_emb: Tensor, positives: Tensor, num_hard: int) -> Tensor:
    """[A, num_hard] pool rows most similar to each anchor, its own positive row excluded."""
    sim = anchor_emb.detach() @ pool_emb.detach().T
    sim[torch.arange(sim.shape[0], device=sim.device), positives.to(sim.device)] = -torch.inf
    return sim.topk(num_hard, dim=1).indices


def itc_mining(
    model: CrossModalModel, pool: dict, anchors: Tensor, pool_text: Tensor, pool_image: Tensor, *, anchor: str,
    num_candidates: int, num_hard: int,
) -> Tensor:
    """[A, num_hard] negatives of the ``anchors`` rows of ``pool``: the ``num_candidates`` rows most
    similar under the ITC embeddings ``pool_text`` / ``pool_image``, of which the cross-encoder keeps
    the ``num_hard`` it scores highest (all of them, unscored, when the two counts are equal)."""
    own, other = (pool_text, pool_image) if anchor == "text" else (pool_image, pool_text)
    shortlist = itc_hardest(own[anchors], other, anchors, num_candidates)
    return keep_hardest(model, pool, anchors, shortlist, anchor=anchor, num_hard=num_hard)


def mrfr_loss(model: CrossModalModel, batch: dict, prob: float, generator: torch.Generator) -> Tensor:
    """Masked region feature regression (UNITER): zero some regions' features, regress them back."""
    valid = batch["region_attention"]
    draw = torch.rand((2, *valid.shape), generator=generator).to(valid.device)  # CPU generator: same on any device
    chosen = (draw[0] < prob) & valid
    first = draw[1].masked_fill(~valid, -1).argmax(1)
    # At least one region per image: an image that drew none gets one (only then: the rate stays prob).
    chosen[torch.arange(valid.shape[0], device=valid.device), first] |= valid.any(1) & ~chosen.any(1)
    feats = batch["region_features"].masked_fill(chosen[..., None], 0.0)
    out = model(batch["text_ids"], batch["text_attention"], region_features=feats,
                region_geometry=batch["region_geometry"], region_attention=valid)
    pred = model.mrfr_predictions(out, batch["text_ids"].shape[1])
    return F.mse_loss(pred[chosen].float(), batch["region_features"][chosen].float())


def entropy_excess(rel: iais_math.RelationMatrices, ceiling: float) -> Tensor:
    """[B] the entropy guard of one IAIS layer: the mean over S_L, S_V, A_t2i, A_i2t of
    relu(H - ``ceiling``), H the mean normalised row entropy (``iais.attention_entropy``). The
    degenerate minimum of spec section 7 has every H near 1 and pays; structured attention does not."""
    total = 0.0
    for h in iais_math.attention_entropy(rel).values():
        total = total + torch.where(torch.isnan(h), 0.0, F.relu(h - ceiling))
    return total / 4


@dataclass
class GroupLoss:
    rank: Tensor  # hinge loss, scalar
    iais: Tensor  # IAIS on the positives, scalar (0 when off)
    stats: dict[str, Tensor]  # detached diagnostics of the positives
    guard: Tensor | None = None  # entropy guard on the positives, scalar (None when off)


def group_loss(
    model: CrossModalModel,
    pool: dict,
    anchors: Tensor,
    negatives: Tensor,
    *,
    anchor: str,
    margin: float,
    iais: IaisRequest | None,
    kind: str = "hinge",
    entropy_ceiling: float | None = None,
) -> GroupLoss:
    """Ranking loss of the groups [positive, negatives [A, k]...] of the pairs ``anchors`` [A], all
    rows of ``pool``. ``kind``: the reference hinge ``max(0, margin + s_neg - s_pos)`` on sigmoid
    scores, UNITER's binary cross-entropy, or the softmax cross-entropy of the positive against its
    group. ``entropy_ceiling`` adds the positives' entropy guard (``GroupLoss.guard``)."""
    b, k = negatives.shape
    own = anchors[:, None].expand(b, k + 1)
    others = torch.cat([anchors[:, None], negatives], 1)
    texts, images = (own, others) if anchor == "text" else (others, own)
    if iais is not None:
        rows = torch.arange(b, device=negatives.device) * (k + 1)
        iais = IaisRequest(rows=rows, alignment=iais.alignment, direction=iais.direction)
    out = model(**select_pairs(pool, pool, texts.reshape(-1), images.reshape(-1)), iais_request=iais)
    logits = model.itm_logit(out).view(b, k + 1)
    scores = torch.sigmoid(logits)
    if kind == "hinge":
        rank = F.relu(margin + scores[:, 1:] - scores[:, :1]).mean()
    elif kind == "bce":
        rank = 0.5 * (F.softplus(-logits[:, 0]).mean() + F.softplus(logits[:, 1:]).mean())
    else:  # "softmax": cross-entropy of the positive against its group
        rank = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=logits.device))
    stats = {"score_pos": scores[:, 0].mean().detach(), "score_neg": scores[:, 1:].mean().detach()}
    if out.iais_loss is None:
        return GroupLoss(rank, rank.new_zeros(()), stats)
    valid = model.word_mask(pool["text_ids"][anchors], pool["text_attention"][anchors]).any(1)
    if "region_attention" in pool:
        valid = valid & pool["region_attention"][anchors].any(1)
    valid = valid.float()
    iais_loss = (out.iais_loss * valid).sum() / valid.sum().clamp_min(1)
    stats["isd"] = iais_loss.detach()
    stats.update({f"entropy_{n}": v.nanmean() for n, v in out.relation_stats.items()})
    guard = None
    if entropy_ceiling is not None:
        excess = torch.stack([entropy_excess(r, entropy_ceiling) for r in out.relations]).mean(0)
        guard = (excess * valid).sum() / valid.sum().clamp_min(1)
        stats["entropy_guard"] = guard.detach()
    return GroupLoss(rank, iais_loss, stats, guard)


def mask_words(batch: dict, model: CrossModalModel, prob: float, mask_id: int, vocab_size: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking of the word positions: (masked ids, labels with -100 where not predicted)."""
    ids = batch["text_ids"]
    words = model.word_mask(ids, batch["text_attention"])
    # Drawn on the CPU from the seeded generator (the same masks on any device), then moved.
    draw = torch.rand((3, *ids.shape), generator=generator).to(ids.device)
    replacement = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    chosen = (draw[0] < prob) & words
    # Every caption predicts at least one word, so no row is wasted: a row that drew none gets one
    # (only then: the masking rate stays mlm_prob).
    first = draw[1].masked_fill(~words, -1).argmax(1)
    chosen[torch.arange(ids.shape[0], device=ids.device), first] |= words.any(1) & ~chosen.any(1)
    labels = ids.masked_fill(~chosen, -100)
    roll = draw[2]
    masked = ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    random_words = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[random_words] = replacement[random_words]
    return masked, labels


def mlm_loss(model: CrossModalModel, batch: dict, prob: float, mask_id: int, generator: torch.Generator) -> Tensor:
    """Masked language modelling of the captions, conditioned on their images."""
    masked, labels = mask_words(batch, model, prob, mask_id, model.config.vocab_size, generator)
    out = model(text_ids=masked, text_attention=batch["text_attention"], **image_tensors(batch))
    logits = model.mlm_logits(out, masked.shape[1])
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def step_tasks(cfg: ObjectiveConfig, step: int) -> list[str]:
    """The tasks trained at ``step``: MLM alone during warm-up; then one task drawn by the mixing
    ratios (UNITER), or every task with a positive weight. The draw depends on the step alone, so
    every rank trains the same task and ZeRO's gradient collectives line up."""
    if step < cfg.mlm_only_steps:
        return ["mlm"]
    if cfg.task_mix:
        names = sorted(cfg.task_mix)
        ratios = torch.tensor([cfg.task_mix[n] for n in names], dtype=torch.float)
        draw = torch.Generator().manual_seed(step)
        return [names[int(torch.multinomial(ratios, 1, generator=draw))]]
    weights = {"mlm": cfg.mlm_weight, "itm_rank": cfg.itm_rank_weight, "mrfr": cfg.mrfr_weight, "itc": cfg.itc_weight}
    return [t for t, w in weights.items() if w > 0]


def training_loss(
    model: CrossModalModel,
    batch: dict,
    cfg: ObjectiveConfig,
    *,
    step: int,
    total_steps: int,
    mask_id: int,
    generator: torch.Generator,
    group: dist.ProcessGroup | None = None,
    pool_exchange: PoolExchange = "fetch",
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """The loss of one micro-batch and its logged parts. ``group``: the data-parallel ranks of the
    global batch that ITC spans (every rank then calls this for the same steps); None: the
    micro-batch alone. ``pool_exchange``: how ITC mining gets the candidates' inputs."""
    parts: dict[str, float | Tensor] = {}
    loss = torch.zeros((), device=batch["text_ids"].device)
    tasks = step_tasks(cfg, step)
    if "mlm" in tasks:
        mlm = mlm_loss(model, batch, cfg.mlm_prob, mask_id, generator)
        loss = loss + cfg.mlm_weight * mlm
        parts["mlm"] = mlm.detach()
    if "mrfr" in tasks:
        mrfr = mrfr_loss(model, batch, cfg.mrfr_prob, generator)
        loss = loss + cfg.mrfr_weight * mrfr
        parts["mrfr"] = mrfr.detach()
    emb = None  # (text, image) ITC embeddings of the micro-batch, when computed
    gathered = None  # the same of the whole global batch, detached
    if "itc" in tasks:
        emb = model.itc_embeddings(batch)
        itc, gathered = _itc_loss(*emb, model.itc_logit_scale, group)
        loss = loss + cfg.itc_weight * itc
        parts["itc"] = itc.detach()
    if "itm_rank" not in tasks:
        return loss, parts

    ranked_steps = total_steps - cfg.mlm_only_steps
    w = iais_weight(step - cfg.mlm_only_steps, ranked_steps, cfg.iais)
    parts["iais_weight"] = w
    # Text-anchored groups (negative images) carry IAIS direction L, image-anchored groups
    # (negative texts) direction V, as in the reference fine-tuning: either alternating from step
    # to step, or both kinds in every micro-step (the authors' iteration).
    kinds = [("text", "L"), ("image", "V")]
    if cfg.group_kinds == "alternate":
        kinds = [kinds[step % 2]]
    if cfg.mining == "itc" and emb is None:
        # ITC mining without the ITC loss this step: two passes without dropout and gradient.
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                emb = model.itc_embeddings(batch)
        finally:
            model.train(was_training)
    # Every kind is mined before any group is built (mining draws no dropout, so the order is
    # immaterial): one exchange then serves both kinds.
    mined = mine_negatives(model, batch, cfg, [a for a, _ in kinds], emb, group, generator,
                           pool_exchange=pool_exchange, gathered=gathered)
    for (anchor, direction), m in zip(kinds, mined):
        if cfg.iais.direction != "alternate":
            direction = cfg.iais.direction
        request = IaisRequest(torch.empty(0), cfg.iais.alignment, direction) if cfg.iais.enabled else None
        g = group_loss(model, m.pool, m.anchors, m.negatives, anchor=anchor, margin=cfg.margin, iais=request,
                       kind=cfg.itm_rank_loss, entropy_ceiling=cfg.iais.entropy_ceiling if cfg.iais.enabled else None)
        loss = loss + cfg.itm_rank_weight * g.rank + w * g.iais
        if g.guard is not None:
            loss = loss + w * cfg.iais.entropy_guard_weight * g.guard
        for k, v in (("itm_rank", g.rank.detach()), ("iais", g.iais.detach()), *g.stats.items()):
            parts[k] = parts.get(k, 0.0) + v / len(kinds)
    return loss, parts


@dataclass
class MinedGroups:
    """The groups of one kind: ``anchors`` [A] and ``negatives`` [A, num_hard], rows of ``pool``;
    ``chosen``: the negatives as rows of the mining group's global batch (whichever exchange built
    ``pool``)."""

    anchor: str
    pool: dict
    anchors: Tensor
    negatives: Tensor
    chosen: Tensor


def mine_negatives(
    model: CrossModalModel, batch: dict, cfg: ObjectiveConfig, anchor_kinds: list[str], emb, group, generator, *,
    pool_exchange: PoolExchange = "fetch", gathered: tuple[Tensor, Tensor] | None = None,
) -> list[MinedGroups]:
    """The groups of each anchor kind (``"text"``, ``"image"``) of this micro-batch. ``mining: itc``
    ranks candidates of the rank's mining group by the ITC embeddings ``emb`` (``gathered``: those
    the ITC loss already gathered over ``group``); ``pool_exchange`` "fetch" and "all_gather" give
    the same groups, bit for bit."""
    num_anchors = cfg.anchors_per_batch or batch["text_ids"].shape[0]
    if cfg.mining != "itc":
        out = []
        for anchor in anchor_kinds:
            # separate: image-anchored groups take the next pairs of the batch, an independent draw, as
            # the authors' second (image-anchored) loader gives; shared: both kinds the same pairs.
            first = num_anchors if cfg.group_anchors == "separate" and anchor == "image" else 0
            neg = hardest_negatives(model, batch, anchor=anchor, num_candidates=cfg.num_candidates,
                                    num_hard=cfg.num_hard, generator=generator, num_anchors=num_anchors, first=first)
            anchors = torch.arange(first, first + num_anchors, device=neg.device)
            out.append(MinedGroups(anchor, batch, anchors, neg, neg))
        return out
    mgroup = mining_group(group, cfg.mining_group_size)
    b = batch["text_ids"].shape[0]
    anchors = (0 if mgroup is None else dist.get_rank(mgroup) * b) + torch.arange(num_anchors, device=emb[0].device)
    if pool_exchange == "all_gather":
        pool, _ = gather_pool(batch, mgroup)
        out = []
        for anchor in anchor_kinds:
            all_t, all_i = (gather_rows(x.detach(), mgroup, purpose="mining.embeddings") for x in emb)
            neg = itc_mining(model, pool, anchors, all_t, all_i, anchor=anchor, num_candidates=cfg.num_candidates,
                             num_hard=cfg.num_hard)
            out.append(MinedGroups(anchor, pool, anchors, neg, neg))
        return out
    if pool_exchange != "fetch":
        raise ValueError(f"pool_exchange: 'fetch' or 'all_gather' (got {pool_exchange!r})")
    if gathered is not None and mgroup is not group:  # the mining group's rows of the whole group's
        size = dist.get_world_size(mgroup)
        first = dist.get_rank(group) // size * size * b
        all_t, all_i = (x[first : first + size * b] for x in gathered)
    elif gathered is not None:
        all_t, all_i = gathered
    else:
        all_t, all_i = (gather_rows(x.detach(), mgroup, purpose="mining.embeddings") for x in emb)
    # Candidates as global rows: images of text-anchored groups, texts of image-anchored ones.
    shortlists = []
    for anchor in anchor_kinds:
        own, other = (all_t, all_i) if anchor == "text" else (all_i, all_t)
        shortlists.append(itc_hardest(own[anchors], other, anchors, cfg.num_candidates))
    none = torch.empty(0, dtype=torch.long, device=all_t.device)
    fetched = fetch_rows(
        batch,
        torch.cat([none] + [s.reshape(-1) for a, s in zip(anchor_kinds, shortlists) if a == "image"]),
        torch.cat([none] + [s.reshape(-1) for a, s in zip(anchor_kinds, shortlists) if a == "text"]),
        mgroup,
    )
    local = torch.arange(num_anchors, device=all_t.device)
    out = []
    for anchor, shortlist in zip(anchor_kinds, shortlists):
        to_local, to_global = ((fetched.image_local, fetched.image_global) if anchor == "text"
                               else (fetched.text_local, fetched.text_global))
        neg = keep_hardest(model, fetched.pool, local, to_local[shortlist], anchor=anchor, num_hard=cfg.num_hard)
        out.append(MinedGroups(anchor, fetched.pool, local, neg, to_global[neg]))
    return out
