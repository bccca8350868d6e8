"""The trainer: DeepSpeed setup, the training loop, checkpoints and the final evaluation.

``run(cfg)`` is the whole job: check the config's paths, start the process group, build the model
and the stream, hand both to ``deepspeed.initialize``, step, checkpoint, evaluate. Each step's loss
comes from ``objectives.training_loss``; everything the model sees comes from ``data/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from . import evaluate as ev
from .config import ConfigError, ExperimentConfig, to_dict
from .data import format as fmt
from .data.collate import Collator
from .data.pipeline import make_train_stream, split_shards, train_loader
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
    train = [root / cfg.data.train_split] if cfg.data.mode == "epoch" else [Path(s.path) for s in cfg.data.sources]
    evals = [root / cfg.data.eval_split] + ([root / cfg.data.swap_split] if cfg.data.swap_split else [])
    for folder in train + evals:
        try:
            split_shards(folder)
        except FileNotFoundError as e:
            problems.append(f"data: {folder}: {e}")
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


def build_model(cfg: ExperimentConfig, tokenizer, feature_dim: int, ds_config: dict | None = None) -> CrossModalModel:
    """The model of an experiment. Under ZeRO-3 it is built inside ``deepspeed.zero.Init`` (through
    transformers' own integration), so each rank only ever holds its partition of the weights."""
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
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # transformers reads it (weakly) while building
        model = CrossModalModel._from_config(hf_cfg)
        del keep
    else:
        model = CrossModalModel(hf_cfg)
    if cfg.model.init_from:
        from .model.loading import import_uniter, init_from_bert

        if zero3:
            raise ConfigError(["model.init_from: load into a ZeRO-1/2 run, export, then start ZeRO-3 from that"])
        kind, path = cfg.model.init_from.split(":", 1)
        report = (init_from_bert if kind == "bert" else import_uniter)(model, path)
        log.info("initialised from %s: %d tensors loaded, %d missing, %d unexpected",
                 cfg.model.init_from, len(report.loaded), len(report.missing), len(report.unexpected))
    return model


# --------------------------------------------------------------------------- the job

COMPLETE = "COMPLETE"  # marker written into a checkpoint folder once every rank has saved
EXIT_INTERRUPTED = 143  # stopped by a signal, checkpoint saved, no requeue asked


class StopTraining(Exception):
    """Raised on a signal after the checkpoint is saved; ``code`` is the process exit code."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"stopped by a signal (exit code {code})")


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step checkpoint, oldest first."""
    found = []
    for d in ckpt_dir.glob("step*"):
        if (d / COMPLETE).is_file() and d.name[4:].isdigit():
            found.append((int(d.name[4:]), d))
    return sorted(found)


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``none``, ``auto`` (newest complete) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir / "checkpoints")
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


