"""Hard-negative mining: the reference's cross-encoder scoring of 399 sampled candidates vs contrastive
(ITC) ranking of the global batch, at the same step budget.

As in the paper, hard-negative fine-tuning starts from a model that already matches images and
texts: a shared "pre-training" of the tiny demo model (MLM, ranking against random negatives, ITC).
Each run then fine-tunes it for ``--steps`` steps with the same objectives (listwise ranking of groups
[positive + hardest negatives] with IAIS, plus ITC at weight 0.5, which ITC mining needs and the
cross run keeps). Each step takes ``--pool`` pairs, the first ``--anchors`` anchoring one group:
  cross:  per anchor, the cross-encoder scores ``pool - 1`` candidates (the reference: 399) without
          gradient in inference micro-batches and the ``--hard`` best (31) join the group;
  itc:    the ITC loss's text-only and image-only embeddings of the pool rank the candidates of
          every anchor at once; the ``--hard`` most similar join the group, nothing is scored;
  itc+K:  the K = ``--shortlist`` (63) most similar under ITC are scored by the cross-encoder, which
          keeps the ``--hard`` best: K instead of 399 joint passes per anchor.
Steps of every kind are then timed alternately on the same batches (whole training step, and the
mining alone), and each model's R@1 on a 300-image test split (``data/demo_mining``: the demo's
training split, a larger test split) is printed beside the starting point's. About 20 minutes on
2 CPU cores; the shared start is cached under ``runs/benchmarks/``.

    python benchmarks/mining.py [--pool 400] [--hard 31] [--shortlist 63] [--anchors 32] [--steps 100]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from pathlib import Path

import torch

from iais_scale import evaluate as ev, objectives as ob
from iais_scale.config import load_config
from iais_scale.data.collate import Collator
from iais_scale.data.demo import make_demo
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.pipeline import PairStream
from iais_scale.data.retrieval import RetrievalSet, read_split
from iais_scale.data.tokenizer import load_tokenizer
from iais_scale.engine import build_model, lr_lambda, model_config

ROOT = Path(__file__).resolve().parents[1]


def ranking_config(mining: str, candidates: int, args):
    return load_config(ROOT / "configs/demo.yaml", [
        f"data.root={args.data}", f"train.steps={args.steps}", "optim.warmup_steps=5", f"optim.lr={args.lr}",
        f"train.micro_batch_size={args.pool}", f"objectives.num_candidates={candidates}",
        f"objectives.num_hard={args.hard}", f"objectives.anchors_per_batch={args.anchors}",
        f"objectives.mining={mining}", "objectives.mlm_only_steps=0", "objectives.mlm_weight=0",
        "objectives.itc_weight=0.5", "model.itc_dim=64", "objectives.iais.schedule=constant",
    ])


def batches(args, collator: Collator, size: int, seed: int = 0):
    for batch in PairStream(Path(args.data) / "train", collator, size, seed=seed):
        batch.pop("sample_counts")
        yield batch


def pretrain(args, tok, collator) -> torch.nn.Module:
    """The shared starting point: the demo recipe (MLM warm-up, then MLM + ranking + IAIS) with random
    negatives (3 per group, nothing scored) and ITC, on micro-batches of 32."""
    cache = ROOT / "runs" / "benchmarks" / f"mining_start_{Path(args.data).name}_{args.pretrain_steps}.pt"
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.root={args.data}", f"train.steps={args.pretrain_steps}", "objectives.num_candidates=3",
        f"objectives.mlm_only_steps={args.pretrain_steps * 3 // 8}",
        "objectives.num_hard=3", "objectives.itc_weight=0.5", "model.itc_dim=64",
    ])
    torch.manual_seed(0)
    model = build_model(cfg, model_config(cfg, tok, 16))
    if cache.is_file():  # made by an earlier run with the same settings
        model.load_state_dict(torch.load(cache))
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps))
    for i, batch in enumerate(itertools.islice(batches(args, collator, 32, seed=1), cfg.train.steps)):
        step(model, opt, batch, cfg, i, tok.mask_token_id)
        sched.step()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def step(model, opt, batch, cfg, i: int, mask_id: int) -> None:
    loss, _ = ob.training_loss(model, batch, cfg.objectives, step=i, total_steps=cfg.train.steps,
                               mask_id=mask_id, generator=torch.Generator().manual_seed(i))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()


def fine_tune(name: str, mining: str, candidates: int, start: torch.nn.Module, args, tok, collator, rset) -> dict:
    cfg = ranking_config(mining, candidates, args)
    model = copy.deepcopy(start)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps))
    torch.manual_seed(args.seed)  # the same dropout stream for every kind, whichever ran before
    t0 = time.perf_counter()
    for i, batch in enumerate(itertools.islice(batches(args, collator, args.pool, args.seed), cfg.train.steps)):
        step(model, opt, batch, cfg, i, tok.mask_token_id)
        sched.step()
    seconds = time.perf_counter() - t0
    report = ev.evaluate(model, ev.EvalData(collator, rset), batch_size=2048, isd_alignments=["singular"])
    print(f"{name:6s}: {cfg.train.steps} steps in {seconds:.0f} s; TR R@1 {report['tr_r1']:.1f}, "
          f"IR R@1 {report['ir_r1']:.1f}", flush=True)
    if args.save:  # e.g. for benchmarks/rerank.py, which needs a model with ITC
        model.save_pretrained(Path(args.save) / name)
        tok.save_pretrained(Path(args.save) / name)
    return {"cfg": cfg, "train_s_per_step": seconds / cfg.train.steps, "tr_r1": report["tr_r1"],
            "ir_r1": report["ir_r1"]}


def mining_seconds(model, batch, cfg, anchor: str) -> tuple[float, float]:
    """(the mining as ``training_loss`` does it within a step, the two unimodal passes of the pool).

    The passes are timed apart: within a training step the ITC loss has made them already, so the
    mining adds only the similarity ranking and the cross-encoder's scoring of the shortlist.
    """
    o = cfg.objectives
    if o.mining == "cross":
        return timed(lambda: ob.hardest_negatives(
            model, batch, anchor=anchor, num_candidates=o.num_candidates, num_hard=o.num_hard,
            generator=torch.Generator().manual_seed(0), num_anchors=o.anchors_per_batch)), 0.0
    emb = []
    with torch.no_grad():
        passes = timed(lambda: emb.extend(model.itc_embeddings(batch)))
    anchors = torch.arange(o.anchors_per_batch or emb[0].shape[0])
    return timed(lambda: ob.itc_mining(model, batch, anchors, *emb, anchor=anchor, num_candidates=o.num_candidates,
                                       num_hard=o.num_hard)), passes


def timed(fn) -> float:
    """Seconds of ``fn()``; on a GPU the queued kernels are waited for before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def cost_per_step(model, cfgs: dict, args, tok, collator) -> dict:
    """Steps of every kind alternately on the same batches, so that machine noise hits all alike.
    Per kind: median seconds of (a training step, its mining, the ITC unimodal passes)."""
    times = {m: [] for m in cfgs}
    for i, batch in enumerate(itertools.islice(batches(args, collator, args.pool, seed=-1), args.repeats)):
        for m, cfg in cfgs.items():
            trial = copy.deepcopy(model)
            opt = torch.optim.AdamW(trial.parameters(), lr=cfg.optim.lr)
            full = timed(lambda trial=trial, opt=opt, batch=batch, i=i, cfg=cfg: step(trial, opt, batch, cfg, i, tok.mask_token_id))
            times[m].append((full, *mining_seconds(trial.eval(), batch, cfg, "text" if i % 2 == 0 else "image")))
    return {m: tuple(statistics.median(x) for x in zip(*t)) for m, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data/demo_mining"),
                    help="the demo data with a larger test split (same training split as data/demo)")
    ap.add_argument("--test-images", type=int, default=300, help="test split size when the data is made")
    ap.add_argument("--train-images", type=int, default=3000, help="training split size when the data is made")
    ap.add_argument("--pool", type=int, default=400, help="pairs per step; cross scores pool - 1 per anchor")
    ap.add_argument("--hard", type=int, default=31, help="hardest negatives per group")
    ap.add_argument("--shortlist", type=int, default=63, help="ITC shortlist the cross-encoder scores (itc+K)")
    ap.add_argument("--kinds", default="cross,itc,itc+K", help="which runs (comma-separated; cross is timed always)")
    ap.add_argument("--anchors", type=int, default=32, help="groups per step")
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps of each run")
    ap.add_argument("--lr", type=float, default=2e-4, help="fine-tuning peak learning rate")
    ap.add_argument("--pretrain-steps", type=int, default=800, help="shared pre-training steps (batch 32)")
    ap.add_argument("--seed", type=int, default=0, help="order of the fine-tuning batches (the start is shared)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed steps of each kind")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="save the fine-tuned models (HF folders) under this folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    make_demo(args.data, n_train=args.train_images, n_test=args.test_images)  # 100 test images leave R@1 noise of about 5 points
    tok = load_tokenizer(Path(args.data) / "tokenizer")
    collator = Collator(tok, 24, RegionFields(8))
    rset = RetrievalSet.from_samples(read_split(Path(args.data) / "test"))
    start = pretrain(args, tok, collator)
    report = ev.evaluate(start, ev.EvalData(collator, rset), batch_size=2048, isd_alignments=["singular"])
    print(f"start : TR R@1 {report['tr_r1']:.1f}, IR R@1 {report['ir_r1']:.1f} after {args.pretrain_steps} "
          f"pre-training steps; fine-tuning: {args.steps} steps of {args.anchors} groups from {args.pool} pairs",
          flush=True)
    kinds = {"cross": ("cross", args.pool - 1), "itc": ("itc", args.hard), f"itc+{args.shortlist}": ("itc", args.shortlist)}
    wanted = [k.replace("+K", f"+{args.shortlist}") for k in args.kinds.split(",")]
    runs = {name: fine_tune(name, m, c, start, args, tok, collator, rset) for name, (m, c) in kinds.items() if name in wanted}
    cost = cost_per_step(start, {n: ranking_config(m, c, args) for n, (m, c) in kinds.items()}, args, tok, collator)
    cs, cm, _ = cost["cross"]
    for name, (m, c) in kinds.items():
        s, mi, passes = cost[name]
        scored = f"{args.anchors} x {c} cross-encoder pairs" if c > args.hard else "no cross-encoder pair"
        line = f"{name:6s}: step {1000 * s:5.0f} ms ({cs / s:3.1f}x cheaper), mining {1000 * mi:5.0f} ms ({cm / mi:5.1f}x; {scored})"
        if m == "itc":
            line += f", +{1000 * passes:.0f} ms of unimodal passes if counted ({cm / (mi + passes):4.1f}x)"
        if name in runs and "cross" in runs:
            r, c0 = runs[name], runs["cross"]
            mean, mean0 = (r["tr_r1"] + r["ir_r1"]) / 2, (c0["tr_r1"] + c0["ir_r1"]) / 2
            line += (f"; R@1 TR {r['tr_r1']:4.1f} ({r['tr_r1'] - c0['tr_r1']:+.1f}) "
                     f"IR {r['ir_r1']:4.1f} ({r['ir_r1'] - c0['ir_r1']:+.1f}) mean {mean:5.2f} ({mean - mean0:+.2f})")
        print(line)
    print(f"(medians of {args.repeats} alternating timed steps of groups of 1 + {args.hard}, {args.pool} pairs each; "
          f"the ITC loss computes the unimodal passes within a step anyway)")


if __name__ == "__main__":
    main()
