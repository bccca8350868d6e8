"""Training objectives: ranking with hard-negative groups plus IAIS (spec section 5), and MLM.

A batch holds B matched pairs (text i belongs to image i). Ranking builds, for every anchor, a group
of its positive and its hardest negatives among sampled candidates of the batch, scored without
gradient first. Text-anchored groups (negative images) carry IAIS direction L, image-anchored groups
(negative texts) direction V, as the reference fine-tuning alternates them. IAIS is computed on the
positive row of each group only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import IaisConfig, ObjectiveConfig
from .model import CrossModalModel, IaisRequest
from .model.encoder import IMAGE_INPUTS

TEXT_KEYS = ("text_ids", "text_attention")


def image_keys(batch: dict) -> list[str]:
    """The image inputs a batch carries: region features or pixels."""
    return [k for k in IMAGE_INPUTS if k in batch]


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


def pair_inputs(batch: dict, text_idx: Tensor, image_idx: Tensor) -> dict[str, Tensor]:
    """Model inputs for the pairs (text_idx[p], image_idx[p]) of a batch."""
    out = {k: batch[k].index_select(0, text_idx) for k in TEXT_KEYS}
    out.update({k: batch[k].index_select(0, image_idx) for k in image_keys(batch)})
    return out


@torch.no_grad()
def score_pairs(model: CrossModalModel, batch: dict, text_idx: Tensor, image_idx: Tensor, chunk: int) -> Tensor:
    """ITM logits of many pairs, in inference micro-batches of ``chunk`` pairs."""
    scores = []
    for s in range(0, text_idx.numel(), chunk):
        out = model(**pair_inputs(batch, text_idx[s : s + chunk], image_idx[s : s + chunk]))
        scores.append(model.itm_logit(out))
    return torch.cat(scores)


@torch.no_grad()
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
    """[A, num_hard] indices of the hardest of ``num_candidates`` random in-batch negatives for each
    of the first A = ``num_anchors`` pairs (all by default); the whole batch is the candidate pool.

    With ``num_hard == num_candidates`` the negatives are random and nothing is scored.
    ``anchor="text"`` mines negative images for each text, ``"image"`` negative texts for each image.
    """
    b = batch["text_ids"].shape[0]
    a = num_anchors or b
    noise = torch.rand(a, b, generator=generator)
    noise[torch.arange(a), torch.arange(a)] = -1.0  # never the positive itself
    candidates = noise.topk(num_candidates, dim=1).indices  # a uniform random subset per anchor
    if num_hard == num_candidates:  # keeping them all: plain random negatives, nothing to score
        return candidates
    anchors = torch.arange(a)[:, None].expand_as(candidates)
    texts, images = (anchors, candidates) if anchor == "text" else (candidates, anchors)
    was_training = model.training
    model.eval()  # no dropout noise in the choice of negatives
    try:
        scores = score_pairs(model, batch, texts.reshape(-1), images.reshape(-1), chunk).view(a, num_candidates)
    finally:
        model.train(was_training)
    return candidates.gather(1, scores.topk(num_hard, dim=1).indices)


@torch.no_grad()
def itc_negatives(
    model: CrossModalModel, batch: dict, *, anchor: str, num_hard: int, num_anchors: int | None = None
) -> Tensor:
    """[A, num_hard] hardest in-batch negatives of the first A pairs by contrastive similarity of
    unimodal passes.

    Two passes of B rows (text alone, image alone) replace the cross-encoder's B x num_candidates
    scoring, and every other pair of the micro-batch is a candidate.
    """
    was_training = model.training
    model.eval()
    try:
        t = model.itc_text(batch["text_ids"], batch["text_attention"])
        i = model.itc_image(**{k: batch[k] for k in image_keys(batch)})
    finally:
        model.train(was_training)
    sim = (t @ i.T if anchor == "text" else i @ t.T)[: num_anchors or t.shape[0]]
    sim.fill_diagonal_(-torch.inf)
    return sim.topk(num_hard, dim=1).indices


def itc_loss(model: CrossModalModel, batch: dict) -> Tensor:
    """Symmetric InfoNCE over the micro-batch with a learned temperature (CLIP/ALBEF)."""
    t = model.itc_text(batch["text_ids"], batch["text_attention"])
    i = model.itc_image(**{k: batch[k] for k in image_keys(batch)})
    logits = model.itc_logit_scale.exp().clamp(max=100) * t @ i.T
    target = torch.arange(t.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


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
    batch: dict,
    negatives: Tensor,
    *,
    anchor: str,
    margin: float,
    iais: IaisRequest | None,
    kind: str = "hinge",
) -> GroupLoss:
    """Ranking loss of groups [positive, negatives...]: the reference hinge
    ``max(0, margin + s_neg - s_pos)`` on sigmoid scores; binary cross-entropy (UNITER's ITM),
    positives and negatives weighted equally; or the softmax cross-entropy of the positive against
    its group (a listwise loss with a stronger gradient on hard groups)."""
    b, k = negatives.shape  # b anchors: the first b pairs of the batch
    anchors = torch.arange(b)[:, None].expand(b, k + 1)
    others = torch.cat([torch.arange(b)[:, None], negatives], 1)
    texts, images = (anchors, others) if anchor == "text" else (others, anchors)
    if iais is not None:
        iais = IaisRequest(rows=torch.arange(b) * (k + 1), alignment=iais.alignment, direction=iais.direction)
    out = model(**pair_inputs(batch, texts.reshape(-1), images.reshape(-1)), iais_request=iais)
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
    valid = model.word_mask(batch["text_ids"][:b], batch["text_attention"][:b]).any(1)
    if "region_attention" in batch:
        valid = valid & batch["region_attention"][:b].any(1)
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
    out = model(text_ids=masked, **{k: batch[k] for k in ("text_attention", *image_keys(batch))})
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
    weights = {"mlm": cfg.mlm_weight, "rank": cfg.rank_weight, "mrfr": cfg.mrfr_weight, "itc": cfg.itc_weight}
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
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """The loss of one micro-batch and its logged parts."""
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
    if "itc" in tasks:
        itc = itc_loss(model, batch)
        loss = loss + cfg.itc_weight * itc
        parts["itc"] = itc.detach()
    if "rank" not in tasks:
        return loss, parts

    ranked_steps = total_steps - cfg.mlm_only_steps
    w = iais_weight(step - cfg.mlm_only_steps, ranked_steps, cfg.iais)
    parts["iais_weight"] = w
    # As in the reference fine-tuning, steps alternate between text-anchored groups (negative
    # images, IAIS direction L) and image-anchored groups (negative texts, direction V).
    anchor, direction = ("text", "L") if step % 2 == 0 else ("image", "V")
    if cfg.iais.direction != "alternate":
        direction = cfg.iais.direction
    request = IaisRequest(torch.empty(0), cfg.iais.alignment, direction) if cfg.iais.enabled else None
    anchors = cfg.anchors_per_batch or None
    if cfg.mining == "itc":
        negatives = itc_negatives(model, batch, anchor=anchor, num_hard=cfg.num_hard, num_anchors=anchors)
    else:
        negatives = hardest_negatives(
            model, batch, anchor=anchor, num_candidates=cfg.num_candidates, num_hard=cfg.num_hard,
            generator=generator, num_anchors=anchors,
        )
    g = group_loss(model, batch, negatives, anchor=anchor, margin=cfg.margin, iais=request, kind=cfg.rank_loss)
    loss = loss + cfg.rank_weight * g.rank + w * g.iais
    parts["rank"] = g.rank.detach()
    parts["iais"] = g.iais.detach()
    parts.update(g.stats)
    return loss, parts
