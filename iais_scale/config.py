"""Typed experiment configuration: YAML -> nested dataclasses, validated before anything starts.

Every problem in a config (unknown key, wrong type, bad value, impossible batch arithmetic, missing
files) is collected and reported at once, naming the field, so a user fixes a config in one pass and
no process group is ever created for a run that cannot work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import storage
from .data.format import Manifest, relation_data_reason
from .model.backbone_source import backbone_problems
from .model.configuration import MODEL_SIZES
from .model.image_inputs import IMAGE_INPUTS


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` lists them all."""

    def __init__(self, problems: list[str], config: Any = None):
        self.problems = problems
        self.config = config  # the config as built despite its problems (for further checks), if any
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


@dataclass
class SourceConfig:
    # A split: a folder (local or URL) of our shards or of img2dataset output, or a shard list such
    # as "s3://b/cc3m/{00000..00331}.tar" or "pipe:aws s3 cp s3://b/{0..9}.tar -" ("::" joins lists).
    path: str = ""
    weight: float = 1.0  # share of the samples drawn from this source: weight / sum of weights


@dataclass
class AugmentConfig:
    """Training augmentation of pixel inputs (patches / backbone models; docs/models.md). All off
    by default; evaluation always takes the deterministic resize + centre crop."""

    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the random crop
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # its aspect ratio (w / h)
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - j, 1 + j]; 0: off
    # A flip swaps left and right: refused for relation data (data.relation_captions).
    hflip: bool = False

    def enabled(self) -> bool:
        return self.random_resized_crop or self.color_jitter > 0 or self.hflip


@dataclass
class DataConfig:
    root: str = "data/demo"  # folder or URL with manifest.json, {split}/ shards, tokenizer/
    make_demo: bool = True  # generate the demo shards into `root` when they are missing
    # Splits: a name under `root`, or a split spec of its own (see SourceConfig.path).
    train_split: str = "train"
    eval_split: str = "test"
    # With train.eval_every: periodic evaluations on this split pick the best checkpoint, and the
    # final report evaluates that checkpoint on eval_split (the authors' model selection). None:
    # periodic evaluations on eval_split, the final report on the last step.
    val_split: str | None = None
    swap_split: str | None = "swap"  # relation-swap (Winoground-format) split, None to skip
    tokenizer: str | None = None  # tokenizer folder; default: {root}/tokenizer
    max_text_len: int = 40  # tokens including [CLS] and [SEP]
    max_regions: int = 36
    num_workers: int = 1
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01  # abort when more of the samples seen are bad
    # "epoch": every sample of the train split once per epoch (fine-tuning); "resampled": an
    # endless weighted mixture of `sources`, shards drawn with replacement (pretraining).
    mode: Literal["epoch", "resampled"] = "epoch"
    sources: list[SourceConfig] = field(default_factory=list)  # resampled mode only
    epoch_samples: int | None = None  # resampled: samples per nominal epoch (default: the sources' total)
    bucket_by_length: bool = False  # batches of similar caption + region length
    io_retries: int = 3  # reopen a remote shard that fails mid-way this often (then: bad_shard)
    io_backoff_s: float = 1.0  # first retry delay, doubled each time
    io_timeout_s: float = 60.0  # a remote read (HTTP, S3) that receives nothing this long fails, then is retried
    prefetch_shards: bool = True  # open the next remote shard while the current one is read
    max_member_mb: int = 256  # a tar member (image, features) larger than this is a bad sample
    # Training draws skip captions of more word pieces (UNITER: 60); evaluation never drops or cuts.
    max_train_caption_tokens: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Whether the captions state spatial relations ("left of"): then no augmentation may flip the
    # image. None: from the manifest ("relation_captions", else the demo/relations generators or a
    # "swap" split mean yes).
    relation_captions: bool | None = None

    def split_spec(self, split: str) -> str:
        """A split name under ``root``, or a spec of its own (a path, URL or shard list)."""
        if "/" in split or "::" in split or "{" in split or storage.scheme(split) != "file":
            return split
        return storage.join(self.root, split)


