"""ITC mining across ranks moves only the chosen rows (``objectives.fetch_rows``): on 2, 3 and 4 gloo
ranks its negatives, group losses and gradients equal those of the all-gather reference
(``gather_pool``) bit for bit, and those of one process holding the whole global batch (or the
mining group's batch, with ``mining_group_size``) up to float rounding."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import B, make_batch, make_model  # the same tiny model and uneven micro-batches
from transformers import AutoTokenizer

from iais_scale import objectives as ob
from iais_scale.config import ExperimentConfig, ObjectiveConfig
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import PixelFields
from iais_scale.data.transforms import ImageTransform


def cases(world: int) -> dict[str, ObjectiveConfig]:
    """Pure ITC (candidates = negatives) and an ITC shortlist re-scored by the cross-encoder, text-
    and image-anchored groups in the same step, over the whole world and over smaller mining groups
    (with the ITC loss, whose gathered embeddings are sliced, and without it)."""
    common = dict(mining="itc", mlm_weight=0.0, itm_rank_loss="softmax", group_kinds="both")
    small = world // 2 if world % 2 == 0 else 1
    return {
        "itc": ObjectiveConfig(num_candidates=3, num_hard=3, itc_weight=0.5, **common),
        "shortlist": ObjectiveConfig(num_candidates=6, num_hard=2, itc_weight=0.5, **common),
        "anchors": ObjectiveConfig(num_candidates=5, num_hard=2, itc_weight=0.5, anchors_per_batch=3,
                                   **{**common, "group_kinds": "alternate"}),
        "group_itc": ObjectiveConfig(num_candidates=5, num_hard=2, itc_weight=0.5, mining_group_size=small, **common),
        "group": ObjectiveConfig(num_candidates=5, num_hard=2, itc_weight=0.0, mining_group_size=small, **common),
    }


def group_size(cfg: ObjectiveConfig, world: int) -> int:
    """Ranks per mining group."""
    return cfg.mining_group_size if 0 < cfg.mining_group_size < world else world


def run_step(model, batch, cfg, group, exchange: str, step: int = 1) -> dict:
    """One training_loss + backward; the mined groups recorded on the way."""
    mined: list = []
    real = ob.mine_negatives

    def spy(*args, **kwargs):
        mined.extend(real(*args, **kwargs))
        return mined[-len(args[3]):]

    ob.mine_negatives = spy
    try:
        model.zero_grad()
        ob.COMM.clear()
        loss, parts = ob.training_loss(model, batch, cfg, step=step, total_steps=10, mask_id=0,
                                       generator=torch.Generator().manual_seed(0), group=group,
                                       pool_exchange=exchange)
        loss.backward()
    finally:
        ob.mine_negatives = real
    return {
        "loss": loss.detach(), "itm_rank": parts["itm_rank"], "iais": parts["iais"],
        "chosen": [m.chosen.clone() for m in mined], "kinds": [m.anchor for m in mined],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "comm": dict(ob.COMM),
    }


def _worker(rank: int, world: int, init: str, tiny_demo, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tok = AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))
        batch = make_batch(tiny_demo, slice(rank * B, (rank + 1) * B))
        model = make_model(tok, batch["region_features"].shape[-1])
        res = {"text_len": batch["text_ids"].shape[1], "regions": batch["region_features"].shape[1]}
        for name, cfg in cases(world).items():
            res[name] = {ex: run_step(model, batch, cfg, dist.group.WORLD, ex) for ex in ("fetch", "all_gather")}
        res["groups_made"] = len(ob._MINING_GROUPS)
        out[rank] = res
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, tmp_path, *args) -> dict:
    out = mp.Manager().dict()
    mp.spawn(fn, args=(world, f"file://{tmp_path / 'rendezvous'}", *args, out), nprocs=world, join=True)
    return dict(out)


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fetched_rows_give_the_all_gather_groups_and_the_single_process_losses(world, tiny_demo, tokenizer, tmp_path):
    out = spawn(_worker, world, tmp_path, tiny_demo)
    assert len({out[r]["text_len"] for r in range(world)}) > 1  # the ranks pad their texts differently
    assert len({out[r]["regions"] for r in range(world)}) > 1 or world == 2  # and (mostly) their regions
    assert all(out[r]["groups_made"] == 1 for r in range(world))  # the mining groups were made once

    for name, cfg in cases(world).items():
        # 1. The fetch and the all-gather reference: the same negatives, losses and gradients, exactly.
        for r in range(world):
            fetch, ref = out[r][name]["fetch"], out[r][name]["all_gather"]
            assert fetch["kinds"] == ref["kinds"]
            for a, b in zip(fetch["chosen"], ref["chosen"], strict=True):
                assert torch.equal(a, b), (name, r)
            assert torch.equal(fetch["loss"], ref["loss"]), (name, r)
            assert fetch["grads"].keys() == ref["grads"].keys()
            for n, g in fetch["grads"].items():
                assert torch.equal(g, ref["grads"][n]), (name, r, n)
            # Only the rows the groups need moved; never more than the other ranks' pairs.
            rows = fetch["comm"].get("fetch.text_rows", 0) + fetch["comm"].get("fetch.image_rows", 0)
            assert rows <= 2 * (group_size(cfg, world) - 1) * B and (rows > 0) == (group_size(cfg, world) > 1)
            assert fetch["comm"].get("fetch.rows", 0) < ref["comm"].get("all_gather.region_features", 1)
            # The embeddings the ITC loss gathered rank the candidates: not gathered again.
            assert ("mining.embeddings" in fetch["comm"]) == (cfg.itc_weight == 0 and group_size(cfg, world) > 1)
            assert ref["comm"].get("mining.embeddings", 0) > 0 or group_size(cfg, world) == 1

        # 2. One process per mining group, holding its micro-batches collated together.
        size = group_size(cfg, world)
        for first in range(0, world, size):
            whole = make_batch(tiny_demo, slice(first * B, (first + size) * B))
            model = make_model(tokenizer, whole["region_features"].shape[-1])
            single = run_step(model, whole, cfg, None, "fetch")
            ranks = range(first, first + size)
            a = cfg.anchors_per_batch or B
            for k, kind in enumerate(single["kinds"]):
                for i, r in enumerate(ranks):
                    # The single process anchors the first anchors_per_batch pairs of its batch: the
                    # first rank's anchors. With every pair anchoring, every rank's groups are there.
                    if cfg.anchors_per_batch and i:
                        continue
                    mine = out[r][name]["fetch"]["chosen"][k]
                    assert torch.equal(single["chosen"][k][i * B : i * B + a], mine), (name, kind, r)
            if cfg.anchors_per_batch:
                continue
            for key in ("itm_rank", "iais"):
                mean = sum(out[r][name]["fetch"][key] for r in ranks) / size
                torch.testing.assert_close(mean, single[key], rtol=1e-5, atol=1e-6)
            if cfg.itc_weight and size < world:
                continue  # the ITC loss spans the world, the single process only its group
            # DeepSpeed averages the ranks' gradients: that is the single process's gradient.
            for n, g in single["grads"].items():
                avg = sum(out[r][name]["fetch"]["grads"][n] for r in ranks) / size
                torch.testing.assert_close(avg, g, rtol=1e-4, atol=1e-6, msg=f"{name} {n}")


def _fetch_worker(rank: int, world: int, init: str, out) -> None:
    """fetch_rows on synthetic region and pixel batches; requests with duplicates and own rows."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        b, length, regions = 4, 5 + rank, 3 + 2 * rank  # every rank pads to other lengths
        regions_batch = {
            "text_ids": torch.randint(1, 100, (b, length), generator=g),
            "text_attention": torch.rand(b, length, generator=g) < 0.8,
            "region_features": torch.randn(b, regions, 6, generator=g).half().float(),  # float16 numbers
            "region_geometry": torch.rand(b, regions, 7, generator=g),  # not float16 numbers
            "region_attention": torch.rand(b, regions, generator=g) < 0.7,
            "keys": [f"r{rank}-{i}" for i in range(b)],
        }
        collator = Collator(None, 8, PixelFields(ImageTransform(8)))
        pixels = [types.SimpleNamespace(pixels=np.asarray(torch.randint(0, 256, (8, 8, 3), generator=g,
                                                                          dtype=torch.uint8))) for _ in range(b)]
        pixel_batch = {"text_ids": regions_batch["text_ids"], "text_attention": regions_batch["text_attention"],
                       "pixel_values": collator.images(pixels)["pixel_values"]}
        # Rank 0's pixels are the collator's (uint8 on the wire), the others' are not (float32).
        blurred = {**pixel_batch, "pixel_values": pixel_batch["pixel_values"] + 1e-3 * rank}
        # Rows of the global batch of world x 4 pairs: some twice, some of this rank's own.
        want_t = torch.tensor([0, 0, (rank + 1) % world * b + 1, rank * b + 2, world * b - 1])
        want_i = torch.tensor([(rank + 1) % world * b + 3, 1, 1, rank * b, world * b - 2, 2 * b + 3])
        res = {}
        for name, batch in (("regions", regions_batch), ("pixels", pixel_batch), ("blurred", blurred),
                            ("nothing", regions_batch)):
            wt, wi = (want_t[:0], want_i[:0]) if name == "nothing" else (want_t, want_i)
            ob.COMM.clear()
            fetched = ob.fetch_rows(batch, wt, wi, dist.group.WORLD)
            comm = dict(ob.COMM)
            ob.COMM.clear()
            pool, _ = ob.gather_pool(batch, dist.group.WORLD)
            res[name] = {"fetched": fetched, "pool": pool, "comm": comm, "ref_comm": dict(ob.COMM), "want": (wt, wi)}
        out[rank] = res
    finally:
        dist.destroy_process_group()


