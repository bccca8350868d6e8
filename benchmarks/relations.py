"""Does IAIS help relations? A grid of IAIS configurations x seeds on the relation benchmark.

Data: ``iais_scale.data.relations`` (``python -m data_tools relations``): training images in swap
pairs (the same objects, two of them trading cells; each image's captions are false of its partner),
a retrieval test split and Winoground-style relation-swap groups, relation phrases marked.

Protocol (in-process, no DeepSpeed, like ``benchmarks/mining.py``):

1. **Shared start** (as the paper fine-tunes one pretrained UNITER), made once and cached under
   ``--out``: (a) *grounding*, ``--ground-steps`` of masked-placement-word prediction alone ("a red
   circle on the [MASK]": which region a phrase names and where it is; without it these small models
   never learned relations, docs/results.md); (b) ``--pretrain-steps`` of MLM, then MLM + ranking
   against the hardest of a few random in-batch negatives, on shuffled images (a partner rarely in its
   batch), IAIS off. It knows objects and places, and relations only a little (group about 29).
2. **Fine-tuning**, per configuration and seed, the same ``--steps`` budget: batches of whole swap pairs,
   so every anchor's partner is among its candidates; the cross-encoder keeps the ``--hard``
   highest-scoring of all other pairs of the batch (the partner, once objects are known), listwise
   ranking loss, text- and image-anchored groups alternating (IAIS L and V), plus what the
   configuration adds. The budget leaves the baseline mid-range. The seed sets the batch order, the
   mining draws and dropout; seed s is the same for every configuration, so differences to the
   baseline are paired by seed.
3. **Evaluation** of each run: relation-swap text/image/group scores on every swap group (also by
   kind: argument swap, relation-word swap), the relation-word MLM probe on the swap captions (the
   relation phrase masked, the image given), R@1 both ways on the first ``--retrieval-images`` test
   images (all-pairs cross-encoder scoring is quadratic: the CPU default is a subset), and ISD
   (singular) with the normalised entropies of S_L, S_V, A_t2i and A_i2t at every layer. A run is
   **degenerate** when, at a layer that carries IAIS (the last layer for IAIS-off runs), all four
   mean entropies exceed 0.98 (spec section 7); degenerate runs are flagged and never count as wins.

Chance under a random scorer (4 i.i.d. continuous scores per group): text 1/4, image 1/4, group 1/6
(the two matched scores are the top two of four: 2! 2! / 4!). A scorer blind to the relation ties
within a group and scores 0 (ties count as failures). Probe chance: the number of masked pieces tells
the axis ("left of"/"right of" are two pieces, "above"/"below" one), so a text-only model reaches 50%.

Output (``--out``): ``relations.json`` (settings, every run, summaries), ``relations.md`` (the
table: means with 95% t-intervals over seeds, and the paired difference to the baseline),
``relations.png`` (group score per configuration with its interval). See docs/results.md.

    python benchmarks/relations.py                       # the grid, defaults sized for 2 CPU cores
    python benchmarks/relations.py --seeds 3 --configs baseline,paper --steps 100   # a quick look
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from iais_scale import evaluate as ev, objectives as ob  # noqa: E402
from iais_scale.config import load_config  # noqa: E402

# name -> overrides of the fine-tuning config (on top of ``fine_tune_overrides``). The paper's
# setting: last layer, singular, L/V alternating, exp schedule, weight 8 (the reference's effective
# 8 * w(t) relative to the rank loss averaged over a step's groups, docs/iais-spec.md section 3).
PAPER = ["objectives.iais.enabled=true", "objectives.iais.alignment=singular", "objectives.iais.direction=alternate",
         "objectives.iais.layers=[-1]", "objectives.iais.schedule=exp", "objectives.iais.weight=8.0"]
CONFIGS: dict[str, list[str]] = {
    "baseline": ["objectives.iais.enabled=false"],
    "paper": PAPER,
    "middle": [*PAPER, "objectives.iais.layers=[1,2]"],  # the middle layers of 4: token outputs feed on
    "distributed": [*PAPER, "objectives.iais.alignment=distributed"],
    "congruence": [*PAPER, "objectives.iais.alignment=congruence"],
    "baseline+mlm": ["objectives.iais.enabled=false", "objectives.mlm_weight=1.0"],
    "paper+mlm": [*PAPER, "objectives.mlm_weight=1.0"],
    "paper+guard": [*PAPER, "objectives.iais.entropy_ceiling=0.9", "objectives.iais.entropy_guard_weight=10.0"],
}
# The demo's tiny model at half width (4 layers, 4 heads, hidden 64): twice as fast on a CPU.
SMALL_MODEL = ("model.size=custom model.hidden_size=64 model.num_layers=4 model.num_heads=4 model.intermediate_size=256"
               " model.dropout=0.0")
CHANCE = {"text": 25.0, "image": 25.0, "group": 100.0 / 6}
# Two-sided 95% Student t quantiles by degrees of freedom (n - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}
SUMMARY_KEYS = ("group", "text", "image", "group_argument", "group_relation", "tr_r1", "ir_r1", "probe_swap",
                "isd_L", "isd_V", "H_S_L", "H_S_V", "H_A_t2i", "H_A_i2t", "isd_L_last", "isd_V_last",
                "H_S_L_last", "H_S_V_last", "H_A_t2i_last", "H_A_i2t_last")


def t95(df: int) -> float:
    if df < 1:
        return math.nan
    if df in _T95:
        return _T95[df]
    below = max(k for k in _T95 if k <= df)
    return _T95[below] if df <= 30 else 1.96


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (NaN values left out)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "half": math.nan, "n": 0}
    mean = statistics.fmean(v)
    half = t95(n - 1) * statistics.stdev(v) / math.sqrt(n) if n > 1 else math.nan
    low, high = (mean - half, mean + half) if n > 1 else (mean, mean)
    return {"mean": mean, "low": low, "high": high, "half": half, "n": n}


# --------------------------------------------------------------------------- settings and data


def experiment(args, overrides: list[str], steps: int, batch: int):
    """The demo config with the benchmark's data, model size and batch, plus ``overrides``."""
    return load_config(ROOT / "configs/demo.yaml", [
        f"data.root={args.data}", "data.make_demo=false", f"train.steps={steps}", f"optim.lr={args.lr}",
        f"train.micro_batch_size={batch}", f"train.deepspeed_config={ROOT / 'configs/deepspeed/zero2.json'}",
        *args.model, *overrides,
    ])