@dataclass
class ModelConfig:
    size: str = "tiny"  # tiny | base | large | xl, or explicit dims below
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    dropout: float = 0.1
    region_feature_dim: int | None = None  # default: read from the data set's manifest
    # Initial weights: "bert:FOLDER" (a local BERT checkpoint: text side) or "uniter:FILE.pt"
    # (UNITER's released checkpoints); None: random initialisation.
    init_from: str | None = None
    # uniter: how the ranking head starts from UNITER's 2-way itm_output: "row1" copies row 1 (the
    # authors' init_output), "difference" uses row 1 - row 0 (the pretrained match probability).
    uniter_itm_init: Literal["row1", "difference"] = "row1"
    image_input: str = "regions"  # one of model/image_inputs.py's IMAGE_INPUTS: regions, patches, backbone
    image_size: int = 384  # patches: input side in pixels (backbone: the backbone's own)
    patch_size: int = 32
    # image_input "backbone": a pretrained vision backbone's grid cells as image tokens (docs/models.md).
    backbone: str | None = None  # "hf:FOLDER" (transformers; a bare folder too) or "timm:NAME"
    backbone_weights: str = "pretrained"  # "pretrained" (folder / hub cache), "random" or a state-dict file
    backbone_trainable_blocks: int = 0  # 0: frozen; N: its last N blocks train; -1: all of it
    backbone_lr: float | None = None  # learning rate of the backbone's parameters (default: optim.lr)
    backbone_max_tokens: int | None = None  # average-pool the grid to at most this many tokens
    itc_dim: int = 0  # > 0 adds contrastive projections (ITC loss, ITC-mined negatives, re-ranking)
    gradient_checkpointing: bool = False
    checkpoint_every_k_layers: int = 1  # with gradient_checkpointing: recompute every k-th layer


@dataclass
class IaisConfig:
    enabled: bool = True
    alignment: Literal["singular", "distributed", "congruence"] = "singular"
    # "alternate": L on text-anchored groups, V on image-anchored ones (the reference recipe).
    direction: Literal["alternate", "L", "V", "both"] = "alternate"
    layers: list[int] = field(default_factory=lambda: [-1])  # layer indices, loss averaged
    weight: float = 1.0  # coefficient in front of the schedule
    schedule: Literal["constant", "linear", "exp", "log"] = "exp"
    # Guard against the degenerate minimum (docs/iais-spec.md section 7: IAIS satisfied by uniform
    # attention), off by default (null). When set, each IAIS layer adds, per positive pair, the excess
    # relu(H - entropy_ceiling) of the mean normalised row entropy H of each of S_L, S_V, A_t2i and
    # A_i2t (mean over the four and the layers), times entropy_guard_weight, under the same schedule
    # weight w(t) as IAIS. Zero wherever attention is sharper than the ceiling; IAIS itself is unchanged.
    entropy_ceiling: float | None = None
    entropy_guard_weight: float = 1.0