def test_fetch_rows_moves_each_wanted_row_once_in_its_narrowest_exact_form(tmp_path):
    world, b = 3, 4
    out = spawn(_fetch_worker, world, tmp_path)
    for r in range(world):
        for name, res in out[r].items():
            f, pool = res["fetched"], res["pool"]
            wt, wi = res["want"]
            own = set(range(r * b, (r + 1) * b))
            # Rows arrive bit for bit as the all-gather delivers them (padded alike), own rows first.
            for keys, rows, local, glob in (
                (("text_ids", "text_attention"), wt, f.text_local, f.text_global),
                ([k for k in ("region_features", "region_geometry", "region_attention", "pixel_values") if k in pool],
                 wi, f.image_local, f.image_global),
            ):
                assert glob[:b].tolist() == sorted(own)
                assert sorted(set(glob[b:].tolist())) == glob[b:].tolist() == sorted(set(rows.tolist()) - own)
                for k in keys:
                    assert f.pool[k].dtype == pool[k].dtype and f.pool[k].shape[1:] == pool[k].shape[1:]
                    assert torch.equal(f.pool[k], pool[k][glob]), (name, k)
                    assert torch.equal(f.pool[k][local[rows]], pool[k][rows]), (name, k)
            # Bytes: counted from the received buffer; each row once, pixels as uint8 when exact.
            c = res["comm"]
            n_t, n_i = len(f.text_global) - b, len(f.image_global) - b
            assert (c["fetch.text_rows"], c["fetch.image_rows"]) == (n_t, n_i)
            text_row = pool["text_ids"].shape[1] * 9  # int64 ids + bool mask
            if name in ("regions", "nothing"):
                n, d = pool["region_features"].shape[1:]
                image_row = n * d * 2 + n * 7 * 4 + n  # float16 features, float32 geometry, bool mask
                image_bytes = n_i * image_row
            else:  # pixels: uint8 from the senders whose pixels the collator made
                owners = (f.image_global[b:] // b).tolist()
                image_bytes = sum(3 * 8 * 8 * (1 if name == "pixels" or o == 0 else 4) for o in owners)
            assert c["fetch.rows"] == n_t * text_row + image_bytes, name
            assert c["fetch.header"] == (world - 1) * 8 * (2 + 2 * len([k for k in pool]))
            assert c["fetch.ids"] == 8 * sum(
                len(set(out[q][name]["want"][0].tolist()) & own) + len(set(out[q][name]["want"][1].tolist()) & own)
                for q in range(world) if q != r)
            # The reference receives every other rank's every row.
            assert res["ref_comm"]["all_gather.rows"] == (world - 1) * b


def test_mining_group_size_is_validated():
    cfg = ExperimentConfig()
    cfg.objectives.mining_group_size = -1
    assert any("mining_group_size: must be >= 0" in p for p in cfg.validate())
    cfg.objectives.mining_group_size = 8
    assert any("mining_group_size: only used with objectives.mining 'itc'" in p for p in cfg.validate())
    cfg.objectives.mining = "itc"
    assert not any("mining_group_size" in p for p in cfg.validate())