def pretrain_overrides(args) -> list[str]:
    return [f"objectives.mlm_only_steps={args.pretrain_mlm_steps}", "objectives.mlm_weight=1.0",
            f"objectives.num_candidates={args.pretrain_candidates}", f"objectives.num_hard={args.hard}",
            "objectives.iais.enabled=false", f"optim.warmup_steps={max(1, min(100, args.pretrain_steps // 10))}"]


def fine_tune_overrides(args) -> list[str]:
    return ["objectives.mlm_only_steps=0", "objectives.mlm_weight=0.0", f"objectives.num_candidates={args.batch - 1}",
            f"objectives.num_hard={args.hard}", f"optim.warmup_steps={max(1, args.steps // 10)}"]


@dataclass
class Data:
    tokenizer: object
    collator: object
    train: list  # ImageSamples, pairs adjacent
    pairs: list[list]  # the two samples of each training pair
    rset: object  # retrieval set: the first --retrieval-images test images
    swaps: list  # every swap group


def load_data(args) -> Data:
    return _load_data(args.data, args.retrieval_images)


@functools.lru_cache(maxsize=1)  # once per process: the grid's runs (and each pool worker's) share it
def _load_data(root: str, retrieval_images: int) -> Data:
    from iais_scale.data.collate import Collator
    from iais_scale.data.image_fields import RegionFields
    from iais_scale.data.retrieval import RetrievalSet, read_split, swap_groups
    from iais_scale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(root) / "tokenizer")
    collator = Collator(tok, 24, RegionFields(8))
    train = read_split(Path(root) / "train")
    by_group: dict[int, list] = {}
    for s in train:
        by_group.setdefault(s.meta["pair"]["group"], []).append(s)
    swaps = swap_groups(read_split(Path(root) / "swap"))
    rset = RetrievalSet.from_samples(read_split(Path(root) / "test", limit=retrieval_images))
    return Data(tok, collator, train, [by_group[g] for g in sorted(by_group)], rset, swaps)