@dataclass
class ObjectiveConfig:
    mlm_weight: float = 1.0  # masked language modelling, conditioned on the image
    mlm_prob: float = 0.15
    # Warm-up steps with MLM alone before ranking starts; below 1, a fraction of train.steps (the demo's
    # 0.375: 300 of its 800 steps, and still a warm-up in a run shortened with train.steps=60).
    mlm_only_steps: float = 0
    itm_rank_weight: float = 1.0  # ranking of hard-negative groups by the ITM head (+ IAIS on positives)
    itm_rank_loss: Literal["hinge", "bce", "softmax"] = "hinge"  # hinge: the paper's recipe; bce: UNITER's ITM
    margin: float = 0.2  # hinge margin on sigmoid scores
    num_candidates: int = 15  # candidates per anchor (see mining), scored without gradient
    num_hard: int = 3  # hardest of those kept in the group
    # Where the candidates come from: "cross" samples them from the micro-batch (the reference);
    # "itc" takes the global batch's (every rank's micro-batch) most similar under the contrastive
    # embeddings of unimodal passes. The cross-encoder then scores them without gradient and keeps
    # the num_hard highest; with num_hard == num_candidates nothing is scored.
    mining: Literal["cross", "itc"] = "cross"
    # mining: itc: mine within blocks of this many consecutive ranks (e.g. 8: the GPUs of a node),
    # whose micro-batches are then the candidate pool; 0: the whole world (docs/clusters.md).
    mining_group_size: int = 0
    # Groups per micro-batch: the first N pairs anchor groups, the whole batch is the candidate pool
    # (0: every pair anchors one). The reference: 1 group of 32 from 400 pairs, 8 accumulated.
    anchors_per_batch: int = 0
    # "alternate": micro-steps alternate text-anchored groups (negative images, IAIS L) and
    # image-anchored ones (negative texts, IAIS V); "both": every micro-step has both kinds (the
    # authors' iteration: one group of each kind).
    group_kinds: Literal["alternate", "both"] = "alternate"
    # With group_kinds: both, which pairs anchor the image-anchored groups: "shared" the same as the
    # text-anchored ones; "separate" the next anchors_per_batch pairs of the micro-batch (independent
    # anchors, as the authors' two loaders draw them; mining: cross).
    group_anchors: Literal["shared", "separate"] = "shared"
    itc_weight: float = 0.0  # contrastive loss (needs model.itc_dim > 0)
    mrfr_weight: float = 0.0  # masked region feature regression (region inputs)
    mrfr_prob: float = 0.15
    # Pretraining: each step trains ONE task drawn by these ratios (UNITER's task mixing), e.g.
    # {mlm: 2, itm_rank: 1, mrfr: 1}; empty: every task whose weight is > 0, every step.
    task_mix: dict[str, float] = field(default_factory=dict)
    iais: IaisConfig = field(default_factory=IaisConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 2.0
    # The authors' optimiser where it differs from torch's AdamW (docs/reproduce.md, "The authors' code"):
    # no_decay "vectors": no weight decay on any bias or norm weight; "uniter": UNITER's name rule
    # (bias, LayerNorm.weight, LayerNorm.bias), under which the region embedding's two norms decay.
    no_decay: Literal["vectors", "uniter"] = "vectors"
    # eps "torch": added to sqrt(v / (1 - beta2^t)); "uniter": added to sqrt(v) before that bias
    # correction (UNITER's optim/adamw.py), i.e. torch's eps / sqrt(1 - beta2^t), larger at the first steps.
    eps_mode: Literal["torch", "uniter"] = "torch"
    # The learning-rate schedule's step: "applied" counts the updates DeepSpeed applied (it skips the
    # schedule with an fp16-overflow or non-finite step); "all" every optimizer step (the authors' global_step).
    schedule_steps: Literal["applied", "all"] = "applied"


@dataclass
class TrainConfig:
    steps: int = 500
    micro_batch_size: int = 32  # pairs per rank per micro-step
    # The batch per optimizer step: one of these three (none: grad_accum 1). global_batch_size (pairs)
    # and groups_per_step (ranking groups, all ranks) keep a recipe's optimisation whatever the world
    # size: the accumulation follows from them (see batch_plan).
    grad_accum: int | None = None
    global_batch_size: int | None = None
    groups_per_step: int | None = None
    seed: int = 0
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    output_dir: str = "runs/demo"
    log_every: int = 10
    verbose: bool = False  # also other libraries' INFO lines (DeepSpeed, transformers) and every rank's warnings
    watchdog_s: float = 1800.0  # a rank without progress this long logs where it is and exits (0: off)
    dist_timeout_s: float = 1800.0  # NCCL/gloo collective timeout
    remote_sync: str | None = None  # a URL (s3://, gs://, file://...) that receives each complete checkpoint
    log_sample_keys: bool = False  # each rank appends the keys it trains on to sample_keys/rank{R}.jsonl
    threads_per_rank: int | None = None  # torch intra-op threads; default: cores / local ranks
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on a signal)
    keep_checkpoints: int = 3  # newest complete step checkpoints kept (the best one is kept apart)
    resume: str = "none"  # "none", "auto" (newest complete checkpoint in output_dir) or a path
    eval_every: int = 0  # steps between evaluations (0: only at the end); the best RSUM is kept
    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    # Where metrics go besides the log and train_log.jsonl: "tensorboard" and/or "wandb" (the run
    # id is kept in the checkpoint: a resumed or requeued job continues the same wandb run;
    # WANDB_MODE, WANDB_DIR, WANDB_ENTITY as wandb reads them).
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "iais_scale"


