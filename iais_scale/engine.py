"""The trainer: DeepSpeed setup, the training loop, checkpoints and the final evaluation.

``run(cfg)`` is the whole job: check the config's paths, start the process group, build the model
and the stream, hand both to ``deepspeed.initialize``, step, checkpoint, evaluate. Each step's loss
comes from ``objectives.training_loss``; everything the model sees comes from ``data/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import evaluate as ev
from .config import ConfigError, ExperimentConfig, to_dict
from .data import format as fmt
from .data.collate import Collator
from .data.pipeline import PairStream, split_shards, train_loader
from .data.retrieval import RetrievalSet, read_split, swap_groups
from .data.samples import BadSampleCounter
from .model import CrossModalModel, config_from_experiment
from .objectives import training_loss

log = logging.getLogger("iais_scale")


# --------------------------------------------------------------------------- set-up


def prepare_data(cfg: ExperimentConfig) -> None:
    """Generate the demo shards when asked and missing (local rank 0 only; the others wait for it)."""
    root = Path(cfg.data.root)
    if (root / fmt.MANIFEST_FILE).is_file() or not cfg.data.make_demo:
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        from .data.demo import make_demo

        log.info("demo shards missing under %s: generating them", root)
        make_demo(root)
    else:
        deadline = time.time() + 600
        while not (root / fmt.MANIFEST_FILE).is_file():
            if time.time() > deadline:
                raise TimeoutError(f"waited 10 minutes for local rank 0 to write {root}")
            time.sleep(1)


def check_paths(cfg: ExperimentConfig) -> list[str]:
    """Problems with the files a run needs, all at once (before any process group exists)."""
    problems = []
    root = Path(cfg.data.root)
    if not (root / fmt.MANIFEST_FILE).is_file():
        problems.append(f"data.root: {root}/{fmt.MANIFEST_FILE} not found (make it with `python -m data_tools`)")
    splits = [cfg.data.train_split, cfg.data.eval_split] + ([cfg.data.swap_split] if cfg.data.swap_split else [])
    for split in splits:
        try:
            split_shards(root / split)
        except FileNotFoundError as e:
            problems.append(f"data: split {split!r}: {e}")
    tok = Path(cfg.data.tokenizer or root / fmt.TOKENIZER_DIR)
    if not (tok / "tokenizer.json").is_file() and not (tok / "vocab.txt").is_file():
        problems.append(f"data.tokenizer: no tokenizer files in {tok}")
    if not Path(cfg.train.deepspeed_config).is_file():
        problems.append(f"train.deepspeed_config: {cfg.train.deepspeed_config} not found")
    return problems


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with the batch arithmetic of the experiment config filled in.

    The experiment config owns micro-batch, accumulation and clipping; a DeepSpeed file that states
    different values is a contradiction and is rejected rather than silently overridden.
    """
    ds = json.loads(Path(cfg.train.deepspeed_config).read_text())
    t = cfg.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    problems = [
        f"{cfg.train.deepspeed_config}: {k}={ds[k]} contradicts the experiment config ({v});"
        " remove it from the DeepSpeed file, the experiment config sets it"
        for k, v in want.items()
        if k in ds and ds[k] != "auto" and ds[k] != v
    ]
    if "optimizer" in ds or "scheduler" in ds:
        problems.append(f"{cfg.train.deepspeed_config}: optimizer/scheduler come from the experiment's optim section")
    if problems:
        raise ConfigError(problems)
    ds.update(want)
    return ds


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
    )


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then linear decay to 0 (the UNITER/IAIS fine-tuning schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def build_model(cfg: ExperimentConfig, tokenizer, feature_dim: int) -> CrossModalModel:
    hf_cfg = config_from_experiment(
        cfg.model,
        vocab_size=len(tokenizer),
        region_feature_dim=feature_dim,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        iais_layers=cfg.objectives.iais.layers,
        max_text_len=cfg.data.max_text_len,
    )
    return CrossModalModel(hf_cfg)


# --------------------------------------------------------------------------- the job


def run(cfg: ExperimentConfig) -> dict:
    """Train, checkpoint, evaluate; returns the final evaluation report."""
    import deepspeed
    from transformers import AutoTokenizer

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    setup_logging(int(os.environ.get("RANK", "0")))
    prepare_data(cfg)
    problems = check_paths(cfg)
    if problems:
        raise ConfigError(problems)

    deepspeed.init_distributed(dist_backend=None)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_cfg = deepspeed_config(cfg, world)
    out_dir = Path(cfg.train.output_dir)
    root = Path(cfg.data.root)
    manifest = json.loads((root / fmt.MANIFEST_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.data.tokenizer or root / fmt.TOKENIZER_DIR))
    collator = Collator(tokenizer, cfg.data.max_text_len, cfg.data.max_regions)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg, tokenizer, manifest["feature_dim"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    module: CrossModalModel = engine.module
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model: %.2fM parameters, %d ranks, ZeRO stage %d", n_params / 1e6, world, engine.zero_optimization_stage())
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    stream = PairStream(
        root / cfg.data.train_split, collator, cfg.train.micro_batch_size,
        rank=rank, world_size=world, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
    )
    batches = iter(train_loader(stream, cfg.data.num_workers))
    bad = BadSampleCounter(cfg.data.max_bad_fraction)
    generator = torch.Generator()
    mask_id = tokenizer.mask_token_id
    logger = MetricsLogger(out_dir, rank)

    engine.train()
    # Loss parts are averaged over the micro-steps of a logging window (keys missing in some steps,
    # e.g. before ranking starts, average over the steps that have them).
    t_log, samples, window = time.perf_counter(), 0, {}
    for step in range(cfg.train.steps):
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            bad.merge(*batch.pop("sample_counts"))
            # Mining and masking draw from a generator seeded by (seed, rank, step): reproducible.
            generator.manual_seed(cfg.train.seed * 1_000_003 + rank * 7919 + step)
            loss, parts = training_loss(
                module, batch, cfg.objectives, step=step, total_steps=cfg.train.steps, mask_id=mask_id,
                generator=generator,
            )
            engine.backward(loss)
            engine.step()
            samples += batch["text_ids"].shape[0]
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                total, count = window.get(k, (0.0, 0))
                window[k] = (total + float(v), count + 1)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            elapsed = time.perf_counter() - t_log
            record = {k: total / count for k, (total, count) in window.items()}  # same keys on every rank
            record.update(
                step=step + 1,
                lr=scheduler.get_last_lr()[0],
                grad_norm=_grad_norm(engine),
                samples_per_s=samples / elapsed,
                bad_samples=sum(bad.bad.values()),
            )
            logger.log(_all_reduce_mean(record, world))
            t_log, samples, window = time.perf_counter(), 0, {}

    ckpt_dir = out_dir / "checkpoints"
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{cfg.train.steps}", client_state={"step": cfg.train.steps})
    if engine.zero_optimization_stage() < 3 and rank == 0:
        module.save_pretrained(out_dir / "hf_model")
        tokenizer.save_pretrained(out_dir / "hf_model")

    eval_images = read_split(root / cfg.data.eval_split, max_regions=cfg.data.max_regions, limit=cfg.eval.max_images)
    swaps = None
    if cfg.data.swap_split:
        swaps = swap_groups(read_split(root / cfg.data.swap_split, max_regions=cfg.data.max_regions))
    report = ev.evaluate(
        module, collator, RetrievalSet.from_samples(eval_images), swaps,
        batch_size=cfg.eval.batch_size, isd_alignments=cfg.eval.isd_alignments,
    )
    report["bad_samples"] = dict(bad.bad)
    if rank == 0:
        ev.write_report(report, out_dir, step=cfg.train.steps)
        print(ev.markdown_table(report), flush=True)
    logger.close()
    dist.barrier()
    return report


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _all_reduce_mean(record: dict, world: int) -> dict:
    """Average the numeric entries over ranks (every rank logs the same keys in the same order)."""
    keys = sorted(k for k, v in record.items() if k != "step")
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(values)
        values /= world
    out = dict(zip(keys, values.tolist()))
    out["step"] = record["step"]
    out["samples_per_s"] *= world  # a sum over ranks, not a mean
    out["bad_samples"] *= world
    return out


class MetricsLogger:
    """Rank 0 writes each record to stdout, ``train_log.jsonl`` and TensorBoard."""

    def __init__(self, out_dir: Path, rank: int):
        self.rank = rank
        self.jsonl = self.tb = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "train_log.jsonl", "a")
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        step = record["step"]
        main = ("loss", "mlm", "rank", "iais", "iais_weight", "entropy_S_L", "entropy_S_V")
        shown = "  ".join(f"{k}={record[k]:.4g}" for k in main if k in record)
        log.info("step %d  %s  %.0f samples/s", step, shown, record["samples_per_s"])
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.rank == 0:
            self.jsonl.close()
            self.tb.close()
