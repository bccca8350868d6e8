"""Training objectives: ranking with hard-negative groups plus IAIS (spec section 5), and MLM.

A batch holds B matched pairs (text i belongs to image i). Ranking builds, for every anchor, a group
of its positive and its hardest negatives: the cross-encoder scores candidates without gradient and
keeps the highest. The candidates are random pairs of the micro-batch (``mining: cross``, the
reference) or the pairs of the whole global batch most similar under the contrastive (ITC) embeddings
of unimodal passes (``mining: itc``; with ``num_hard == num_candidates`` they are the negatives and
the cross-encoder scores nothing). Text-anchored groups (negative images) carry IAIS direction L,
image-anchored groups
(negative texts) direction V, as the reference fine-tuning alternates them. IAIS is computed on the
positive row of each group only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor

from .config import IaisConfig, ObjectiveConfig
from .model import CrossModalModel, IaisRequest
from .model.encoder import image_tensors, select_pairs


def iais_weight(step: int, total: int, cfg: IaisConfig) -> float:
    """``weight * schedule(t / T)``; exp is the reference ``exp(5 (t/T - 1))``, rising from e^-5 to 1."""
    if not cfg.enabled:
        return 0.0
    t = min(max(step / max(total, 1), 0.0), 1.0)
    schedule = {
        "constant": 1.0,
        "linear": t,
        "exp": math.exp(5.0 * (t - 1.0)),
        "log": math.log1p((math.e - 1.0) * t),  # concave, 0 -> 1
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
    """[A, num_hard] the ``candidates`` [A, C] (rows of ``pool``) that the cross-encoder scores
    highest against each anchor row, scored without gradient and without dropout. With
    ``num_hard == C`` all are kept and nothing is scored.

    ``anchor="text"``: candidates are negative images for each text; ``"image"``: negative texts.
    """
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
    chunk: int = 1024,
) -> Tensor:
    """The reference mining: [A, num_hard] indices of the hardest of ``num_candidates`` random
    in-batch negatives for each of the first A = ``num_anchors`` pairs (all by default)."""
    b = batch["text_ids"].shape[0]
    a = num_anchors or b
    noise = torch.rand(a, b, generator=generator)
    noise[torch.arange(a), torch.arange(a)] = -1.0  # never the positive itself
    candidates = noise.topk(num_candidates, dim=1).indices  # a uniform random subset per anchor
    return keep_hardest(model, batch, torch.arange(a), candidates, anchor=anchor, num_hard=num_hard, chunk=chunk)


def gather_pool(batch: dict, group: dist.ProcessGroup | None) -> tuple[dict, int]:
    """The global batch: every rank's pairs concatenated in rank order, and this rank's offset in it.

    Texts and region sets are padded to the longest on any rank (ids 0, attention off), so that a
    rank can pair its anchors with any pair of the global batch. ``group=None``: the batch itself.
    """
    if group is None or dist.get_world_size(group) == 1:
        return batch, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pool = {}
    for k, v in batch.items():
        if not isinstance(v, Tensor):
            continue
        shape = torch.tensor(v.shape[1:2] if v.dim() > 1 else [0])
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)  # the padded length
        if v.dim() > 1 and v.shape[1] < int(shape[0]) and k != "pixel_values":
            v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, int(shape[0]) - v.shape[1]))
        wire = v.to(torch.uint8) if v.dtype == torch.bool else v  # gloo gathers no bool
        parts = [torch.empty_like(wire) for _ in range(world)]
        dist.all_gather(parts, wire.contiguous(), group=group)
        pool[k] = torch.cat(parts).to(v.dtype)
    return pool, rank * batch["text_ids"].shape[0]


def gather_rows(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's rows of ``x`` in rank order. Differentiable: the gradient of each row flows back
    to the rank that computed it (pass ``x.detach()`` when none is needed)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)
    return torch.cat(dist_nn.all_gather(x, group=group))


def itc_loss(text: Tensor, image: Tensor, logit_scale: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP/ALBEF) of this rank's pairs against the whole global batch.

    As OpenCLIP's ``local_loss`` with ``gather_with_grad``: each rank scores its own rows against
    every rank's, gradients flow back through the gather, and DeepSpeed's gradient average over the
    ranks is then exactly the gradient of the InfoNCE of the whole global batch.
    """
    all_t, all_i = gather_rows(text, group), gather_rows(image, group)
    offset = 0 if group is None else dist.get_rank(group) * text.shape[0]
    target = offset + torch.arange(text.shape[0])
    scale = logit_scale.exp().clamp(max=100)
    return 0.5 * (F.cross_entropy(scale * text @ all_i.T, target) + F.cross_entropy(scale * image @ all_t.T, target))


def itc_hardest(anchor_emb: Tensor, pool_emb: Tensor, positives: Tensor, num_hard: int) -> Tensor:
    """[A, num_hard] pool rows most similar to each anchor, its own positive row excluded.

    The ITC alternative to cross-encoder mining: one unimodal pass per pair of the pool serves every
    anchor, where the cross-encoder needs a joint pass per (anchor, candidate).
    """
    sim = anchor_emb.detach() @ pool_emb.detach().T
    sim[torch.arange(sim.shape[0]), positives] = -torch.inf
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
    chosen = (torch.rand(valid.shape, generator=generator) < prob) & valid
    first = torch.rand(valid.shape, generator=generator).masked_fill(~valid, -1).argmax(1)
    chosen[torch.arange(valid.shape[0]), first] |= valid.any(1)  # at least one region per image
    feats = batch["region_features"].masked_fill(chosen[..., None], 0.0)
    out = model(batch["text_ids"], batch["text_attention"], feats, batch["region_geometry"], valid)
    pred = model.mrfr_predictions(out, batch["text_ids"].shape[1])
    return F.mse_loss(pred[chosen].float(), batch["region_features"][chosen].float())


