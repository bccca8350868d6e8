"""Hard-negative mining and the ranking/ITC losses, on one process and across 2 gloo ranks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import B, make_batch, make_model
from transformers import AutoTokenizer

from iais_scale import objectives as ob
from iais_scale.config import IaisConfig, ObjectiveConfig
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest


@pytest.fixture(scope="module")
def setup(tiny_demo):
    tok = AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))
    batch = make_batch(tiny_demo, slice(0, 2 * B))
    return make_model(tok, batch["region_features"].shape[-1]), batch


def all_scores(model, batch, anchors: torch.Tensor, anchor: str) -> torch.Tensor:
    """[A, n] cross-encoder logits of each anchor against every row of the batch, scored here."""
    n = batch["text_ids"].shape[0]
    own, other = anchors.repeat_interleave(n), torch.arange(n).repeat(anchors.numel())
    texts, images = (own, other) if anchor == "text" else (other, own)
    with torch.no_grad():
        model.eval()
        return ob.score_candidates(model, batch, texts, images, 64).view(anchors.numel(), n)


@pytest.mark.parametrize("mining", ["cross", "itc"])
@pytest.mark.parametrize("anchor", ["text", "image"])
def test_mining_keeps_the_hardest_candidates_and_never_the_positive(setup, monkeypatch, mining, anchor):
    """Properties of the groups ``mine_negatives`` builds, whatever draws the candidates: the
    candidates never hold the positive; ITC candidates are the most similar rows; the kept negatives
    are candidates that the cross-encoder scores at least as high as every candidate left out."""
    model, batch = setup
    model = sharp(model)  # scores far apart: which candidates are hardest is not decided by rounding
    seen = {}
    real = ob.keep_hardest

    def spy(model_, pool, anchors, candidates, **kw):
        seen["candidates"] = candidates.clone()
        return real(model_, pool, anchors, candidates, **kw)

    monkeypatch.setattr(ob, "keep_hardest", spy)
    cfg = ObjectiveConfig(mining=mining, num_candidates=6, num_hard=2, anchors_per_batch=5, itc_weight=1.0)
    emb = model.itc_embeddings(batch) if mining == "itc" else None
    (m,) = ob.mine_negatives(model, batch, cfg, [anchor], emb, None, torch.Generator().manual_seed(3))
    cand, kept, anchors = seen["candidates"], m.negatives, torch.arange(5)
    assert m.anchor == anchor and torch.equal(m.anchors, anchors) and kept.shape == (5, 2) and cand.shape == (5, 6)
    assert not (cand == anchors[:, None]).any() and not (kept == anchors[:, None]).any()
    assert all(len(set(row.tolist())) == len(row) for row in cand)  # distinct
    assert all(set(k.tolist()) <= set(c.tolist()) for k, c in zip(kept, cand))  # kept within the candidates
    scores = all_scores(model, batch, anchors, anchor)
    for a in range(5):
        left_out = [c for c in cand[a].tolist() if c not in kept[a].tolist()]
        assert scores[a, kept[a]].min() >= scores[a, left_out].max() - 1e-5, (a, scores[a])
    assert (scores.max(1).values - scores.min(1).values > 0.1).all()  # far from ties
    if mining == "itc":  # the shortlist: the 6 rows most similar under ITC, the positive excluded
        t, i = (x.detach() for x in emb)
        sim = (t[:5] @ i.T) if anchor == "text" else (i[:5] @ t.T)
        for a in range(5):
            others = [r for r in range(sim.shape[1]) if r != a and r not in cand[a].tolist()]
            assert sim[a, cand[a]].min() >= sim[a, others].max()


def test_cross_mining_draws_uniform_random_candidates(setup, monkeypatch):
    """Cross mining's candidates are a uniform random subset of the other pairs (never the positive),
    a new one for every draw of the generator."""
    _, batch = setup
    monkeypatch.setattr(ob, "keep_hardest", lambda model, pool, anchors, candidates, **kw: candidates)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 16)
    draws = 400
    for _ in range(draws):
        cand = ob.hardest_negatives(None, batch, anchor="text", num_candidates=6, num_hard=6, generator=g, num_anchors=3)
        counts.scatter_add_(1, cand, torch.ones_like(cand, dtype=torch.float))
    assert (counts[torch.arange(3), torch.arange(3)] == 0).all()
    others = counts[~torch.eye(3, 16, dtype=torch.bool)]
    expected = draws * 6 / 15  # 160; binomial sd ~ 9.8
    assert (others - expected).abs().max() < 45, counts


def test_keep_hardest_scores_only_when_it_must_choose(setup):
    model, batch = setup
    shortlist = torch.tensor([[4, 7, 1], [9, 2, 0]])
    assert ob.keep_hardest(None, batch, torch.tensor([3, 5]), shortlist, anchor="image", num_hard=3) is shortlist
    kept = ob.keep_hardest(model, batch, torch.tensor([3, 5]), shortlist, anchor="image", num_hard=1)
    with torch.no_grad():
        scores = ob.score_candidates(model.eval(), batch, shortlist.reshape(-1), torch.tensor([3, 3, 3, 5, 5, 5]), 64)
    assert kept.tolist() == [[shortlist[r, scores.view(2, 3)[r].argmax()].item()] for r in range(2)]


def test_itc_mining_ranks_the_whole_pool_and_skips_the_positive():
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    neg = ob.itc_hardest(emb[:3], emb, torch.arange(3), 2)
    sim = emb[:3] @ emb.T
    sim[torch.arange(3), torch.arange(3)] = -torch.inf
    assert torch.equal(neg, sim.topk(2, dim=1).indices)
    assert not (neg == torch.arange(3)[:, None]).any()


def test_group_loss_on_anchor_rows_of_a_pool_equals_the_local_batch(setup):
    model, batch = setup
    neg = torch.tensor([[3, 5], [0, 6], [1, 2]])
    req = IaisRequest(torch.empty(0), "singular", "L")
    a = ob.group_loss(model, batch, torch.arange(3), neg, anchor="text", margin=0.2, iais=req, kind="hinge")
    # The same groups as rows 8..10 of a pool whose first 8 pairs come from another rank.
    pool = {k: torch.cat([v.flip(0)[:8], v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    b = ob.group_loss(model, pool, 8 + torch.arange(3), 8 + neg, anchor="text", margin=0.2, iais=req, kind="hinge")
    torch.testing.assert_close(a.rank, b.rank)
    torch.testing.assert_close(a.iais, b.iais)
    assert a.iais > 0


def _rank_worker(rank: int, world: int, init: str, tiny_demo, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tok = AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))
        batch = make_batch(tiny_demo, slice(rank * B, (rank + 1) * B))
        model = make_model(tok, batch["region_features"].shape[-1])
        pool, offset = ob.gather_pool(batch, dist.group.WORLD)
        cfg = ObjectiveConfig(mining="itc", num_candidates=6, num_hard=3, itc_weight=0.5, mlm_weight=0.0,
                              itm_rank_loss="softmax")
        loss, parts = ob.training_loss(model, batch, cfg, step=0, total_steps=10, mask_id=tok.mask_token_id,
                                       generator=torch.Generator().manual_seed(0), group=dist.group.WORLD)
        model.zero_grad()
        ob.itc_loss(*model.itc_embeddings(batch), model.itc_logit_scale, dist.group.WORLD).backward()
        itc_grad = model.itc_text_proj.weight.grad.clone()
        out[rank] = {"offset": offset, "local_len": batch["text_ids"].shape[1], "itc_grad": itc_grad, "pool": {k: v for k, v in pool.items() if isinstance(v, torch.Tensor)},
                     "loss": loss.detach(), "itm_rank": parts["itm_rank"], "itc": parts["itc"]}
    finally:
        dist.destroy_process_group()


def test_itc_mining_and_loss_span_the_global_batch_of_two_ranks(setup, tiny_demo, tmp_path):
    """Two gloo ranks with 8 pairs each give, on average, the loss of one process holding all 16:
    the pool is gathered (and re-padded) exactly; the ITC shortlist of 6, the cross-encoder's choice
    of 3 among them and the ITC loss all see every rank's pairs."""
    model, batch = setup
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", tiny_demo, out), nprocs=2, join=True)
    assert out[0]["offset"] == 0 and out[1]["offset"] == B
    assert out[0]["local_len"] > out[1]["local_len"]  # the gather had to re-pad rank 1's texts
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(out[0]["pool"][k], v) and torch.equal(out[1]["pool"][k], v), k

    cfg = ObjectiveConfig(mining="itc", num_candidates=6, num_hard=3, itc_weight=0.5, mlm_weight=0.0,
                          itm_rank_loss="softmax")
    loss, parts = ob.training_loss(model, batch, cfg, step=0, total_steps=10, mask_id=0,
                                   generator=torch.Generator().manual_seed(0))
    for key, whole in (("itm_rank", parts["itm_rank"]), ("itc", parts["itc"])):
        torch.testing.assert_close((out[0][key] + out[1][key]) / 2, whole, rtol=1e-5, atol=1e-6)
    # The ranks' average gradient of their ITC losses is the gradient of the global batch's InfoNCE.
    model.zero_grad()
    ob.itc_loss(*model.itc_embeddings(batch), model.itc_logit_scale).backward()
    torch.testing.assert_close((out[0]["itc_grad"] + out[1]["itc_grad"]) / 2, model.itc_text_proj.weight.grad,
                               rtol=1e-4, atol=1e-6)
    # The local pool alone gives another loss: the other rank's pairs did take part.
    alone, _ = ob.training_loss(model, {k: v[:B] if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                                cfg, step=0, total_steps=10, mask_id=0, generator=torch.Generator().manual_seed(0))
    assert not torch.isclose(alone.detach(), out[0]["loss"], rtol=1e-4)


# --------------------------------------------------------------------------- rank losses by hand


class TableModel:
    """A stand-in encoder: the ITM logit of pair (text t, image i) is ``table[t, i]`` (rows of the pool
    carry their index in ``text_ids[:, 0]`` and ``region_features[:, 0, 0]``)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, text_ids, text_attention, region_features, region_geometry, region_attention,
                 iais_request=None):
        return SimpleNamespace(logits=self.table[text_ids[:, 0], region_features[:, 0, 0].long()], iais_loss=None)

    def itm_logit(self, out):
        return out.logits


def table_pool(n: int) -> dict:
    return {"text_ids": torch.arange(n)[:, None], "text_attention": torch.ones(n, 1, dtype=torch.bool),
            "region_features": torch.arange(n, dtype=torch.float)[:, None, None],
            "region_geometry": torch.zeros(n, 1, 7), "region_attention": torch.ones(n, 1, dtype=torch.bool)}


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("anchor", ["text", "image"])
@pytest.mark.parametrize("kind", ["hinge", "bce", "softmax"])
def test_rank_losses_on_hand_made_logits(anchor, kind):
    table = torch.tensor([[2.0, 0.5, 1.9], [-1.0, 0.3, 0.1], [0.4, -2.0, 1.0]])
    negatives = torch.tensor([[1, 2], [2, 0]])
    g = ob.group_loss(TableModel(table), table_pool(3), torch.tensor([0, 1]), negatives, anchor=anchor, margin=0.2,
                      iais=None, kind=kind)
    t = table.tolist()
    logit = (lambda a, c: t[a][c]) if anchor == "text" else (lambda a, c: t[c][a])  # (anchor, candidate)
    groups = [(logit(a, a), [logit(a, c) for c in negatives[a].tolist()]) for a in (0, 1)]
    if kind == "hinge":  # max(0, 0.2 + s_neg - s_pos) on sigmoid scores, averaged
        want = sum(max(0.0, 0.2 + _sig(n) - _sig(p)) for p, ns in groups for n in ns) / 4
    elif kind == "bce":  # positives and negatives weighted equally
        pos = sum(-math.log(_sig(p)) for p, _ in groups) / 2
        neg = sum(-math.log(1 - _sig(n)) for _, ns in groups for n in ns) / 4
        want = 0.5 * (pos + neg)
    else:  # cross-entropy of the positive against its group
        want = sum(math.log(sum(math.exp(x) for x in [p, *ns])) - p for p, ns in groups) / 2
    assert g.rank.item() == pytest.approx(want, rel=1e-6)
    assert want > 0.01
    assert g.stats["score_pos"].item() == pytest.approx((_sig(groups[0][0]) + _sig(groups[1][0])) / 2, rel=1e-6)


# --------------------------------------------------------------------------- IAIS in the loss


def test_iais_is_computed_on_the_positives_only(setup):
    """The group's IAIS term is the mean IAIS of the matched pairs (anchor, anchor), whatever the
    negatives; the pairs (anchor, negative) never enter it."""
    model, batch = setup
    model = sharp(model)
    anchors = torch.arange(4)
    for anchor, direction in (("text", "L"), ("image", "V")):
        req = IaisRequest(torch.empty(0), "singular", direction)
        a = ob.group_loss(model, batch, anchors, torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]]), anchor=anchor,
                          margin=0.2, iais=req)
        b = ob.group_loss(model, batch, anchors, torch.tensor([[13, 2], [0, 14], [15, 1], [3, 6]]), anchor=anchor,
                          margin=0.2, iais=req)
        torch.testing.assert_close(a.iais, b.iais)
        assert a.iais > 0.05 and not torch.isclose(a.rank, b.rank)
        positives = ob.select_pairs(batch, batch, anchors, anchors)
        per_pair = model(**positives, iais_request=IaisRequest(torch.arange(4), "singular", direction)).iais_loss
        torch.testing.assert_close(a.iais, per_pair.mean())
        negative_pairs = ob.select_pairs(batch, batch, anchors, torch.tensor([5, 7, 9, 11]))
        wrong = model(**negative_pairs, iais_request=IaisRequest(torch.arange(4), "singular", direction)).iais_loss
        assert not torch.isclose(a.iais, wrong.mean())


def sharp(model: CrossModalModel) -> CrossModalModel:
    """The model with weights drawn 10x wider: attention far from uniform, IAIS well above 0."""
    torch.manual_seed(5)
    m = CrossModalModel(CrossModalConfig(**{**model.config.to_dict(), "initializer_range": 0.2}))
    return m.eval()


def test_iais_over_several_layers_is_their_mean(setup):
    model, batch = setup
    model = sharp(model)
    pairs = ob.select_pairs(batch, batch, torch.arange(6), torch.arange(6))
    req = IaisRequest(torch.arange(6), "distributed", "both")

    def with_layers(layers):
        m = CrossModalModel(CrossModalConfig(**{**model.config.to_dict(), "iais_layers": layers}))
        m.load_state_dict(model.state_dict())
        return m.eval()(**pairs, iais_request=req).iais_loss

    first, last, both = with_layers([0]), with_layers([-1]), with_layers([0, -1])
    assert not torch.allclose(first, last)
    torch.testing.assert_close(both, (first + last) / 2)


@pytest.mark.parametrize("schedule, at", [
    ("constant", lambda t: 1.0), ("linear", lambda t: t), ("exp", lambda t: math.exp(5 * (t - 1))),
    ("log", lambda t: 1 - math.exp(-5 * t)),
])
def test_iais_weight_schedules(schedule, at):
    cfg = IaisConfig(schedule=schedule, weight=8.0)
    for step, t in ((0, 0.0), (250, 0.25), (500, 0.5), (1000, 1.0), (1500, 1.0)):
        assert ob.iais_weight(step, 1000, cfg) == pytest.approx(8.0 * at(t), rel=1e-12, abs=1e-15), step
    assert ob.iais_weight(500, 1000, IaisConfig(schedule=schedule, enabled=False)) == 0.0
    assert ob.iais_weight(0, 1000, IaisConfig(schedule="exp")) == pytest.approx(math.exp(-5))


def test_the_iais_schedule_starts_after_the_mlm_warm_up(setup):
    """With 4 MLM-only steps of 10, ranking step s sits at t = (s - 4) / 6 of the ranking steps."""
    model, batch = setup
    cfg = ObjectiveConfig(mlm_only_steps=4, num_candidates=3, num_hard=2, anchors_per_batch=2,
                          iais=IaisConfig(schedule="exp", weight=2.0))
    for step in (0, 3):
        _, parts = ob.training_loss(model, batch, cfg, step=step, total_steps=10, mask_id=1,
                                    generator=torch.Generator().manual_seed(0))
        assert set(parts) == {"mlm"}
    for step, t in ((4, 0.0), (7, 0.5), (10, 1.0)):
        _, parts = ob.training_loss(model, batch, cfg, step=step, total_steps=10, mask_id=1,
                                    generator=torch.Generator().manual_seed(0))
        assert parts["iais_weight"] == pytest.approx(2.0 * math.exp(5 * (t - 1)), rel=1e-12), step


@pytest.mark.parametrize("group_kinds", ["alternate", "both"])
def test_group_kinds_alternate_with_the_step_parity(setup, monkeypatch, group_kinds):
    """alternate: even steps text-anchored groups with IAIS L, odd steps image-anchored with V;
    both: the two kinds every step. An explicit iais.direction overrides L/V."""
    model, batch = setup
    calls = []
    real = ob.group_loss

    def spy(model_, pool, anchors, negatives, *, anchor, iais, **kw):
        calls.append((anchor, iais.direction))
        return real(model_, pool, anchors, negatives, anchor=anchor, iais=iais, **kw)

    monkeypatch.setattr(ob, "group_loss", spy)
    for direction in ("alternate", "both"):
        cfg = ObjectiveConfig(mlm_weight=0.0, num_candidates=3, num_hard=2, anchors_per_batch=2,
                              group_kinds=group_kinds, iais=IaisConfig(direction=direction))
        for step in range(4):
            calls.clear()
            ob.training_loss(model, batch, cfg, step=step, total_steps=10, mask_id=1,
                             generator=torch.Generator().manual_seed(step))
            kinds = [("text", "L"), ("image", "V")]
            if group_kinds == "alternate":
                kinds = [kinds[step % 2]]
            if direction == "both":
                kinds = [(a, "both") for a, _ in kinds]
            assert calls == kinds, (step, direction)


@pytest.mark.parametrize("group_anchors", ["shared", "separate"])
def test_group_anchors_shared_or_separate(setup, group_anchors):
    """separate (the authors' two loaders): the image-anchored groups are anchored at the next
    anchors_per_batch pairs, independent of the text-anchored ones; their candidates never hold
    their own positive. shared: both kinds anchored at the first pairs."""
    model, batch = setup
    cfg = ObjectiveConfig(mlm_weight=0.0, num_candidates=4, num_hard=2, anchors_per_batch=2, group_kinds="both",
                          group_anchors=group_anchors)
    text, image = ob.mine_negatives(model, batch, cfg, ["text", "image"], None, None, torch.Generator().manual_seed(0))
    first = 2 if group_anchors == "separate" else 0
    assert torch.equal(text.anchors, torch.arange(2)) and torch.equal(image.anchors, torch.arange(first, first + 2))
    assert not (image.negatives == image.anchors[:, None]).any() and not (text.negatives == text.anchors[:, None]).any()
    loss, parts = ob.training_loss(model, batch, cfg, step=0, total_steps=10, mask_id=1,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and parts["itm_rank"] > 0


# --------------------------------------------------------------------------- MLM, MRFR, task mixing


def test_mlm_masks_15_percent_of_the_words_80_10_10(setup):
    model, _ = setup
    cfg = model.config
    rows, length, vocab, mask_id = 2000, 22, cfg.vocab_size, 7
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (rows, length), generator=g)
    ids[:, 0], ids[:, 20], ids[:, 21] = cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id
    attention = torch.ones(rows, length, dtype=torch.bool)
    attention[:, 21] = False
    masked, labels = ob.mask_words({"text_ids": ids, "text_attention": attention}, model, 0.15, mask_id, vocab,
                                   torch.Generator().manual_seed(2))
    chosen = labels != -100
    assert not chosen[:, [0, 20, 21]].any()  # never [CLS], [SEP] or padding
    assert chosen.any(1).all()  # every caption predicts at least one word
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    words = 19
    # 15% of the words, plus one forced word in the rows that drew none: 0.15 + 0.85^19 per row / 19.
    want = 0.15 + 0.85**words / words
    assert chosen.float().sum() / (rows * words) == pytest.approx(want, abs=0.006)
    n = chosen.sum().item()
    as_mask = (masked[chosen] == mask_id).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n  # 10% kept, plus random draws of the same word
    replaced = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.015)
    assert kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.012)
    assert replaced == pytest.approx(0.1 - 0.1 / vocab, abs=0.012)


def test_mrfr_regresses_the_features_of_the_zeroed_regions(setup, monkeypatch):
    model, batch = setup
    model.train()
    seen = {}
    real_forward = type(model).forward

    def spy(self, *args, **kw):
        out = real_forward(self, *args, **kw)
        seen["features"], seen["out"] = kw["region_features"], out
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    batch = {k: v.repeat(20, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    p = 0.3
    loss = ob.mrfr_loss(model, batch, p, torch.Generator().manual_seed(0))
    valid, original = batch["region_attention"], batch["region_features"]
    zeroed = (seen["features"] == 0).all(-1) & valid
    assert zeroed.any(1)[valid.any(1)].all()  # at least one region per image
    assert torch.equal(seen["features"][~zeroed], original[~zeroed])  # the others untouched
    # Each valid region with probability p; an image that drew none gets one: p V + (1 - p)^V per image.
    n = valid.sum(1).float()
    want = (p * n + (1 - p) ** n).sum() / n.sum()
    assert (zeroed.sum() / valid.sum()).item() == pytest.approx(want.item(), abs=0.025)
    pred = model.mrfr_predictions(seen["out"], batch["text_ids"].shape[1])
    want = sum(((pred[b, r] - original[b, r]) ** 2).mean() for b, r in zeroed.nonzero().tolist()) / zeroed.sum()
    torch.testing.assert_close(loss, want)
    model.zero_grad()
    loss.backward()
    assert model.mrfr.bias.grad.abs().sum() > 0 and model.region_embeddings.feature_linear.weight.grad.abs().sum() > 0


def test_task_mixing_depends_on_the_step_alone():
    """Every rank must train the same task at the same step (ZeRO's collectives line up): the draw
    ignores every RNG state and follows the ratios."""
    cfg = ObjectiveConfig(task_mix={"mlm": 3.0, "itm_rank": 2.0, "mrfr": 2.0, "itc": 1.0}, mlm_only_steps=5)
    torch.manual_seed(0)
    first = [ob.step_tasks(cfg, s) for s in range(4000)]
    torch.manual_seed(123)
    torch.rand(7)
    import random
    random.seed(9)
    assert [ob.step_tasks(cfg, s) for s in range(4000)] == first
    assert first[:5] == [["mlm"]] * 5 and all(len(t) == 1 for t in first)
    counts = {name: sum(t == [name] for t in first[5:]) / 3995 for name in cfg.task_mix}
    for name, ratio in cfg.task_mix.items():
        assert counts[name] == pytest.approx(ratio / 8, abs=0.03), counts
    mixed = ObjectiveConfig(mlm_weight=1.0, itm_rank_weight=1.0, mrfr_weight=0.5, itc_weight=0.0)
    assert ob.step_tasks(mixed, 10) == ["mlm", "itm_rank", "mrfr"]
