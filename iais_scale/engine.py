"""The trainer: builds its parts from the config, then runs the loop (docs/training.md).

``Trainer(cfg).fit(resume)`` is the whole job. The parts, each with one job: the data stream
(``data.pipeline``), the loss (``objectives.training_loss``), checkpoints (``checkpoint``), metrics
(``metrics``), signals and requeue (``preemption``), evaluation (``evaluate``).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt, evaluate as ev
from .config import ConfigError, ExperimentConfig, batch_plan, offloads_optimizer, to_dict
from .data import storage
from .data.collate import Collator
from .data.demo import ensure_demo
from .data.format import TOKENIZER_DIR, Manifest, relation_data_reason
from .data.pipeline import StreamProgress, make_train_stream, train_loader
from .data.samples import BadSampleCounter
from .data.shards import resolve_split
from .data.tokenizer import load_tokenizer
from .data.transforms import Augment
from .metrics import MetricsLogger, Window, all_reduce_record, setup_logging
from .model import CrossModalConfig, CrossModalModel, config_from_experiment
from .model.backbone_source import load_backbone_weights
from .model.image_inputs import image_input_of
from .model.loading import checkpoint_vocab_size, import_uniter, init_from_bert
from .objectives import training_loss
from .preemption import (
    Preemption,
    StopTraining,
    Watchdog,
    ignore_while_exiting,
    shield_data_worker,
    stop_code,
)

log = logging.getLogger("iais_scale")


# --------------------------------------------------------------------------- set-up


def _manifest(cfg: ExperimentConfig) -> Manifest | None:
    try:
        return Manifest.read(cfg.data.root)
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError) as e:  # a remote store refusing or failing: a reported problem
        raise ValueError(f"{storage.join(cfg.data.root, 'manifest.json')}: unreadable ({type(e).__name__}: {e})") from e


def feature_dim(cfg: ExperimentConfig, manifest: Manifest | None) -> int | None:
    """D of the region features: the model config's, else the data set's; None for pixel models."""
    if image_input_of(cfg.model).reads_pixels:
        return None
    return cfg.model.region_feature_dim or (manifest.feature_dim if manifest else None)


def tokenizer_dir(cfg: ExperimentConfig) -> str:
    return cfg.data.tokenizer or storage.join(cfg.data.root, TOKENIZER_DIR)


def check_inputs(cfg: ExperimentConfig, world: int, resume: str = "auto") -> list[str]:
    """Problems with the data, tokenizer, initial weights and output folder a run needs, all at once,
    before any process group exists (every rank runs it, reading only)."""
    p: list[str] = []
    folder = ckpt.run_folder_problem(Path(cfg.train.output_dir), resume)
    if folder:
        p.append(folder)
    d = cfg.data
    manifest = None
    try:
        manifest = _manifest(cfg)
    except ValueError as e:
        p.append(f"data.root: {e}")
    if not image_input_of(cfg.model).reads_pixels and feature_dim(cfg, manifest) is None:
        p.append(f"model.region_feature_dim: unknown (no {storage.join(d.root, 'manifest.json')} gives it); set it")
    specs = [d.split_spec(d.train_split)] if d.mode == "epoch" else [s.path for s in d.sources]
    for spec in specs:
        try:
            split = resolve_split(spec, need_sizes=d.mode == "epoch" or d.epoch_samples is None)
            if d.mode == "epoch" and (split.total or 0) < world * cfg.train.micro_batch_size:
                p.append(f"data.train_split: {spec} holds {split.total} samples, fewer than one micro-batch per rank"
                         f" ({world} ranks x train.micro_batch_size={cfg.train.micro_batch_size})")
        except (FileNotFoundError, ValueError) as e:
            p.append(f"data: {e}")
    evals = [d.split_spec(d.eval_split)] + ([d.split_spec(d.swap_split)] if d.swap_split else [])
    for spec in evals:
        try:
            resolve_split(spec, need_sizes=False)
        except (FileNotFoundError, ValueError) as e:
            p.append(f"data: {e}")
    tok = tokenizer_dir(cfg)
    problem = storage.missing_handler(tok)
    if problem:
        p.append(f"data.tokenizer: {problem}")
    elif not any(storage.exists(storage.join(tok, f)) for f in ("tokenizer.json", "vocab.txt")):
        p.append(f"data.tokenizer: no tokenizer files (tokenizer.json or vocab.txt) in {tok}")
    if cfg.model.init_from:  # (its tokenizer comparison is skipped where the tokenizer is unreadable)
        p += _vocab_problems(cfg, tok)
    if cfg.train.remote_sync and storage.missing_handler(cfg.train.remote_sync):
        p.append(f"train.remote_sync: {storage.missing_handler(cfg.train.remote_sync)}")
    try:
        batch_plan(cfg, world)
    except ConfigError as e:
        p += e.problems
    p += precision_problems(cfg.train.deepspeed_config)
    return p


def precision_problems(ds_path: str) -> list[str]:
    """A training dtype that this machine's accelerator lacks. DeepSpeed asks the same question,
    but only inside ``initialize``, on every rank ("Type fp16 is not supported on your device")."""
    from deepspeed.accelerator import get_accelerator

    try:
        ds = json.loads(Path(ds_path).read_text())
    except (OSError, ValueError):
        return []  # the config check reports an unreadable file
    acc = get_accelerator()
    p = []
    for dtype, supported in (("fp16", acc.is_fp16_supported), ("bf16", acc.is_bf16_supported)):
        if isinstance(ds.get(dtype), dict) and ds[dtype].get("enabled") and not supported():
            # PyTorch's oneDNN runs fp16 on x86 CPUs with AVX512-FP16 or AMX-FP16 only.
            why = " (a CPU needs AVX512-FP16 or AMX-FP16 for it)" if acc.device_name() == "cpu" else ""
            p.append(f"train.deepspeed_config: {ds_path} trains in {dtype}, which this machine's"
                     f" {acc.device_name()} accelerator does not support{why}; use a bf16 or fp32 DeepSpeed file"
                     " such as configs/deepspeed/zero2_bf16.json or zero2.json")
    return p


def _vocab_problems(cfg: ExperimentConfig, tok: str) -> list[str]:
    """An imported checkpoint's word embeddings must match the tokenizer (UNITER: cased BERT, 28,996)."""
    kind, path = cfg.model.init_from.split(":", 1)
    try:
        ckpt_vocab = checkpoint_vocab_size(kind, path)
    except (FileNotFoundError, ValueError, OSError) as e:
        return [f"model.init_from: {e}"]
    tok_vocab = _tokenizer_size(tok)
    if ckpt_vocab is not None and tok_vocab is not None and ckpt_vocab != tok_vocab:
        hint = (" UNITER's checkpoints use the cased BERT vocabulary (bert-base-cased, 28,996 tokens)"
                if ckpt_vocab == 28996 else "")
        return [f"data.tokenizer: {tok} has {tok_vocab} tokens but {cfg.model.init_from} has {ckpt_vocab} word"
                f" embeddings: the tokenizer is not the one the checkpoint was trained with.{hint}"]
    return []