@dataclass
class GroupLoss:
    rank: Tensor  # hinge loss, scalar
    iais: Tensor  # IAIS on the positives, scalar (0 when off)
    stats: dict[str, Tensor]  # detached diagnostics of the positives


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
) -> GroupLoss:
    """Ranking loss of groups [positive, negatives...] for the pairs ``anchors`` [A] of ``pool``
    (rows of the micro-batch, or of the global batch), negatives [A, k] being rows of ``pool``.

    ``kind``: the reference hinge ``max(0, margin + s_neg - s_pos)`` on sigmoid scores; binary
    cross-entropy (UNITER's ITM), positives and negatives weighted equally; or the softmax
    cross-entropy of the positive against its group (a listwise loss with a stronger gradient on
    hard groups)."""
    b, k = negatives.shape
    own = anchors[:, None].expand(b, k + 1)
    others = torch.cat([anchors[:, None], negatives], 1)
    texts, images = (own, others) if anchor == "text" else (others, own)
    if iais is not None:
        iais = IaisRequest(rows=torch.arange(b) * (k + 1), alignment=iais.alignment, direction=iais.direction)
    out = model(**select_pairs(pool, pool, texts.reshape(-1), images.reshape(-1)), iais_request=iais)
    logits = model.itm_logit(out).view(b, k + 1)
    scores = torch.sigmoid(logits)
    if kind == "hinge":
        rank = F.relu(margin + scores[:, 1:] - scores[:, :1]).mean()
    elif kind == "bce":
        rank = 0.5 * (F.softplus(-logits[:, 0]).mean() + F.softplus(logits[:, 1:]).mean())
    else:  # "softmax": cross-entropy of the positive against its group
        rank = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
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
    return GroupLoss(rank, iais_loss, stats)


def mask_words(batch: dict, model: CrossModalModel, prob: float, mask_id: int, vocab_size: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking of the word positions: (masked ids, labels with -100 where not predicted)."""
    ids = batch["text_ids"]
    words = model.word_mask(ids, batch["text_attention"])
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & words
    # Every caption predicts at least one word, so no row is wasted.
    first = torch.rand(ids.shape, generator=generator).masked_fill(~words, -1).argmax(1)
    chosen[torch.arange(ids.shape[0]), first] |= words.any(1)
    labels = ids.masked_fill(~chosen, -100)
    roll = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    random_words = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[random_words] = torch.randint(vocab_size, ids.shape, generator=generator)[random_words]
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
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """The loss of one micro-batch and its logged parts.

    ``group``: the data-parallel ranks whose micro-batches form the global batch (ITC loss and ITC
    mining span it; every rank must then call this for the same steps, as the equal batch counts of
    ``data.pipeline`` and ``step_tasks`` ensure). ``None``: the micro-batch alone.
    """
    parts: dict[str, float | Tensor] = {}
    loss = torch.zeros(())
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
    if "itc" in tasks:
        emb = model.itc_embeddings(batch)
        itc = itc_loss(*emb, model.itc_logit_scale, group)
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
    pool = None
    for anchor, direction in kinds:
        if cfg.iais.direction != "alternate":
            direction = cfg.iais.direction
        request = IaisRequest(torch.empty(0), cfg.iais.alignment, direction) if cfg.iais.enabled else None
        pool, anchors, negatives = _mine(model, batch, cfg, anchor, emb, group, generator, pool)
        g = group_loss(model, pool, anchors, negatives, anchor=anchor, margin=cfg.margin, iais=request,
                       kind=cfg.itm_rank_loss)
        loss = loss + cfg.itm_rank_weight * g.rank + w * g.iais
        for k, v in (("itm_rank", g.rank.detach()), ("iais", g.iais.detach()), *g.stats.items()):
            parts[k] = parts.get(k, 0.0) + v / len(kinds)
    return loss, parts


def _mine(model: CrossModalModel, batch: dict, cfg: ObjectiveConfig, anchor: str, emb, group, generator,
          pool: dict | None) -> tuple[dict, Tensor, Tensor]:
    """(pool, anchor rows, [A, num_hard] negative rows) of one group kind."""
    num_anchors = cfg.anchors_per_batch or batch["text_ids"].shape[0]
    if cfg.mining == "itc":
        # Candidates: the num_candidates pairs of the whole global batch most similar under ITC (the
        # cross-encoder then keeps the num_hard it scores highest, unless all are kept).
        offset = (dist.get_rank(group) * batch["text_ids"].shape[0]) if group is not None else 0
        if pool is None:
            pool, offset = gather_pool(batch, group)
        anchors = offset + torch.arange(num_anchors)
        negatives = itc_mining(
            model, pool, anchors, gather_rows(emb[0].detach(), group), gather_rows(emb[1].detach(), group),
            anchor=anchor, num_candidates=cfg.num_candidates, num_hard=cfg.num_hard,
        )
        return pool, anchors, negatives
    negatives = hardest_negatives(model, batch, anchor=anchor, num_candidates=cfg.num_candidates,
                                  num_hard=cfg.num_hard, generator=generator, num_anchors=num_anchors)
    return batch, torch.arange(num_anchors), negatives