class Trainer:
    """One training run on this rank: the DeepSpeed engine, the stream, the counters, the signals."""

    def __init__(self, cfg: ExperimentConfig):
        import deepspeed
        from transformers import AutoTokenizer

        self.cfg = cfg
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
        setup_logging(int(os.environ.get("RANK", "0")))
        prepare_data(cfg)
        problems = check_paths(cfg)
        if problems:
            raise ConfigError(problems)

        deepspeed.init_distributed(dist_backend=None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, self.world)
        self.out_dir = Path(cfg.train.output_dir)
        self.root = Path(cfg.data.root)
        manifest = json.loads((self.root / fmt.MANIFEST_FILE).read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(cfg.data.tokenizer or self.root / fmt.TOKENIZER_DIR))
        self.collator = Collator(self.tokenizer, cfg.data.max_text_len, cfg.data.max_regions,
                                 image_input=cfg.model.image_input, image_size=cfg.model.image_size)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg, self.tokenizer, manifest["feature_dim"], ds_cfg)
        # Under ZeRO-3 the parameters are already partitioned (flat): their shape is ds_shape.
        matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in model.parameters()]
        decay = [p for p, m in zip(model.parameters(), matrix) if m]
        no_decay = [p for p, m in zip(model.parameters(), matrix) if not m]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
            # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's vectorised Adam (compiled once).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=ds_cfg
        )
        self.module: CrossModalModel = self.engine.module
        if self.rank == 0:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            log.info("model: %.2fM parameters, %d ranks, ZeRO stage %d", n_params / 1e6, self.world,
                     self.engine.zero_optimization_stage())
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            # The model's config and tokenizer: what evaluation and export need beside the weights.
            self.module.config.save_pretrained(self.out_dir / "model")
            self.tokenizer.save_pretrained(self.out_dir / "model")

        self.step = 0
        self.batches_seen = 0  # micro-batches taken from this rank's stream
        self.bad = BadSampleCounter(cfg.data.max_bad_fraction, rank=self.rank)
        self.best_rsum = -1.0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.tokens_seen = 0  # text + image tokens of the matched pairs, for throughput
        self._signal: int | None = None
        self._eval_sets = None
        self._rng_to_restore = None

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """SIGUSR1/SIGTERM: finish the step, save, stop; a second signal exits at once."""

        first_at = 0.0

        def handler(signum, frame):
            nonlocal first_at
            if self._signal is not None:
                # SLURM and the DeepSpeed launcher both forward a SIGTERM: a repeat within seconds
                # is the same request; a later one is the user insisting.
                if signum == self._signal and time.monotonic() - first_at < 5.0:
                    return
                os._exit(128 + signum)
            self._signal, first_at = signum, time.monotonic()
            log.warning("rank %d: got signal %d; stopping after this step", self.rank, signum)

        signal.signal(signal.SIGUSR1, handler)
        signal.signal(signal.SIGTERM, handler)

    def _stop_requested(self) -> int:
        """The signal any rank got (0 if none): every rank stops at the same step."""
        flag = torch.tensor([self._signal or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    # ------------------------------------------------------------------ checkpoints

    def save(self, tag: str) -> Path:
        """Save with DeepSpeed, then this rank's own state; mark complete once every rank is done.

        The marker is written last, so a crash while saving leaves a folder that resume ignores and
        the previous complete checkpoint untouched.
        """
        ckpt_dir = self.out_dir / "checkpoints"
        folder = ckpt_dir / tag
        if self.rank == 0 and folder.exists():
            (folder / COMPLETE).unlink(missing_ok=True)  # overwriting: incomplete until done again
        dist.barrier()
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": self.step})
        torch.save(
            {
                "step": self.step,
                "batches_seen": self.batches_seen,
                "bad_good": self.bad.good,
                "bad": dict(self.bad.bad),
                "best_rsum": self.best_rsum,
                "rng_torch": torch.get_rng_state(),
                "rng_python": random.getstate(),
            },
            folder / f"rank{self.rank:05d}_state.pt",
        )
        dist.barrier()
        if self.rank == 0:
            (folder / COMPLETE).write_text(json.dumps({"step": self.step, "time": time.time()}))
            self._prune(ckpt_dir)
        dist.barrier()
        return folder

    def _prune(self, ckpt_dir: Path) -> None:
        found = complete_checkpoints(ckpt_dir)
        for _, folder in found[: max(0, len(found) - self.cfg.train.keep_checkpoints)]:
            shutil.rmtree(folder, ignore_errors=True)

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        state = torch.load(folder / f"rank{self.rank:05d}_state.pt", weights_only=False)
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.bad.good, self.bad.bad = state["bad_good"], Counter(state["bad"])
        self.best_rsum = state["best_rsum"]
        # Restored only once the data loader iterator exists: creating it draws from the torch RNG.
        self._rng_to_restore = (state["rng_torch"], state["rng_python"])
        if self.rank == 0:
            log.info("resumed from step %d (%s)", self.step, folder)

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the logged loss parts.

        A non-finite loss or gradient on any rank makes DeepSpeed skip the optimizer step on every
        rank (its overflow check sees a non-finite global gradient norm and zeroes the gradients); a
        non-finite loss is poisoned to NaN first so its gradient is surely non-finite. Skipped steps
        are counted, and too many in a row abort the run.
        """
        cfg = self.cfg
        parts_out: dict[str, float] = {}
        generator = torch.Generator()
        for micro in range(cfg.train.grad_accum):
            batch = next(batches)
            self.batches_seen += 1
            image_tokens = batch["region_attention"].sum() if "region_attention" in batch else (
                batch["pixel_values"].shape[0] * (cfg.model.image_size // cfg.model.patch_size) ** 2)
            self.tokens_seen += int(batch["text_attention"].sum() + image_tokens)
            self.bad.merge(*batch.pop("sample_counts"))
            # Mining and masking draw from a generator seeded by (seed, rank, step, micro-step).
            generator.manual_seed(hash((cfg.train.seed, self.rank, self.step, micro)) % (1 << 62))
            loss, parts = training_loss(
                self.module, batch, cfg.objectives, step=self.step, total_steps=cfg.train.steps,
                mask_id=self.tokenizer.mask_token_id, generator=generator,
                group=dist.group.WORLD if self.world > 1 else None,
            )
            if not torch.isfinite(loss.detach()):
                log.warning("rank %d step %d: non-finite loss %s; the step will be skipped", self.rank, self.step, loss)
                loss = loss * torch.tensor(float("nan"))
            self.engine.backward(loss)
            self.engine.step()
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                parts_out[k] = parts_out.get(k, 0.0) + float(v) / cfg.train.grad_accum
        grad_norm = _grad_norm(self.engine)
        if not math.isfinite(grad_norm):
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            log.warning("step %d: non-finite gradient norm; DeepSpeed skipped the update", self.step)
            if self.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                raise RuntimeError(f"{self.nonfinite_in_row} non-finite steps in a row at step {self.step}: aborting")
        else:
            self.nonfinite_in_row = 0
        parts_out["grad_norm"] = grad_norm
        self.step += 1
        return parts_out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        cfg = self.cfg
        if self._eval_sets is None:
            kind = dict(max_regions=cfg.data.max_regions, image_input=cfg.model.image_input)
            images = read_split(self.root / cfg.data.eval_split, limit=cfg.eval.max_images, **kind)
            swaps = None
            if cfg.data.swap_split:
                swaps = swap_groups(read_split(self.root / cfg.data.swap_split, **kind))
            self._eval_sets = (RetrievalSet.from_samples(images), swaps)
        rset, swaps = self._eval_sets
        report = ev.evaluate(self.module, self.collator, rset, swaps, batch_size=cfg.eval.batch_size,
                             isd_alignments=cfg.eval.isd_alignments)
        report["bad_samples"] = dict(self.bad.bad)
        report["nonfinite_steps"] = self.nonfinite_total
        if self.rank == 0:
            ev.write_report(report, self.out_dir, step=self.step)
            print(ev.markdown_table(report), flush=True)
        return report

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str = "none") -> dict:
        cfg = self.cfg
        folder = resolve_resume(resume, self.out_dir)
        if folder is not None:
            self.load(folder)
        elif resume == "auto" and self.rank == 0:
            log.info("--resume auto: no complete checkpoint in %s, starting at step 0", self.out_dir / "checkpoints")
        self.install_signal_handlers()
        stream = make_train_stream(cfg.data, self.collator, cfg.train.micro_batch_size, self.rank, self.world,
                                   cfg.train.seed, self.batches_seen)
        batches = iter(train_loader(stream, cfg.data.num_workers))
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore[0])
            random.setstate(self._rng_to_restore[1])
        logger = MetricsLogger(self.out_dir, self.rank, cfg.train.steps, initial=self.step)
        self.engine.train()
        # Loss parts are averaged over the steps of a logging window; keys that some steps lack
        # (before ranking starts, say) average over the steps that have them.
        t_log, steps_in_window, window, tokens_at = time.perf_counter(), 0, {}, self.tokens_seen
        try:
            while self.step < cfg.train.steps:
                parts = self.train_step(batches)
                steps_in_window += 1
                for k, v in parts.items():
                    total, count = window.get(k, (0.0, 0))
                    window[k] = (total + v, count + 1)
                logger.tick()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - t_log
                    record = {k: total / count for k, (total, count) in window.items()}  # same keys on every rank
                    pairs = steps_in_window * cfg.train.grad_accum * cfg.train.micro_batch_size
                    record.update(
                        step=self.step, lr=self.scheduler.get_last_lr()[0], samples_per_s=pairs / elapsed,
                        tokens_per_s=(self.tokens_seen - tokens_at) / elapsed, memory_mb=_peak_memory_mb(),
                        bad_samples=sum(self.bad.bad.values()), nonfinite_steps=self.nonfinite_total,
                    )
                    logger.log(_all_reduce_mean(record, self.world))
                    t_log, steps_in_window, window, tokens_at = time.perf_counter(), 0, {}, self.tokens_seen
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                    rsum = self.evaluate()["rsum"]
                    if rsum > self.best_rsum:
                        self.best_rsum = rsum
                        self.save("best")
                    self.engine.train()
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.save(f"step{self.step}")
                signum = self._stop_requested()
                if signum:
                    self._stop_on_signal(signum)
        finally:
            logger.close()

        if not (self.out_dir / "checkpoints" / f"step{self.step}" / COMPLETE).is_file():
            self.save(f"step{self.step}")
        if self.rank == 0:  # a consolidated Hugging Face folder, whatever the ZeRO stage
            from .model.loading import export_hf

            export_hf(self.out_dir / "checkpoints", self.out_dir / "hf_model", tag=f"step{self.step}")
        dist.barrier()
        report = self.evaluate()
        dist.barrier()
        return report

    def _stop_on_signal(self, signum: int) -> None:
        folder = self.save(f"step{self.step}")
        code = EXIT_INTERRUPTED
        job = os.environ.get("SLURM_JOB_ID")
        if signum == signal.SIGUSR1 and job:
            # Rank 0 asks; every rank learns whether SLURM accepted, and exits 0 only if it did.
            ok = torch.zeros(1)
            if self.rank == 0:
                log.warning("checkpoint %s saved; asking SLURM to requeue job %s", folder, job)
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                ok[0] = float(result.returncode == 0)
                if result.returncode:
                    log.error("scontrol requeue failed (%s): stopping as interrupted", result.stderr.strip())
            dist.broadcast(ok, src=0)
            code = 0 if ok.item() else EXIT_INTERRUPTED
        elif self.rank == 0:
            log.warning("checkpoint %s saved; stopping (exit code %d)", folder, code)
        dist.barrier()
        raise StopTraining(code)


def run(cfg: ExperimentConfig, resume: str = "none") -> dict:
    """Train, checkpoint, evaluate; returns the final evaluation report."""
    return Trainer(cfg).fit(resume)


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
    for k in ("samples_per_s", "tokens_per_s", "bad_samples"):  # sums over ranks, not means
        out[k] *= world
    return out


def _peak_memory_mb() -> float:
    """Peak accelerator memory of this rank, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """Rank 0 writes each record to the log, ``train_log.jsonl`` and TensorBoard, and shows a tqdm bar."""

    def __init__(self, out_dir: Path, rank: int, total_steps: int, initial: int = 0):
        self.rank = rank
        self.jsonl = self.tb = self.bar = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "train_log.jsonl", "a")
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", mininterval=5)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update()

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
            self.bar.close()
            self.jsonl.close()
            self.tb.close()
