"""Hard-negative mining and the ranking/ITC losses, on one process and across 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from iais_scale import objectives as ob
from iais_scale.config import ObjectiveConfig
from iais_scale.data.collate import Collator
from iais_scale.data.retrieval import read_split
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest

B = 8  # pairs per rank in the 2-rank test


def make_model(tokenizer, feature_dim: int) -> CrossModalModel:
    torch.manual_seed(0)
    return CrossModalModel(CrossModalConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=feature_dim, iais_layers=[-1], itc_dim=16, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def make_batch(tiny_demo, rows: slice) -> dict:
    tok = AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))
    samples = read_split(tiny_demo / "train", max_regions=8)[rows]
    # Caption lengths and region counts differ between the halves, so the ranks pad differently.
    items = [(s, s.captions[0] + " and more words here" if i == 2 else s.captions[0]) for i, s in enumerate(samples, rows.start)]
    return Collator(tok, 24, 8).pairs(items)


@pytest.fixture(scope="module")
def setup(tiny_demo):
    tok = AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))
    batch = make_batch(tiny_demo, slice(0, 2 * B))
    return make_model(tok, batch["region_features"].shape[-1]), batch


def test_cross_mining_keeps_the_top_scored_candidates_and_never_the_positive(setup):
    model, batch = setup
    g = torch.Generator().manual_seed(0)
    neg = ob.hardest_negatives(model, batch, anchor="text", num_candidates=6, num_hard=2, generator=g, num_anchors=5)
    assert neg.shape == (5, 2) and not (neg == torch.arange(5)[:, None]).any()
    # Every kept negative scores at least as high as every candidate it beat: recompute all 16 images.
    n = batch["text_ids"].shape[0]
    with torch.no_grad():
        model.eval()
        all_scores = ob.score_candidates(model, batch, torch.arange(5).repeat_interleave(n), torch.arange(n).repeat(5), 64)
    all_scores = all_scores.view(5, n)
    g.manual_seed(0)
    noise = torch.rand(5, n, generator=g)
    noise[torch.arange(5), torch.arange(5)] = -1.0
    candidates = noise.topk(6, dim=1).indices
    expected = candidates.gather(1, all_scores.gather(1, candidates).topk(2, dim=1).indices)
    assert torch.equal(neg, expected)


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