def _tokenizer_size(tok: str) -> int | None:
    try:
        return len(load_tokenizer(tok))
    except Exception:  # reported by the caller's other checks
        return None


def deepspeed_config(cfg: ExperimentConfig, world_size: int, grad_accum: int) -> dict:
    """The DeepSpeed JSON with the batch arithmetic of the experiment config filled in. The
    experiment config owns micro-batch, accumulation and clipping; a DeepSpeed file that states
    other values is a contradiction and is rejected rather than silently overridden."""
    ds = json.loads(Path(cfg.train.deepspeed_config).read_text())
    t = cfg.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    problems = [
        f"{cfg.train.deepspeed_config}: {k}={ds[k]} contradicts the experiment config ({v});"
        " remove it from the DeepSpeed file, the experiment config sets it"
        for k, v in want.items()
        if k in ds and ds[k] != "auto" and ds[k] != v
    ]
    if problems:
        raise ConfigError(problems)
    ds.update(want)
    return ds


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then linear decay to 0 (the UNITER/IAIS fine-tuning schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def model_config(cfg: ExperimentConfig, tokenizer, feature_dim: int | None) -> CrossModalConfig:
    """The model config (Hugging Face) of an experiment: its size, the tokenizer's ids, the image input."""
    return config_from_experiment(
        cfg.model, vocab_size=len(tokenizer), region_feature_dim=feature_dim or 1,
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id, iais_layers=cfg.objectives.iais.layers,
        max_text_len=cfg.data.max_text_len,
    )


def build_model(cfg: ExperimentConfig, hf_cfg: CrossModalConfig, ds_config: dict | None = None) -> CrossModalModel:
    """The model of an experiment. Under ZeRO-3 it is built inside ``deepspeed.zero.Init`` (through
    transformers' own integration), so each rank only ever holds its partition of the weights."""
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # transformers reads it (weakly) while building
        model = CrossModalModel._from_config(hf_cfg)
        del keep
    else:
        model = CrossModalModel(hf_cfg)
    if cfg.model.init_from:
        if zero3:
            raise ConfigError(["model.init_from: load into a ZeRO-1/2 run, export, then start ZeRO-3 from that"])
        kind, path = cfg.model.init_from.split(":", 1)
        if kind == "bert":
            report = init_from_bert(model, path)
        else:
            report = import_uniter(model, path, itm_init=cfg.model.uniter_itm_init)
        log.info("initialised from %s: %d tensors loaded, %d missing, %d unexpected",
                 cfg.model.init_from, len(report.loaded), len(report.missing), len(report.unexpected))
    if image_input_of(cfg.model).uses_backbone:
        # Built from its config above; its pretrained weights now (under ZeRO-3: gathered, filled,
        # partitioned again).

        log.info("vision backbone %s", load_backbone_weights(model, cfg.model.backbone, cfg.model.backbone_weights))
    return model


# UNITER's build_optimizer: no decay where the name holds one of these (case matters: the region
# embedding's img_layer_norm / pos_layer_norm, here feature_norm / box_norm, do decay).
UNITER_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")
UNITER_NAMES = {"region_embeddings.feature_norm.": "img_layer_norm.", "region_embeddings.box_norm.": "pos_layer_norm.",
                ".norm.": ".LayerNorm."}  # ours -> UNITER's, for the name rule


def decays(name: str, ndim: int, rule: str) -> bool:
    """Whether parameter ``name`` gets weight decay: ``vectors`` decays matrices only; ``uniter``
    applies UNITER's name rule to the parameter's UNITER name."""
    if rule == "vectors" or name.startswith("image_backbone."):  # (UNITER has no vision backbone)
        return ndim >= 2
    for ours, theirs in UNITER_NAMES.items():
        name = name.replace(ours, theirs)
    return not any(n in name for n in UNITER_NO_DECAY)


def _optimizer(cfg: ExperimentConfig, model: torch.nn.Module, ds_cfg: dict):
    """AdamW over the trainable parameters, weight decay as ``optim.no_decay`` says; a vision
    backbone's trainable parameters in groups of their own at ``model.backbone_lr`` (frozen ones in none)."""
    o = cfg.optim
    parts: dict[tuple[bool, bool], list] = {(False, True): [], (False, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 the parameters are already partitioned (flat): their shape is ds_shape.
        decay = decays(name, len(getattr(p, "ds_shape", p.shape)), o.no_decay)
        parts.setdefault((name.startswith("image_backbone."), decay), []).append(p)
    groups = []
    for (backbone, decay), params in parts.items():  # the encoder's two groups first, as always
        if params or not backbone:
            group = {"params": params, "weight_decay": o.weight_decay if decay else 0.0}
            if backbone:
                group["lr"] = cfg.model.backbone_lr or o.lr
            groups.append(group)
    if offloads_optimizer(ds_cfg):
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's vectorised Adam (compiled once).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def set_uniter_eps(optimizer: torch.optim.Optimizer, eps: float, beta2: float) -> None:
    """Before an update: each group's eps such that torch's AdamW takes UNITER's step. UNITER adds
    eps to sqrt(v) before the bias correction sqrt(1 - beta2^t); torch after it, so torch's eps is
    eps / sqrt(1 - beta2^t), with t the update about to be taken (the optimizer's own count: skipped
    steps do not count, in either)."""
    for group in optimizer.param_groups:
        state = next((optimizer.state[p] for p in group["params"] if optimizer.state.get(p)), None)
        t = int(state["step"]) + 1 if state is not None else 1
        group["eps"] = eps / math.sqrt(1.0 - beta2 ** t)


# --------------------------------------------------------------------------- the trainer's own state


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": torch.tensor(internal, dtype=torch.int64),
            "python_version": version, "python_gauss": gauss}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"].tolist()), rng["python_gauss"]))


def build_collator(cfg: ExperimentConfig, tokenizer, manifest: Manifest | None, hf_cfg: CrossModalConfig) -> Collator:
    """The training batches' collator: the model's, with the experiment's augmentation (a flip is
    refused for relational captions)."""
    a = cfg.data.augment
    why = a.hflip and relation_data_reason(cfg.data.relation_captions, manifest)
    if why:
        raise ConfigError([f"data.augment.hflip: a horizontal flip swaps left and right, and {why}"])
    augment = Augment(random_resized_crop=a.random_resized_crop, scale=tuple(a.scale), ratio=tuple(a.ratio),
                      color_jitter=a.color_jitter, hflip=a.hflip)
    return ev.model_collator(tokenizer, hf_cfg, max_text_len=cfg.data.max_text_len, max_regions=cfg.data.max_regions,
                             augment=augment, seed=cfg.train.seed)


def _before_the_process_group(cfg: ExperimentConfig, resume: str, watchdog: Watchdog) -> None:
    """Threads per rank, logging, the demo data, and every input checked: a run that cannot work
    stops here, before any process group exists."""
    env_rank, env_world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world)))
    torch.set_num_threads(cfg.train.threads_per_rank or max(1, len(os.sched_getaffinity(0)) // local_world))
    setup_logging(env_rank, cfg.train.verbose)
    watchdog.beat("start-up: preparing the data")
    if cfg.data.make_demo and storage.is_local(cfg.data.root):
        ensure_demo(cfg.data.root, env_rank)
    problems = check_inputs(cfg, env_world, resume)
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run on this rank: builds the parts, resumes, steps, checkpoints, evaluates."""

    def __init__(self, cfg: ExperimentConfig, resume: str = "none", preemption: Preemption | None = None):
        import deepspeed

        self.cfg = cfg
        env_rank = int(os.environ.get("RANK", "0"))
        # Stop requests and hangs are handled from the start: cli.train installed the signal
        # handlers before its heavy imports; a hang in start-up (data, rendezvous) is reported too.
        self.preemption = preemption or Preemption(env_rank)
        self.watchdog = Watchdog(env_rank, cfg.train.watchdog_s)
        self.watchdog.start()
        _before_the_process_group(cfg, resume, self.watchdog)
        self.watchdog.beat("start-up: joining the process group")
        deepspeed.init_distributed(dist_backend=None, timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        _release_shm_name(self.rank)
        self.watchdog.beat("start-up: building the model")
        self.grad_accum, plan_line = batch_plan(cfg, self.world)
        ds_cfg = deepspeed_config(cfg, self.world, self.grad_accum)
        self.checkpoints = ckpt.Checkpointer(Path(cfg.train.output_dir), rank=self.rank, world=self.world,
                                             keep=cfg.train.keep_checkpoints, remote_sync=cfg.train.remote_sync)
        stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        self.resume_from, self.load_from = self.checkpoints.resume_from(resume, stage, self.watchdog.beat)
        if self.load_from != self.resume_from:  # another world size or stage: resharded, universal format
            ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
        self.manifest = _manifest(cfg)
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir(cfg))
        except ValueError as e:
            raise ConfigError([f"data.tokenizer: {e}"]) from None
        hf_cfg = model_config(cfg, self.tokenizer, feature_dim(cfg, self.manifest))
        self.collator = build_collator(cfg, self.tokenizer, self.manifest, hf_cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg, hf_cfg, ds_cfg)
        self.optimizer = _optimizer(cfg, model, ds_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                                                    config=ds_cfg)
        self.module: CrossModalModel = self.engine.module
        self.health = StepHealth(cfg.train.max_nonfinite_steps, fp16=bool(ds_cfg.get("fp16", {}).get("enabled")))
        if self.rank == 0:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            log.info("model: %.2fM parameters, %d ranks, ZeRO stage %d; batch: %s", n_params / 1e6, self.world,
                     self.engine.zero_optimization_stage(), plan_line)
            self.checkpoints.write_run_files(to_dict(cfg), self.module.config, self.tokenizer)

        self.step = 0
        self.progress = StreamProgress()
        self.bad = BadSampleCounter(cfg.data.max_bad_fraction, rank=self.rank)
        self.best_rsum = -1.0
        self.tokens_seen = 0  # text + image tokens of the matched pairs, for throughput
        self._eval_data: dict[str, ev.EvalData] = {}
        self._metrics: MetricsLogger | None = None  # while fit() runs: evaluations go to TensorBoard too
        self._stream = None
        self._rng_to_restore = None
        self.wandb_run_id = ""  # rank 0's wandb run (train.report_to), kept in checkpoints

    # ------------------------------------------------------------------ state

    def layout(self) -> dict:
        """What the data stream's exact replay depends on."""
        c = self.cfg
        return {"world_size": self.world, "micro_batch_size": c.train.micro_batch_size,
                "num_workers": c.data.num_workers, "mode": c.data.mode, "seed": c.train.seed}

    def state_dict(self) -> dict:
        """Everything of this rank that a resume needs besides DeepSpeed's weights and optimizer."""
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "best_rsum": self.best_rsum,
            "nonfinite_total": self.health.nonfinite_total, "overflow_total": self.health.overflow_total,
            "layout": self.layout(), "data": self.progress.state_dict(), "bad": self.bad.state_dict(),
            "rng": _rng_state(), "wandb_run_id": self.wandb_run_id,
        }

    def load_state_dict(self, state: dict, peers: list[dict]) -> str:
        """Restore this rank's state; ``peers`` are every saved rank's states (for a continuation on
        another layout). Returns a line that says how the data stream continues."""
        self.step, self.tokens_seen, self.best_rsum = state["step"], state["tokens_seen"], state["best_rsum"]
        self.health.nonfinite_total, self.health.overflow_total = state["nonfinite_total"], state.get("overflow_total", 0)
        self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id  # the same wandb run continues
        old, new = state["layout"], self.layout()
        if old == new:
            self.progress.load_state_dict(state["data"])
            self.bad.load_state_dict(state.get("bad", {}))
            self._rng_to_restore = state["rng"]
            return f"the data stream replays exactly (same layout: {new})"
        if old.get("seed") != new["seed"] or old.get("mode") != new["mode"]:
            raise ConfigError([f"--resume: the checkpoint's data stream (seed {old.get('seed')}, mode"
                               f" {old.get('mode')}) differs from this run's ({new['seed']}, {new['mode']})"])
        # The job's bad-sample counts are kept once (on rank 0), so that their sum over ranks stays right.
        if self.rank == 0:
            self.bad.load_state_dict(BadSampleCounter.merged([s.get("bad", {}) for s in peers]))
        self.progress, how = StreamProgress.continuation([s["data"] for s in peers], self.cfg.data.mode == "resampled")
        return f"layout {old} -> {new}: {how}"

    def save(self, tag: str) -> Path:
        self.watchdog.beat(f"saving {tag}")
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        return self.checkpoints.save(self.engine, tag, self.state_dict(),
                                     client_state={"step": self.step, UNIVERSAL_CHECKPOINT_INFO: {}})

    def load(self, folder: Path) -> None:
        """Weights, optimizer and schedule through DeepSpeed (resharded when needed), then our state."""
        self.engine.load_checkpoint(str(self.load_from.parent), tag=self.load_from.name, load_module_strict=True)
        how = self.load_state_dict(*self.checkpoints.load_states(folder))
        if self.rank == 0:
            log.info("resumed from step %d (%s); %s", self.step, self.load_from, how)

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the logged loss parts.

        A non-finite loss on any rank is poisoned to NaN so that DeepSpeed skips the update on every
        rank; such steps are counted and too many in a row abort. With fp16, a step DeepSpeed skips
        for a loss-scale overflow (finite loss) is counted apart and never aborts (``classify_step``).
        """
        cfg = self.cfg
        device = self.engine.device
        parts_sum: dict[str, torch.Tensor] = {}
        generator = torch.Generator()
        bad_loss = torch.zeros(1, device=device)
        tokens = torch.zeros((), dtype=torch.long)
        keys: list[str] = []
        for micro in range(self.grad_accum):
            self.watchdog.beat(f"step {self.step}: reading micro-batch {micro}")
            batch = next(batches)
            self.progress.take(batch, getattr(self._stream, "num_samples", None))  # (its bookkeeping keys go)
            self.bad.merge(*batch.pop("sample_counts"))
            keys += batch["keys"]
            tokens += _pair_tokens(batch, self.module)
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            # Mining and masking draw from a generator seeded by (seed, rank, step, micro-step).
            generator.manual_seed(hash((cfg.train.seed, self.rank, self.step, micro)) % (1 << 62))
            self.watchdog.beat(f"step {self.step}: forward/backward of micro-batch {micro}")
            loss, parts = training_loss(
                self.module, batch, cfg.objectives, step=self.step, total_steps=cfg.train.steps,
                mask_id=self.tokenizer.mask_token_id, generator=generator,
                group=dist.group.WORLD if self.world > 1 else None,
            )
            finite = torch.isfinite(loss.detach())
            bad_loss = torch.maximum(bad_loss, (~finite).float().reshape(1))
            loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))  # inf -> NaN: surely skipped
            self.engine.backward(loss)
            if cfg.optim.eps_mode == "uniter":
                set_uniter_eps(self.optimizer, cfg.optim.eps, cfg.optim.betas[1])
            self.engine.step()
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                v = torch.as_tensor(v, dtype=torch.float32).to(device)
                parts_sum[k] = parts_sum.get(k, torch.zeros((), device=device)) + v / self.grad_accum
        self.tokens_seen += int(tokens)
        if self.world > 1:
            dist.all_reduce(bad_loss, op=dist.ReduceOp.MAX)
        grad_norm = _grad_norm(self.engine)
        applied = self.engine.was_step_applied()
        if not applied and cfg.optim.schedule_steps == "all":  # DeepSpeed moved it with applied updates only
            self.scheduler.step()
        self.health.record(self.step, bool(bad_loss.item()), applied, grad_norm,
                           getattr(self.engine.optimizer, "cur_scale", "?"))
        parts_out = {k: float(v) for k, v in parts_sum.items()}  # one host sync per step
        parts_out["grad_norm"] = grad_norm if applied else float("nan")
        if cfg.train.log_sample_keys:  # an audit trail of what each step trained on
            self.checkpoints.log_sample_keys({"step": self.step + 1, "world_size": self.world, "keys": keys})
        self.step += 1
        return parts_out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str | None = None, *, final: bool = True, **extra) -> dict:
        """The report on ``split`` (default: the evaluation split); ``final=False`` only appends it
        to ``eval_history.jsonl`` (periodic model-selection evaluations)."""
        cfg = self.cfg
        split = split or cfg.data.eval_split
        self.watchdog.beat(f"evaluating on {split} at step {self.step}")
        if split not in self._eval_data:
            swap = cfg.data.split_spec(cfg.data.swap_split) if cfg.data.swap_split and split == cfg.data.eval_split else None
            self._eval_data[split] = ev.build_eval_data(self.collator, cfg.data.split_spec(split), swap,
                                                        max_images=cfg.eval.max_images)
        report = ev.evaluate(self.module, self._eval_data[split], batch_size=cfg.eval.batch_size,
                             isd_alignments=cfg.eval.isd_alignments)
        report["split"] = split
        report["bad_samples"] = _sum_counts(dict(self.bad.bad), self.world)  # the job's, not rank 0's
        report["nonfinite_steps"], report["overflow_steps"] = self.health.nonfinite_total, self.health.overflow_total
        report.update(extra)
        if self.rank == 0:
            ev.write_report(report, self.checkpoints.out_dir, step=self.step, history_only=not final)
            if self._metrics is not None:
                self._metrics.log_eval(report, "eval" if final else "val", self.step)
            if not final:  # (the final report is printed whole)
                log.info("evaluation on %s at step %d: RSUM %.2f (TR R@1 %.2f, IR R@1 %.2f)", split, self.step,
                         report["rsum"], report["tr_r1"], report["ir_r1"])
            if final:
                print(ev.markdown_table(report), flush=True)
        return report

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg = self.cfg
        if self.resume_from is not None:
            self.load(self.resume_from)
        self.preemption.install()  # (a no-op where launchers/train.py installed it first)
        self.watchdog.beat("start-up: agreeing on stop requests")
        signum = self.preemption.agreed()
        if signum:  # asked to stop during start-up: nothing new to save
            self._stop_on_signal(signum, save=False)
        self._stream = make_train_stream(cfg.data, self.collator, cfg.train.micro_batch_size, self.rank, self.world,
                                         cfg.train.seed, self.progress.start())
        batches = iter(train_loader(self._stream, cfg.data.num_workers, worker_init_fn=shield_data_worker))
        if self._rng_to_restore is not None:  # after the loader exists: creating it draws from the torch RNG
            _set_rng_state(self._rng_to_restore)
        wandb = (dict(project=cfg.train.wandb_project, name=cfg.name, run_id=self.wandb_run_id, config=to_dict(cfg))
                 if "wandb" in cfg.train.report_to else None)
        logger = self._metrics = MetricsLogger(self.checkpoints.out_dir, self.rank, cfg.train.steps, initial=self.step,
                                               wandb=wandb)
        self.wandb_run_id = logger.wandb_run_id or self.wandb_run_id
        self.engine.train()
        window = Window()
        window.reset(self.tokens_seen)
        pairs_per_step = self.grad_accum * cfg.train.micro_batch_size
        try:
            while self.step < cfg.train.steps:
                window.add(self.train_step(batches))
                logger.tick()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    record = window.record(step=self.step, pairs_per_step=pairs_per_step, tokens=self.tokens_seen)
                    record.update(lr=self.scheduler.get_last_lr()[0], bad_samples=self.bad.bad_samples,
                                  nonfinite_steps=self.health.nonfinite_total, overflow_steps=self.health.overflow_total)
                    logger.log(all_reduce_record(record, self.world))
                    window.reset(self.tokens_seen)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                    selecting = cfg.data.val_split is not None
                    rsum = self.evaluate(cfg.data.val_split, final=not selecting)["rsum"]
                    if rsum > self.best_rsum:
                        self.best_rsum = rsum
                        self.save("best")
                    self.engine.train()
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.save(f"step{self.step}")
                self.watchdog.beat(f"step {self.step}: agreeing on stop requests")
                signum = self.preemption.agreed()
                if signum:
                    self._stop_on_signal(signum)
        finally:
            logger.close()

        if not self.checkpoints.is_complete(f"step{self.step}"):
            self.save(f"step{self.step}")
        final, extra = self._reported_checkpoint()
        if self.rank == 0:  # a consolidated Hugging Face folder, whatever the ZeRO stage
            self.watchdog.beat("exporting hf_model")
            try:
                ckpt.export_hf(final, self.checkpoints.hf_dir)
            except ValueError as e:  # hf_model/ holds files of the user's: theirs, kept; the checkpoint is saved
                log.error("%s; the checkpoint %s is complete: export it elsewhere with"
                          " `python -m iais_scale.checkpoint export %s OUT`", e, final, final)
        dist.barrier()
        report = self.evaluate(**extra)
        dist.barrier()
        self.watchdog.stop()
        logger.finish_wandb(report, self.step)
        logger.close()  # (again: the final evaluation reopened its TensorBoard writer)
        if self.rank == 0:
            log.info("outputs in %s: %s; checkpoint %s", self.checkpoints.out_dir,
                     ", ".join(self.checkpoints.outputs()), final)
        return report

    def _reported_checkpoint(self) -> tuple[Path, dict]:
        """The checkpoint the final report evaluates (``eval.report``), loaded, and what the report says
        of it: the last step, or the best validation RSUM of the run (the last step competing too)."""
        cfg, best = self.cfg, self.checkpoints.folder("best")
        final = self.checkpoints.folder(f"step{self.step}")
        extra = {"reported": {"checkpoint": "final", "step": self.step, "eval.report": cfg.eval.report}}
        if not (cfg.eval.report == "best" and cfg.data.val_split and self.checkpoints.is_complete("best")):
            return final, extra
        if self.checkpoints.choose([best]) is None:
            log.warning("reporting the final step %d instead of the damaged best checkpoint", self.step)
            return final, extra
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
            rsum = self.evaluate(cfg.data.val_split, final=False)["rsum"]  # the last step competes too
            if rsum > self.best_rsum:
                self.best_rsum = rsum
                self.save("best")
        self.engine.load_checkpoint(str(best.parent), tag="best", load_module_only=True,
                                    load_optimizer_states=False, load_lr_scheduler_states=False)
        best_step = (ckpt.read_marker(best) or {}).get("step")
        return best, {"selected_by": {"split": cfg.data.val_split, "rsum": self.best_rsum, "step": best_step},
                      "reported": {"checkpoint": "best", "step": best_step, "eval.report": cfg.eval.report}}

    def _stop_on_signal(self, signum: int, save: bool = True) -> None:
        """Save ``step{N}`` (with ``save``; a stop during start-up has nothing new) and stop."""
        saved = str(self.save(f"step{self.step}")) if save else None
        code = stop_code(signum, self.rank, saved, self.step)
        dist.barrier()
        self.watchdog.stop()
        raise StopTraining(code)


def run(cfg: ExperimentConfig, resume: str = "none", preemption: Preemption | None = None) -> dict:
    """Train, checkpoint, evaluate; returns the final evaluation report."""
    try:
        report = Trainer(cfg, resume, preemption).fit()
    except StopTraining:
        shutdown()  # every rank stops here together (a barrier precedes StopTraining)
        raise
    shutdown()
    return report


def shutdown() -> None:
    """The end of a run that every rank finished: destroy the process group, and from here to the exit
    ignore stop signals (``ignore_while_exiting``). Left to interpreter exit, gloo's worker threads
    abort the process (``terminate called without an active exception``, exit code 250 through the
    launcher; pytorch#190489). A rank failing alone skips this, as torchtitan does, so that it never
    waits on peers."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    ignore_while_exiting()


def _release_shm_name(rank: int) -> None:
    """Unlink this rank's name of DeepSpeed's CPU all-reduce buffer in /dev/shm once every rank has
    mapped it (a barrier): the mappings stay, and the 70 MB file no longer outlives the process
    (DeepSpeed never unlinks it; on a CPU machine every run, and every kill, would leak one per rank).
    Every rank enters the barrier, whether or not it has such a file (GPU runs have none)."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    dist.barrier()
    try:
        os.unlink(name)
    except OSError:  # none here (GPU, or another launcher's naming), or not ours to remove
        pass


class StepHealth:
    """The optimizer steps DeepSpeed skipped: non-finite ones (counted; ``max_in_row`` in a row abort)
    and fp16 loss-scale overflows (counted apart; the scaler's normal warm-up, never an abort)."""

    def __init__(self, max_in_row: int, *, fp16: bool):
        self.max_in_row, self.fp16 = max_in_row, fp16
        self.nonfinite_in_row = self.nonfinite_total = self.overflow_total = 0

    def record(self, step: int, loss_nonfinite: bool, applied: bool, grad_norm: float, scale) -> None:
        kind = classify_step(loss_nonfinite, applied, grad_norm, self.fp16)
        if kind == "nonfinite":
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            log.warning("step %d: non-finite loss or gradient on some rank; DeepSpeed skipped the update", step)
            if self.nonfinite_in_row >= self.max_in_row:
                raise RuntimeError(f"{self.nonfinite_in_row} non-finite steps in a row at step {step}: aborting")
        else:
            self.nonfinite_in_row = 0
        if kind == "overflow":  # the scaler lowers its scale and goes on
            self.overflow_total += 1
            log.info("step %d: fp16 loss-scale overflow, update skipped (scale now %s)", step, scale)


def classify_step(loss_nonfinite: bool, applied: bool, grad_norm: float, fp16: bool) -> str:
    """What a finished optimizer step was: "ok", "overflow" (fp16: DeepSpeed's loss scaler found
    inf/NaN gradients of a finite loss and skipped the update while lowering its scale: the normal
    loss-scale warm-up) or "nonfinite" (a NaN/Inf loss on some rank, or, without fp16, a skipped or
    non-finite update: what the guard counts)."""
    if loss_nonfinite:
        return "nonfinite"
    if not applied:
        return "overflow" if fp16 else "nonfinite"
    return "ok" if math.isfinite(grad_norm) else "nonfinite"


def _sum_counts(counts: dict[str, int], world: int) -> dict[str, int]:
    """{reason: count} summed over ranks."""
    if world == 1:
        return dict(counts)
    parts: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(parts, counts)
    total: Counter = Counter()
    for p in parts:
        total.update(p)
    return dict(total)


def _pair_tokens(batch: dict, module: CrossModalModel) -> torch.Tensor:
    """Text and image tokens of a batch's pairs (CPU tensors: no device sync)."""
    if "region_attention" in batch:  # regions: each image has its own count
        image_tokens = batch["region_attention"].sum()
    else:  # a fixed count per image (a backbone's is known once it has run: 0 before)
        image_tokens = batch["text_attention"].shape[0] * module.image_tokens_per_image()
    return batch["text_attention"].sum() + image_tokens


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