def batches(data: Data, size: int, seed: int, *, keep_pairs: bool, relations: tuple[str, ...] = ()):
    """Endless training batches of ``size`` images, one caption drawn per image; with ``relations`` (caption
    kinds), each also carries ``relations``: every caption of those kinds of its images with the mask of
    their relation (or placement) word pieces, for the relation-word MLM. ``keep_pairs``: whole swap pairs (both images adjacent); else
    images shuffled one by one."""
    rng = random.Random(seed)
    while True:
        if keep_pairs:
            order = list(range(len(data.pairs)))
            rng.shuffle(order)
            half = size // 2
            chunks = [[s for g in order[k : k + half] for s in data.pairs[g]] for k in range(0, len(order) - half + 1, half)]
        else:
            order = list(data.train)
            rng.shuffle(order)
            chunks = [order[k : k + size] for k in range(0, len(order) - size + 1, size)]
        for chunk in chunks:
            picks = [rng.randrange(len(s.captions)) for s in chunk]
            batch = data.collator.pairs([(s, s.captions[j]) for s, j in zip(chunk, picks)])
            batch.pop("keys")
            if relations:
                every = [(s, j) for s in chunk for j in range(len(s.captions)) if s.meta["caption_kinds"][j] in relations]
                texts, mask = ev.relation_token_mask(data.collator, [s.captions[j] for s, j in every],
                                                     [s.meta["relation_spans"][j] for s, j in every])
                batch["relations"] = {**texts, **data.collator.images([s for s, _ in every]), "relation_mask": mask}
            yield batch


def relation_mlm_loss(model, batch: dict, mask_id: int) -> torch.Tensor:
    """Relation-word MLM (the probe's task as a loss): every relation word piece masked, predicted
    from the caption and its image."""
    mask = batch["relation_mask"]
    ids = batch["text_ids"].masked_fill(mask, mask_id)
    out = model(text_ids=ids, text_attention=batch["text_attention"], region_features=batch["region_features"],
                region_geometry=batch["region_geometry"], region_attention=batch["region_attention"])
    logits = model.mlm_logits(out, ids.shape[1])
    return torch.nn.functional.cross_entropy(logits[mask].float(), batch["text_ids"][mask])