@dataclass
class EvalConfig:
    batch_size: int = 512  # pairs per inference micro-batch
    # The weights the final report evaluates: "best" (the best validation RSUM, with data.val_split;
    # else the last step) or "final" (the last step, as the authors' train_itm_hard_negatives.py).
    report: Literal["best", "final"] = "best"
    max_images: int | None = None  # evaluate on the first N images only (all by default)
    isd_alignments: list[str] = field(
        default_factory=lambda: ["singular", "distributed", "congruence"]
    )


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> list[str]:
        """Value checks across fields; returns the problems (empty when fine)."""
        p: list[str] = []
        o, t, d, m = self.objectives, self.train, self.data, self.model
        for name, value in (
            ("train.steps", t.steps),
            ("train.micro_batch_size", t.micro_batch_size),
            ("data.max_text_len", d.max_text_len - 2),
            ("data.max_regions", d.max_regions),
            ("data.max_member_mb", d.max_member_mb),
            ("eval.batch_size", self.eval.batch_size),
            ("train.keep_checkpoints", t.keep_checkpoints),
            ("train.max_nonfinite_steps", t.max_nonfinite_steps),
            ("train.log_every", t.log_every),
        ):
            if value < 1:
                p.append(f"{name}: must be at least 1 (got {value})")
        for name, value in (("train.grad_accum", t.grad_accum), ("train.global_batch_size", t.global_batch_size),
                            ("train.groups_per_step", t.groups_per_step), ("eval.max_images", self.eval.max_images),
                            ("data.max_train_caption_tokens", d.max_train_caption_tokens)):
            if value is not None and value < 1:
                p.append(f"{name}: must be at least 1 or null (got {value})")
        if sum(x is not None for x in (t.grad_accum, t.global_batch_size, t.groups_per_step)) > 1:
            p.append("train.grad_accum: give one of grad_accum, global_batch_size and groups_per_step"
                     " (the other two follow from it and the world size)")
        for name, value in (("data.num_workers", d.num_workers), ("data.io_retries", d.io_retries),
                            ("data.shuffle_buffer", d.shuffle_buffer), ("optim.warmup_steps", self.optim.warmup_steps),
                            ("train.watchdog_s", t.watchdog_s), ("data.io_backoff_s", d.io_backoff_s)):
            if not value >= 0:  # also catches NaN
                p.append(f"{name}: must be >= 0 (got {value})")
        for name, value in (("optim.lr", self.optim.lr), ("optim.eps", self.optim.eps),
                            ("train.dist_timeout_s", t.dist_timeout_s), ("data.io_timeout_s", d.io_timeout_s)):
            if not (value > 0 and math.isfinite(value)):
                p.append(f"{name}: must be a positive finite number (got {value})")
        for name, value in (("train.dist_timeout_s", t.dist_timeout_s), ("train.watchdog_s", t.watchdog_s),
                            ("data.io_timeout_s", d.io_timeout_s)):
            if value > MAX_TIMEOUT_S:  # (timedelta and the transports overflow far below 1e300)
                p.append(f"{name}: at most {MAX_TIMEOUT_S:.0f} s, 30 days (got {value})")
        if not (self.optim.grad_clip >= 0 and math.isfinite(self.optim.grad_clip)):
            p.append(f"optim.grad_clip: must be >= 0 (0: off) and finite (got {self.optim.grad_clip})")
        if not (self.optim.weight_decay >= 0 and math.isfinite(self.optim.weight_decay)):
            p.append(f"optim.weight_decay: must be >= 0 and finite (got {self.optim.weight_decay})")
        if not all(0 <= b < 1 for b in self.optim.betas):
            p.append(f"optim.betas: each must lie in [0, 1) (got {list(self.optim.betas)})")
        if not 0 <= m.dropout < 1:
            p.append(f"model.dropout: must lie in [0, 1) (got {m.dropout})")
        if not 0 < o.mlm_prob < 1:
            p.append(f"objectives.mlm_prob: must lie in (0, 1) (got {o.mlm_prob})")
        if o.num_hard < 1 or o.num_hard > o.num_candidates:
            p.append(f"objectives.num_hard: must lie in [1, num_candidates={o.num_candidates}] (got {o.num_hard})")
        if o.num_candidates > t.micro_batch_size - 1:
            p.append(
                f"objectives.num_candidates: candidates are other pairs of the micro-batch (mining: cross)"
                f" or of the global batch (mining: itc), so at most train.micro_batch_size - 1 ="
                f" {t.micro_batch_size - 1} (got {o.num_candidates})"
            )
        if o.mining_group_size < 0:
            p.append(f"objectives.mining_group_size: must be >= 0 (0: the whole world; got {o.mining_group_size})")
        elif o.mining_group_size > 0 and o.mining != "itc":
            p.append("objectives.mining_group_size: only used with objectives.mining 'itc' (the candidate pool of"
                     " 'cross' is the rank's own micro-batch); set it to 0")
        if not 0 <= o.anchors_per_batch <= t.micro_batch_size:
            p.append(f"objectives.anchors_per_batch: must lie in [0, train.micro_batch_size={t.micro_batch_size}]")
        if o.group_anchors == "separate" and not (
                o.group_kinds == "both" and o.mining == "cross" and 0 < 2 * o.anchors_per_batch <= t.micro_batch_size):
            p.append("objectives.group_anchors: separate needs group_kinds: both, mining: cross and"
                     f" 2 x anchors_per_batch ({o.anchors_per_batch}) pairs in train.micro_batch_size ({t.micro_batch_size})")
        if o.mlm_only_steps >= t.steps and o.itm_rank_weight > 0:
            p.append(f"objectives.mlm_only_steps: must be below train.steps={t.steps}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(t, name) < 0:
                p.append(f"train.{name}: must be 0 (off) or positive (got {getattr(t, name)})")
        for task, ratio in o.task_mix.items():
            if task == "rank":
                p.append("objectives.task_mix: the task 'rank' is now called 'itm_rank'")
            elif task not in TASKS:
                p.append(f"objectives.task_mix: unknown task {task!r} (tasks: {', '.join(TASKS)})")
            elif ratio is not None and not ratio >= 0:
                p.append(f"objectives.task_mix.{task}: must be >= 0 (got {ratio})")
        if (o.itc_weight > 0 or o.mining == "itc" or o.task_mix.get("itc")) and m.itc_dim <= 0:
            p.append("model.itc_dim: must be > 0 for the ITC loss or ITC mining")
        if o.mining == "itc" and o.itc_weight <= 0 and not o.task_mix.get("itc"):
            p.append("objectives.mining: 'itc' ranks by embeddings that only the ITC loss trains;"
                     " set objectives.itc_weight > 0 (or an 'itc' share in objectives.task_mix)")
        kind = IMAGE_INPUTS.get(m.image_input)
        if (o.mrfr_weight > 0 or o.task_mix.get("mrfr")) and kind is not None and not kind.mrfr_head:
            p.append(f"objectives.mrfr_weight: masked region regression needs region features; model.image_input"
                     f" {m.image_input!r} has no regression head")
        if not o.iais.layers:
            p.append("objectives.iais.layers: name at least one layer")
        n_layers = m.num_layers or MODEL_SIZES.get(m.size, (None, None))[1]
        if n_layers is not None:
            out = [i for i in o.iais.layers if not -n_layers <= i < n_layers]
            if out:
                p.append(f"objectives.iais.layers: {out} out of range for a {n_layers}-layer model"
                         f" (use 0..{n_layers - 1} or negative indices from the end)")
        if not (o.iais.weight >= 0 and math.isfinite(o.iais.weight)):
            p.append(f"objectives.iais.weight: must be >= 0 and finite (got {o.iais.weight})")
        if o.iais.entropy_ceiling is not None and not 0 < o.iais.entropy_ceiling < 1:
            p.append("objectives.iais.entropy_ceiling: must lie in (0, 1) (normalised entropy; 1 = uniform),"
                     f" or null for no guard (got {o.iais.entropy_ceiling})")
        if not (o.iais.entropy_guard_weight >= 0 and math.isfinite(o.iais.entropy_guard_weight)):
            p.append(f"objectives.iais.entropy_guard_weight: must be >= 0 and finite (got {o.iais.entropy_guard_weight})")
        if self.optim.eps_mode == "uniter" and offloads_optimizer(_read_json(self.train.deepspeed_config)):
            p.append("optim.eps_mode: uniter sets torch AdamW's eps per step; ZeRO-Offload's DeepSpeedCPUAdam"
                     " keeps its own (use eps_mode: torch there)")
        for a in self.eval.isd_alignments:
            if a not in ("singular", "distributed", "congruence"):
                p.append(f"eval.isd_alignments: unknown alignment {a!r}")
        if not 0 <= d.max_bad_fraction <= 1:
            p.append("data.max_bad_fraction: must lie in [0, 1]")
        if d.mode == "resampled" and not d.sources:
            p.append("data.sources: data.mode 'resampled' needs at least one source {path, weight}")
        if d.mode == "epoch" and d.sources:
            p.append("data.sources: only used when data.mode is 'resampled' (epoch mode reads data.train_split)")
        for i, src in enumerate(d.sources):
            if src is not None and not src.path:
                p.append(f"data.sources[{i}].path: required (a split folder, URL or shard list)")
            if src is not None and not src.weight > 0:
                p.append(f"data.sources[{i}].weight: must be positive (got {src.weight})")
        if d.epoch_samples is not None and d.epoch_samples < 1:
            p.append(f"data.epoch_samples: must be at least 1 (got {d.epoch_samples})")
        if m.size not in MODEL_SIZES and m.size != "custom":
            p.append(f"model.size: one of {sorted(MODEL_SIZES)} or 'custom' (got {m.size!r})")
        if m.init_from is not None and not m.init_from.startswith(("bert:", "uniter:")):
            p.append(f"model.init_from: 'bert:FOLDER' or 'uniter:FILE' (got {m.init_from!r})")
        if m.size == "custom":
            for dim in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
                if getattr(m, dim) is None:
                    p.append(f"model.{dim}: required when model.size is 'custom'")
        p += self._image_problems()
        p += deepspeed_file_problems(t.deepspeed_config)
        return p

    def _image_problems(self) -> list[str]:
        """Backbone, augmentation, relation-data and tracking checks."""
        p: list[str] = []
        d, m, t = self.data, self.model, self.train
        kind = IMAGE_INPUTS.get(m.image_input)
        if kind is None:
            p.append(f"model.image_input: one of {', '.join(IMAGE_INPUTS)} (got {m.image_input!r})")
        elif kind.uses_backbone:
            p += backbone_problems(m.backbone, m.backbone_weights)
        elif m.backbone is not None:
            p.append(f"model.backbone: only used with a backbone image input (model.image_input is {m.image_input!r})")
        if m.backbone_trainable_blocks < -1:
            p.append(f"model.backbone_trainable_blocks: 0 (frozen), N > 0 (the last N blocks) or -1 (all);"
                     f" got {m.backbone_trainable_blocks}")
        if m.backbone_lr is not None and not (m.backbone_lr > 0 and math.isfinite(m.backbone_lr)):
            p.append(f"model.backbone_lr: must be a positive finite number or null (got {m.backbone_lr})")
        if m.backbone_lr is not None and m.backbone_trainable_blocks == 0:
            p.append("model.backbone_lr: the backbone is frozen (backbone_trainable_blocks 0)")
        if m.backbone_max_tokens is not None and m.backbone_max_tokens < 1:
            p.append(f"model.backbone_max_tokens: must be at least 1 or null (got {m.backbone_max_tokens})")
        a = d.augment
        lo, hi = a.scale
        if not 0 < lo <= hi <= 1:
            p.append(f"data.augment.scale: need 0 < min <= max <= 1 (got {list(a.scale)})")
        if not 0 < a.ratio[0] <= a.ratio[1]:
            p.append(f"data.augment.ratio: need 0 < min <= max (got {list(a.ratio)})")
        if not 0 <= a.color_jitter < 1:
            p.append(f"data.augment.color_jitter: must lie in [0, 1) (got {a.color_jitter})")
        if a.enabled() and kind is not None and not kind.reads_pixels:
            p.append(f"data.augment: augments pixels; model.image_input {m.image_input!r} reads region features")
        if a.hflip:
            why = relation_data_reason(d.relation_captions, _local_manifest(d.root))
            if why:
                p.append(f"data.augment.hflip: a horizontal flip swaps left and right, and {why}; a flipped"
                         " image contradicts its relational captions (set data.relation_captions: false only"
                         " if no caption depends on left/right)")
        for target in t.report_to:
            if target not in REPORT_TARGETS:
                p.append(f"train.report_to: unknown target {target!r} (one of {list(REPORT_TARGETS)})")
        if "wandb" in t.report_to:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                p.append("train.report_to: 'wandb' needs the wandb package (pip install 'iais_scale[wandb]')")
        return p


def groups_per_micro_step(o: ObjectiveConfig, micro_batch_size: int) -> int:
    """Ranking groups one rank back-propagates per micro-step."""
    return (o.anchors_per_batch or micro_batch_size) * (2 if o.group_kinds == "both" else 1)


def batch_plan(cfg: ExperimentConfig, world: int) -> tuple[int, str]:
    """(gradient accumulation steps for ``world`` ranks, a line saying how it follows from the recipe).

    Raises ConfigError when the recipe's global batch (pairs or groups per step) is not a whole
    number of micro-steps on this world size.
    """
    t = cfg.train
    per_micro = t.micro_batch_size * world
    if t.global_batch_size is not None:
        total, unit, per = t.global_batch_size, "pairs", per_micro
    elif t.groups_per_step is not None:
        total, unit, per = t.groups_per_step, "ranking groups", groups_per_micro_step(cfg.objectives, t.micro_batch_size) * world
    else:
        accum = t.grad_accum or 1
        return accum, f"{accum} micro-step(s) of {t.micro_batch_size} pairs x {world} rank(s) per optimizer step"
    if total % per:
        raise ConfigError([
            f"train.{'global_batch_size' if unit == 'pairs' else 'groups_per_step'}: {total} {unit} per step cannot"
            f" be split into micro-steps of {per} {unit} ({world} rank(s)); choose a world size or"
            " train.micro_batch_size that divides it"
        ])
    accum = total // per
    return accum, f"{total} {unit} per step = {accum} micro-step(s) x {per // world} {unit} x {world} rank(s)"


def offloads_optimizer(ds: Any) -> bool:
    """Whether a DeepSpeed config steps the optimizer on the CPU (ZeRO-Offload's DeepSpeedCPUAdam)."""
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(offload, dict) and offload.get("device") == "cpu"


def _read_json(path: str) -> Any:
    """A JSON file's content, or None when unreadable (``deepspeed_file_problems`` says why)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def deepspeed_file_problems(path: str) -> list[str]:
    """What is wrong with a DeepSpeed JSON file that no later stage should find out the hard way."""
    f = Path(path)
    if not f.is_file():
        return [f"train.deepspeed_config: {path} not found"]
    try:
        ds = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return [f"train.deepspeed_config: {path} is not valid JSON ({e})"]
    if not isinstance(ds, dict):
        return [f"train.deepspeed_config: {path} must hold a JSON object"]
    p = []
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        p.append(f"train.deepspeed_config: {path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    if "optimizer" in ds or "scheduler" in ds:
        p.append(f"train.deepspeed_config: {path}: optimizer/scheduler come from the experiment's optim section")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        p.append(f"train.deepspeed_config: {path}: fp16 and bf16 are both enabled")
    return p


MAX_TIMEOUT_S = 30 * 24 * 3600.0
TASKS = ("mlm", "itm_rank", "mrfr", "itc")
REPORT_TARGETS = ("tensorboard", "wandb")


def _local_manifest(root: str) -> Manifest | None:
    """``root/manifest.json`` of a local data set, or None (missing, remote or not JSON)."""
    if not storage.is_local(root):
        return None
    try:
        return Manifest.load(root)[0]  # (the fields that pass; the data checks report the rest)
    except OSError:
        return None


# --------------------------------------------------------------------------- YAML -> dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert a YAML value to ``tp``, appending a problem (and returning None) when it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        return _build(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        return {k: _convert(v, args[1], f"{path}.{k}", problems) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        if origin is tuple and len(value) != len(args):
            problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
            return None
        item_types = args if origin is tuple else [args[0]] * len(value)
        items = [_convert(v, t, f"{path}[{i}]", problems) for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept the number it plainly means.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return value


# Keys that were renamed: the old name is rejected with the new one.
RENAMED = {
    "objectives.rank_weight": "objectives.itm_rank_weight",
    "objectives.rank_loss": "objectives.itm_rank_loss",
}


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in RENAMED:
            problems.append(f"{path}: renamed to {RENAMED[path]}")
            continue
        if key not in names:
            problems.append(f"{path}: unknown key (valid: {', '.join(sorted(names))})")
            continue
        converted = _convert(value, hints[key], path, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**kwargs)


def _set_override(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {k} is not a section"])
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError([f"{dotted}: {raw!r} is not a YAML value ({' '.join(str(e).split())})"]) from None


def shipped_configs() -> Path:
    """The experiment and DeepSpeed configs that ship with the package (``iais_scale/configs`` in an
    installed wheel, the repository's ``configs/`` in a checkout)."""
    here = Path(__file__).resolve().parent
    return next((p for p in (here / "configs", here.parent / "configs") if p.is_dir()), here / "configs")


def find_config_file(spec: str | Path, folder: str = "", suffix: str = ".yaml") -> Path:
    """A config file: ``spec`` itself where it exists, else the shipped file of that name: ``demo`` or
    ``configs/demo.yaml``; with ``folder="deepspeed", suffix=".json"``, ``zero2`` or
    ``configs/deepspeed/zero2.json`` (what the shipped experiments name, resolved without a checkout)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_configs() / folder / (path.name if path.suffix else path.name + suffix)
    return shipped if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment config (a path, or the name of a shipped one: ``demo``), apply
    ``key.sub=value`` overrides, validate, or raise ConfigError."""
    data: dict = {}
    if path is not None:
        path = find_config_file(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path} (nor a shipped experiment of that name:"
                               f" {', '.join(sorted(p.stem for p in shipped_configs().glob('*.yaml')))})"])
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object (never constructed)
            raise ConfigError([f"{path}: not a valid experiment YAML: {' '.join(str(e).split())}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: the top level must be a mapping"])
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key.sub=value"])
        key, raw = item.split("=", 1)
        _set_override(data, key.strip(), raw)
    problems: list[str] = []
    cfg = _build(ExperimentConfig, data, "", problems)
    warmup = cfg.objectives.mlm_only_steps
    if isinstance(warmup, float) and 0 < warmup < 1 and isinstance(cfg.train.steps, int):
        cfg.objectives.mlm_only_steps = round(warmup * cfg.train.steps)
    elif isinstance(warmup, float) and warmup == int(warmup):
        cfg.objectives.mlm_only_steps = int(warmup)
    elif isinstance(warmup, float):
        problems.append(f"objectives.mlm_only_steps: a whole number of steps, or a fraction of train.steps below 1"
                        f" (got {warmup})")
    if isinstance(cfg.train.deepspeed_config, str):
        cfg.train.deepspeed_config = str(find_config_file(cfg.train.deepspeed_config, "deepspeed", ".json"))
    # Fields that failed their type check keep their defaults; value checks of every other field
    # still run, so one report lists everything.
    broken = {q.split(":", 1)[0] for q in problems}
    problems += [q for q in cfg.validate() if q.split(":", 1)[0] not in broken]
    if problems:
        raise ConfigError(problems, config=cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
