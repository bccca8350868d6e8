"""Training metrics: averaging over a logging window, reduction over ranks, and their outputs
(log lines, ``train_log.jsonl``, TensorBoard, a progress bar) written by rank 0."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("iais_scale")

def progress(items, *, total: int, desc: str, unit: str, show: bool = True, every_s: float = 30.0):
    """``items`` with their progress shown (``show``: rank 0): a tqdm bar on a terminal; in a file, a
    log line every ``every_s`` seconds and at the end, never a carriage return."""
    if not show:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            eta = (now - start) / done * (total - done)
            log.info("%s: %d/%d %s, %s elapsed, ETA %s", desc, done, total, unit, duration(now - start), duration(eta))


EVAL_SCALARS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
# Summed over ranks rather than averaged: totals of the whole job.
SUMMED = ("samples_per_s", "tokens_per_s", "bad_samples")


# Libraries whose INFO lines ("Processing zero checkpoint", "Loading checkpoint shards") drown the run's own.
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "transformers", "torch", "accelerate", "fsspec", "urllib3")


def setup_logging(rank: int, verbose: bool = False) -> None:
    """Rank 0 logs INFO, the others WARNING; other libraries say only warnings, and Python warnings
    show once on rank 0 (not once per rank), unless ``train.verbose``."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", force=True)
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.simplefilter("once" if rank == 0 else "ignore")


class Window:
    """Loss parts averaged over the steps of a logging window. A key that some steps lack (e.g.
    ranking before it starts) averages over the steps that have it."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, tokens: int) -> None:
        self.sums: dict[str, tuple[float, int]] = {}
        self.steps, self.t0, self.tokens0 = 0, time.perf_counter(), tokens

    def add(self, parts: dict[str, float]) -> None:
        self.steps += 1
        for k, v in parts.items():
            total, count = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v, count + 1)

    def record(self, *, step: int, pairs_per_step: int, tokens: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {k: total / count for k, (total, count) in self.sums.items()}
        out.update(step=step, samples_per_s=self.steps * pairs_per_step / elapsed,
                   tokens_per_s=(tokens - self.tokens0) / elapsed, memory_mb=peak_memory_mb())
        return out


def all_reduce_record(record: dict, world: int) -> dict:
    """Average the numeric entries over ranks, sum those in ``SUMMED``. Every rank must pass the same
    keys; a key one rank lacks is reported rather than mismatching the collective."""
    keys = sorted(k for k in record if k != "step")
    if world > 1:
        names = [None] * world
        dist.all_gather_object(names, keys)
        if any(n != keys for n in names):
            raise RuntimeError(f"ranks log different metrics: {names}")
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    if world > 1:
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            values = values.cuda()
        dist.all_reduce(values)
        values = values.cpu() / world
    out = dict(zip(keys, values.tolist()))
    out["step"] = record["step"]
    for k in SUMMED:
        if k in out:
            out[k] *= world
    return out


def peak_memory_mb() -> float:
    """Peak accelerator memory of this rank, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class MetricsLogger:
    """Rank 0 writes each record to the log (with the step out of the total and an ETA),
    ``train_log.jsonl`` and TensorBoard (and wandb when asked); other ranks write nothing. On a
    terminal a tqdm bar runs below the log lines (routed through tqdm so that none shares a line
    with it); in a file (a SLURM log, ``> log``) there is no bar, whose carriage returns would make
    one endless line: the log lines carry the progress."""

    MAIN = ("loss", "mlm", "itm_rank", "iais", "iais_weight", "entropy_S_L", "entropy_S_V")

    def __init__(self, out_dir: Path, rank: int, total_steps: int, initial: int = 0, wandb: dict | None = None):
        """``wandb``: ``open_wandb``'s arguments but the folder (project, name, run_id, config), to log
        there too; rank 0 opens the run (``wandb_run_id``)."""
        self.rank = rank
        self.jsonl = self.tb = self.bar = None
        self.wandb = open_wandb(**wandb, out_dir=out_dir) if wandb is not None and rank == 0 else None
        self.wandb_run_id = self.wandb.id if self.wandb is not None else None
        self.total, self.initial, self.started = total_steps, initial, time.monotonic()
        self._redirect = contextlib.ExitStack()
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "train_log.jsonl", "a")
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            terminal = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", mininterval=5,
                            disable=not terminal)
            if terminal:
                self._redirect.enter_context(logging_redirect_tqdm())

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        step = record["step"]
        shown = "  ".join(f"{k}={record[k]:.4g}" for k in self.MAIN if k in record)
        done, elapsed = step - self.initial, time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        log.info("step %d/%d  %s  %.0f samples/s  ETA %s", step, self.total, shown, record["samples_per_s"],
                 duration(eta))
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def log_eval(self, report: dict, prefix: str, step: int) -> None:
        """An evaluation's headline numbers in TensorBoard (and wandb): ``val/*`` for the periodic
        model-selection evaluations, ``eval/*`` for the reported one."""
        if self.rank != 0:
            return
        numbers = {k: v for k, v in report.items() if k in EVAL_SCALARS and isinstance(v, (int, float))}
        numbers.update({f"{k.replace('/', '_')}": v["mean"] for k, v in report.get("relations", {}).items()
                        if isinstance(v, dict) and "mean" in v})
        for k, v in numbers.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()  # (also after close(): the writer reopens for the final evaluation)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self._redirect.close()
        if self.rank == 0:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()

    def finish_wandb(self, report: dict, step: int) -> None:
        """The final report's numbers under ``eval/``, then close the wandb run."""
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in report.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
            self.wandb.finish()
            self.wandb = None


def open_wandb(project: str, name: str, run_id: str, config: dict, out_dir: Path):
    """A wandb run: the checkpoint's ``run_id`` resumed (``resume="allow"``: a requeued job continues
    its curves), else a new one. wandb draws nothing from the training's random streams."""
    import wandb  # (an optional dependency: the wandb extra)

    kw = {} if os.environ.get("WANDB_DIR") else {"dir": str(out_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        run = wandb.init(project=project, name=name, id=run_id or None, resume="allow", config=config,
                         job_type="train", **kw)
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
    log.info("wandb run %s (%s)", run.id, "resumed" if run_id else "new")
    return run