def train(model, data: Data, cfg, *, seed: int, keep_pairs: bool, tag: str = "", relation_mlm: float = 0.0,
          objectives: bool = True, kinds: tuple[str, ...] = ("relation", "placement")) -> list[dict]:
    """``cfg.train.steps`` AdamW steps (linear warm-up and decay) of ``objectives.training_loss`` (unless
    not ``objectives``), plus ``relation_mlm`` x ``relation_mlm_loss`` (the shared start only)."""
    from iais_scale.engine import lr_lambda

    torch.manual_seed(seed)  # dropout
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps))
    log = []
    model.train()
    stream = batches(data, cfg.train.micro_batch_size, seed, keep_pairs=keep_pairs,
                     relations=kinds if relation_mlm > 0 else ())
    for i, batch in enumerate(itertools.islice(stream, cfg.train.steps)):
        relations = batch.pop("relations", None)
        loss, parts = torch.zeros(()), {}
        if objectives:
            loss, parts = ob.training_loss(model, batch, cfg.objectives, step=i, total_steps=cfg.train.steps,
                                           mask_id=data.tokenizer.mask_token_id,
                                           generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        if relation_mlm > 0:
            rel = relation_mlm_loss(model, relations, data.tokenizer.mask_token_id)
            loss = loss + relation_mlm * rel
            parts["relation_mlm"] = rel.detach()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        if (i + 1) % max(1, cfg.train.steps // 10) == 0 or i + 1 == cfg.train.steps:
            log.append({"step": i + 1, **{k: float(v) for k, v in parts.items()}})
            if tag:
                print(f"{tag} step {i + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in log[-1].items() if k != "step"),
                      flush=True)
    return log


# --------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def evaluation_layers(model, layers: list[int]):
    """Context: the relation matrices (ISD, entropies) of ``layers`` for evaluation, then restored."""
    saved = (list(model.config.iais_layers), set(model._iais_layers))
    model.config.iais_layers = list(layers)
    model._iais_layers = set(model.config.resolved_iais_layers())
    try:
        yield
    finally:
        model.config.iais_layers, model._iais_layers = saved


@torch.no_grad()
def evaluate_run(model, data: Data, iais_layers: list[int], batch_size: int) -> dict:
    n_layers = model.config.num_hidden_layers
    with evaluation_layers(model, list(range(n_layers))):
        report = ev.evaluate(model, ev.EvalData(data.collator, data.rset, data.swaps), batch_size=batch_size,
                             isd_alignments=["singular"])
    swap = report["relation_swap"]
    out = {k: swap[k] for k in ("text", "image", "group")}
    out.update({f"group_{kind}": s["group"] for kind, s in swap.get("by_kind", {}).items()})
    out["probe_swap"] = report.get("relation_mlm_swap", {}).get("accuracy", math.nan)
    out["probe_retrieval"] = report.get("relation_mlm", {}).get("accuracy", math.nan)
    out["tr_r1"], out["ir_r1"] = report["tr_r1"], report["ir_r1"]
    rel = report["relations"]
    layers = sorted({i % n_layers for i in iais_layers})
    last = n_layers - 1

    def mean_over(key: str, over: list[int]) -> float:
        return statistics.fmean(rel[f"layer{i}/{key}"]["mean"] for i in over)

    for suffix, over in (("", layers), ("_last", [last])):
        out[f"isd_L{suffix}"] = mean_over("isd_L/singular", over)
        out[f"isd_V{suffix}"] = mean_over("isd_V/singular", over)
        for name in ev.ENTROPY_NAMES:
            out[f"H_{name}{suffix}"] = mean_over(f"entropy/{name}", over)
    flat = ev.degenerate_layers({k: v for k, v in rel.items() if int(k.split("/")[0][5:]) in layers})
    out["degenerate"] = bool(flat)
    out["degenerate_layers"] = flat
    out["per_layer"] = {k: v["mean"] for k, v in rel.items()}
    return out


# --------------------------------------------------------------------------- the grid


def _settings_key(args) -> str:
    keys = ("data", "ground_steps", "ground_on", "pretrain_steps", "pretrain_mlm_steps", "pretrain_candidates", "hard", "pretrain_batch", "lr", "model", "pretrain_seed",
            "retrieval_images", "init_range", "pretrain_relation_mlm")
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


def start_path(args) -> Path:
    """The cache file of the shared start of these settings."""
    return Path(args.out) / "cache" / f"start_{_settings_key(args)}.pt"


def shared_start(args) -> tuple[dict, dict]:
    """(state dict, info) of the shared pre-trained start, cached under ``--out``."""
    from iais_scale.engine import build_model, model_config

    cache = start_path(args)
    if cache.is_file() and not args.no_cache:
        blob = torch.load(cache, weights_only=True)
        return blob["state"], {**blob["info"], "cached": True}
    data = load_data(args)
    cfg = experiment(args, pretrain_overrides(args), args.pretrain_steps, args.pretrain_batch)
    torch.manual_seed(args.pretrain_seed)
    model = build_model(cfg, model_config(cfg, data.tokenizer, data.train[0].features.shape[1]))
    reinitialise(model, args.init_range)
    t0 = time.perf_counter()
    log = []
    if args.ground_steps:
        # Grounding first: only the relation/placement-word MLM, on shuffled images. Mixed into MLM and
        # ranking from the start, it never took off (docs/results.md); alone it does within ~1,000 steps.
        ground = experiment(args, [*pretrain_overrides(args), f"optim.warmup_steps={min(100, args.ground_steps)}"],
                            args.ground_steps, 2 * args.pretrain_batch)
        log += train(model, data, ground, seed=args.pretrain_seed, keep_pairs=False, tag="grounding",
                     relation_mlm=1.0, objectives=False, kinds=tuple(args.ground_on.split(",")))
    log += train(model, data, cfg, seed=args.pretrain_seed, keep_pairs=False, tag="shared start",
                 relation_mlm=args.pretrain_relation_mlm)
    seconds = time.perf_counter() - t0
    metrics = evaluate_run(model, data, [-1], args.eval_batch)
    info = {"seconds": seconds, "log": log, "metrics": metrics, "cached": False}
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    torch.save({"state": model.state_dict(), "info": info}, partial)
    os.replace(partial, cache)  # an interrupted save never leaves a cache entry to trust
    return model.state_dict(), info


def reinitialise(model, std: float) -> None:
    """BERT's initialisation with weights drawn at ``std`` (BERT: 0.02), the tied MLM decoder included.

    A relation needs two learned factors at once (which region a phrase names, and where it is): the
    gradient of each vanishes while the other is zero. Trained on relation and placement words directly,
    the benchmark's model at std 0.1 without dropout was right on 98% of relation words after 1,000 steps;
    at 0.02 with dropout 0.1, 54% after 1,250 (chance 50%). Hence the defaults: 0.1, no dropout."""
    if std == model.config.initializer_range:
        return
    model.config.initializer_range = std
    model.apply(model._init_weights)
    model.tie_weights()


def fine_tune(args, name: str, seed: int, start: dict) -> dict:
    from iais_scale.engine import build_model, model_config

    data = load_data(args)
    cfg = experiment(args, [*fine_tune_overrides(args), *CONFIGS[name]], args.steps, args.batch)
    model = build_model(cfg, model_config(cfg, data.tokenizer, data.train[0].features.shape[1]))
    model.load_state_dict(start)
    t0 = time.perf_counter()
    log = train(model, data, cfg, seed=seed, keep_pairs=True)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = evaluate_run(model, data, cfg.objectives.iais.layers, args.eval_batch)
    return {"config": name, "seed": seed, "train_seconds": seconds, "eval_seconds": time.perf_counter() - t1,
            "log": log, **metrics}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _fine_tune_task(payload) -> dict:
    args, name, seed = payload
    return fine_tune(args, name, seed, torch.load(start_path(args), weights_only=True)["state"])


def run_grid(args) -> dict:
    t0 = time.perf_counter()
    start, start_info = shared_start(args)
    names = args.configs
    tasks = [(name, seed) for seed in range(args.seeds) for name in names]
    runs: list[dict] = []
    if args.workers <= 1:
        for name, seed in tasks:
            runs.append(fine_tune(args, name, seed, start))
            _progress(runs[-1], len(runs), len(tasks), t0)
    else:  # the workers read the start from its cache file (shared_start always writes it)
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                    initargs=(args.threads,)) as pool:
            futures = [pool.submit(_fine_tune_task, (args, n, s)) for n, s in tasks]
            for f in cf.as_completed(futures):
                runs.append(f.result())
                _progress(runs[-1], len(runs), len(tasks), t0)
    order = {(n, s): i for i, (n, s) in enumerate(tasks)}
    runs.sort(key=lambda r: order[(r["config"], r["seed"])])
    return summarise(args, runs, start_info, time.perf_counter() - t0)


def _progress(run: dict, done: int, total: int, t0: float) -> None:
    flag = " DEGENERATE" if run["degenerate"] else ""
    print(f"[{time.perf_counter() - t0:6.0f} s] {done}/{total} {run['config']:13s} seed {run['seed']}: group "
          f"{run['group']:5.1f} text {run['text']:5.1f} image {run['image']:5.1f} R@1 {run['tr_r1']:5.1f}/"
          f"{run['ir_r1']:5.1f} probe {run['probe_swap']:5.1f} H(S_L) {run['H_S_L']:.3f}{flag}"
          f" ({run['train_seconds']:.0f}+{run['eval_seconds']:.0f} s)", flush=True)


def summarise(args, runs: list[dict], start_info: dict, seconds: float) -> dict:
    baseline = {r["seed"]: r for r in runs if r["config"] == "baseline"}
    configs = []
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        summary = {k: interval([r[k] for r in mine]) for k in SUMMARY_KEYS}
        diffs = {k: interval([r[k] - baseline[r["seed"]][k] for r in mine if r["seed"] in baseline])
                 for k in ("group", "text", "image", "tr_r1", "ir_r1")} if baseline and name != "baseline" else {}
        degenerate = sum(r["degenerate"] for r in mine)
        win = bool(diffs) and degenerate == 0 and diffs["group"]["low"] > 0
        configs.append({"name": name, "overrides": CONFIGS[name], "runs": mine, "summary": summary,
                        "vs_baseline": diffs, "degenerate_runs": degenerate, "beats_baseline_group": win,
                        "above_baseline_interval": bool(baseline) and name != "baseline" and degenerate == 0
                        and summary["group"]["mean"] > interval([r["group"] for r in baseline.values()])["high"]})
    settings = {k: v for k, v in vars(args).items()}
    return {"settings": settings, "chance": CHANCE, "seconds": seconds, "start": start_info, "configs": configs,
            "torch_threads": args.threads, "workers": args.workers, "cpu_count": os.cpu_count()}


# --------------------------------------------------------------------------- reports


def _fmt(s: dict, digits: int = 1) -> str:
    if s["n"] == 0 or math.isnan(s["mean"]):
        return "-"
    if math.isnan(s["half"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['half']:.{digits}f}"


def markdown(results: dict) -> str:
    st = results["settings"]
    lines = [
        f"Relation benchmark: {len(results['configs'])} configurations x {st['seeds']} seeds, {st['steps']} fine-tuning"
        f" steps of {st['batch']} pairs (whole swap pairs) from a shared start ({st['pretrain_steps']} steps);"
        f" {results['seconds'] / 60:.1f} min on {st['workers']} worker(s) x {st['threads']} thread(s).",
        f"Relation swap on {results.get('swap_groups', '?')} groups; R@1 on {st['retrieval_images']} test images."
        " Mean ± 95% t-interval half-width over seeds; Δ: paired by seed against the baseline.",
        f"Chance (random scorer): text {CHANCE['text']:.0f}, image {CHANCE['image']:.0f}, group {CHANCE['group']:.1f};"
        " probe: 50 from the text alone.",
        "",
        "| config | group | Δ group | text | image | group (arg. swap) | group (rel. swap) | TR R@1 | IR R@1 | Δ TR/IR R@1 |"
        " probe | ISD_L / ISD_V | H(S_L) | H(S_V) | H(A_t2i) | H(A_i2t) | degenerate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["configs"]:
        s, d = c["summary"], c["vs_baseline"]
        delta = _fmt(d["group"]) if d else "-"
        dr = f"{_fmt(d['tr_r1'])} / {_fmt(d['ir_r1'])}" if d else "-"
        mark = " **(wins)**" if c["beats_baseline_group"] else ""
        lines.append(
            f"| {c['name']}{mark} | {_fmt(s['group'])} | {delta} | {_fmt(s['text'])} | {_fmt(s['image'])} |"
            f" {_fmt(s['group_argument'])} | {_fmt(s['group_relation'])} | {_fmt(s['tr_r1'])} | {_fmt(s['ir_r1'])} |"
            f" {dr} | {_fmt(s['probe_swap'])} | {_fmt(s['isd_L'], 3)} / {_fmt(s['isd_V'], 3)} |"
            f" {_fmt(s['H_S_L'], 3)} | {_fmt(s['H_S_V'], 3)} | {_fmt(s['H_A_t2i'], 3)} | {_fmt(s['H_A_i2t'], 3)} |"
            f" {c['degenerate_runs']}/{len(c['runs'])} |")
    base = next((c for c in results["configs"] if c["name"] == "baseline"), None)
    if base is not None:
        g = base["summary"]["group"]
        able = g["n"] > 1 and g["low"] > CHANCE["group"]
        lines += ["", f"Baseline group score {_fmt(g)} against chance {CHANCE['group']:.1f}: "
                  + ("above chance beyond its interval: the benchmark can measure a relation effect." if able else
                     "**not above chance: the baseline has not learned the relations, so this grid cannot tell"
                     " whether IAIS helps them.**")]
    lines += ["", "ISD and entropies at the layers that carry IAIS (the last layer for IAIS-off configurations);"
              " degenerate: runs whose four mean entropies there all exceed 0.98 (never counted as wins)."
              " Wins: the paired 95% interval of Δ group lies above 0.", ""]
    lines += ["Last layer, every configuration:", "",
              "| config | ISD_L / ISD_V | H(S_L) | H(S_V) | H(A_t2i) | H(A_i2t) |", "|---|---:|---:|---:|---:|---:|"]
    for c in results["configs"]:
        s = c["summary"]
        lines.append(f"| {c['name']} | {_fmt(s['isd_L_last'], 3)} / {_fmt(s['isd_V_last'], 3)} | {_fmt(s['H_S_L_last'], 3)} |"
                     f" {_fmt(s['H_S_V_last'], 3)} | {_fmt(s['H_A_t2i_last'], 3)} | {_fmt(s['H_A_i2t_last'], 3)} |")
    start = results["start"].get("metrics", {})
    if start:
        lines += ["", f"Shared start (before fine-tuning): group {start['group']:.1f}, text {start['text']:.1f},"
                  f" image {start['image']:.1f}, R@1 {start['tr_r1']:.1f}/{start['ir_r1']:.1f},"
                  f" probe {start['probe_swap']:.1f}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    names = [c["name"] for c in configs]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 4.2))
    x = list(range(len(names)))
    for offset, key, colour in ((-0.2, "group", "C0"), (0.0, "text", "C1"), (0.2, "image", "C2")):
        means = [c["summary"][key]["mean"] for c in configs]
        halves = [0.0 if math.isnan(c["summary"][key]["half"]) else c["summary"][key]["half"] for c in configs]
        ax.errorbar([i + offset for i in x], means, yerr=halves, fmt="o", capsize=4, color=colour,
                    label=f"{key} score (chance {CHANCE[key]:.1f})")
        for c, i in zip(configs, x):  # every seed, faintly
            ax.scatter([i + offset] * len(c["runs"]), [r[key] for r in c["runs"]], s=8, color=colour, alpha=0.3)
    ax.axhline(CHANCE["group"], color="C0", ls="--", lw=0.8)
    ax.axhline(CHANCE["text"], color="C1", ls=":", lw=0.8)
    for c, i in zip(configs, x):
        if c["degenerate_runs"]:
            ax.annotate(f"degenerate {c['degenerate_runs']}/{len(c['runs'])}", (i, 2), ha="center", fontsize=7,
                        color="red")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylabel("relation-swap score (%)")
    st = results["settings"]
    ax.set_title(f"Relation swap: mean and 95% t-interval over {st['seeds']} seeds ({st['steps']} steps)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data/relations"), help="the relation benchmark (made when missing)")
    ap.add_argument("--out", default=str(ROOT / "runs/benchmarks/relations"))
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", type=int, default=10, help="fine-tuning seeds per configuration (0..N-1)")
    ap.add_argument("--steps", type=int, default=60,
                    help="fine-tuning steps of every run (the baseline ends mid-range: room to improve and to lose)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step (fine-tuning: whole swap pairs)")
    ap.add_argument("--hard", type=int, default=3, help="hardest negatives per group")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-steps", type=int, default=3000, help="steps of the shared start")
    ap.add_argument("--ground-steps", type=int, default=1000,
                    help="steps of relation/placement-word MLM alone before the shared start (0: none)")
    ap.add_argument("--ground-on", default="placement",
                    help="caption kinds the grounding masks: placement (where one object is), relation, or both")
    ap.add_argument("--pretrain-mlm-steps", type=int, default=300,
                    help="first steps of the shared start without ranking (MLM only)")
    ap.add_argument("--pretrain-batch", type=int, default=16, help="pairs per step of the shared start")
    ap.add_argument("--pretrain-candidates", type=int, default=5,
                    help="random in-batch candidates the start's mining scores (the hardest --hard are kept)")
    ap.add_argument("--pretrain-relation-mlm", type=float, default=0.0,
                    help="weight of the relation-word MLM in the shared start (0: off)")
    ap.add_argument("--pretrain-seed", type=int, default=0)
    ap.add_argument("--init-range", type=float, default=0.1,
                    help="std of the initial weights (BERT: 0.02, at which relations are learned slowly; see reinitialise)")
    ap.add_argument("--model", default=SMALL_MODEL, help="model overrides ('' : the demo's tiny model, hidden 128)")
    ap.add_argument("--train-pairs", type=int, default=2000, help="training swap pairs when the data is made")
    ap.add_argument("--test-images", type=int, default=1000, help="retrieval test images when the data is made")
    ap.add_argument("--swap-groups", type=int, default=1000, help="relation-swap groups when the data is made")
    ap.add_argument("--retrieval-images", type=int, default=150,
                    help="R@1 on the first N test images (all-pairs scoring costs N^2 cross-encoder passes)")
    ap.add_argument("--eval-batch", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2, help="processes running fine-tunings in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--no-cache", action="store_true", help="re-make the shared start even when cached")
    args = ap.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    if not 0 <= args.pretrain_mlm_steps < args.pretrain_steps:
        ap.error(f"--pretrain-mlm-steps {args.pretrain_mlm_steps} must lie in [0, --pretrain-steps {args.pretrain_steps})")
    args.model = args.model.split()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from iais_scale.data.relations import make_relations

    make_relations(args.data, n_train_pairs=args.train_pairs, n_test=args.test_images,
                   n_swap_groups=args.swap_groups, n_val=min(200, args.test_images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_grid(args)
    results["swap_groups"] = len(load_data(args).swaps)
    results["retrieval_set"] = {"images": len(load_data(args).rset.images), "captions": len(load_data(args).rset.captions)}
    (out / "relations.json").write_text(json.dumps(results, indent=1))
    (out / "relations.md").write_text(markdown(results))
    plot(results, out / "relations.png")
    print(markdown(results))
    print(f"wrote {out / 'relations.json'}, {out / 'relations.md'}, {out / 'relations.png'}"
          f" ({results['seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
