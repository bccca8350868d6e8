"""Checkpoints: the only module that knows their layout (docs/training.md, "Checkpoints").

``{output_dir}/checkpoints/{tag}/`` holds DeepSpeed's files, one ``rank{R}_state.safetensors`` per
rank (the trainer's own state, tensors + JSON metadata: nothing pickled) and, written last, a
``COMPLETE`` marker with every file's size and CRC-32. ``{output_dir}/model/`` holds the model
config and tokenizer. Nothing here loads a pickle that names anything outside an allow-list.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .data import storage
from .data.tokenizer import load_tokenizer
from .model import CrossModalConfig, CrossModalModel
from .model.hub import push_to_hub, write_remote_code

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"  # config.json + tokenizer files, written once at the start of a run
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
STEP_TAG = re.compile(r"^step(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
HF_DIR = "hf_model"  # the run's consolidated Hugging Face export
SAMPLE_KEYS_DIR = "sample_keys"  # train.log_sample_keys: what each step trained on, one file per rank


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, damaged, or needing code to load."""


# --------------------------------------------------------------------------- pickles

# What DeepSpeed's checkpoint files may name besides tensors, lists, dicts and numbers.
_ALLOWED_GLOBALS: list[Any] = []


def _allowed_globals() -> list[Any]:
    if not _ALLOWED_GLOBALS:
        import collections

        from deepspeed.runtime.fp16 import loss_scaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        # Plain records (dataclasses, enums) rebuilt from their fields: no code of theirs runs.
        _ALLOWED_GLOBALS.extend([collections.OrderedDict, loss_scaler.LossScaler, loss_scaler.DynamicLossScaler,
                                 ZeroStageEnum, fragment_address, torch.Size])
        try:
            from deepspeed.checkpoint.constants import SubparamShape

            _ALLOWED_GLOBALS.append(SubparamShape)
        except ImportError:
            pass
    return _ALLOWED_GLOBALS


def check_pickles(folder: Path) -> None:
    """Refuse a folder whose ``.pt`` files name anything outside the allow-list.

    Each file is opened with ``torch.load(weights_only=True)`` (tensors memory-mapped, not read):
    a file that would run code on a plain ``torch.load`` fails here, before DeepSpeed's own loaders
    (which use ``weights_only=False``) ever see it.
    """
    files = sorted(folder.rglob("*.pt"))
    with torch.serialization.safe_globals(_allowed_globals()):
        for f in files:
            try:
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # UnpicklingError names the global; others: a damaged file
                why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line),
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise CheckpointError(
                    f"{f}: refused: loading it would need more than tensors and DeepSpeed's plain records"
                    f" ({type(e).__name__}: {why[:300]}). A checkpoint from elsewhere may run"
                    " code when unpickled. If you made it yourself or trust its source, export it on a trusted"
                    " machine: `python -m iais_scale.checkpoint export FOLDER OUT --trust-pickles`, then"
                    " start from the Hugging Face folder OUT."
                ) from None


# --------------------------------------------------------------------------- the trainer's state


def write_state(path: Path, scalars: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """The trainer's state of one rank: tensors in safetensors, everything else as JSON metadata."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"state": json.dumps(scalars)})
    os.replace(tmp, path)


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        scalars = json.loads(f.metadata()["state"])
    return scalars, load_file(str(path))


def state_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank:05d}_state.safetensors"


def flatten_state(state: dict, prefix: str = "") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Nested state -> (JSON scalars, tensors keyed by dotted path; numpy arrays become tensors)."""
    scalars: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            s, t = flatten_state(v, key + ".")
            scalars.update(s)
            tensors.update(t)
        elif isinstance(v, Tensor):
            tensors[key] = v
        elif isinstance(v, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(v))
        else:
            scalars[key] = v
    return scalars, tensors


def unflatten_state(scalars: dict[str, Any], tensors: dict[str, Tensor]) -> dict:
    """Inverse of :func:`flatten_state` (tensors stay tensors)."""
    out: dict = {}
    for key, v in {**scalars, **tensors}.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = v
    return out


# --------------------------------------------------------------------------- integrity


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_records(folder: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """{name: {size, crc32}} of files of a checkpoint folder."""
    return {n: {"size": (folder / n).stat().st_size, "crc32": _crc32(folder / n)} for n in names}


def rank_files(folder: Path, rank: int) -> list[str]:
    """The files rank ``rank`` wrote into a checkpoint folder (DeepSpeed's and ours)."""
    mine = re.compile(rf"(^|_)(zero_pp_rank_{rank}_|rank{rank:05d}_state)")
    out = [p.name for p in folder.iterdir() if p.is_file() and mine.search(p.name)]
    if rank == 0:  # the replicated model states of ZeRO-0/1/2 are written by rank 0
        out += [p.name for p in folder.iterdir() if p.is_file() and p.name.startswith("mp_rank_")]
    return sorted(set(out))


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def verify(folder: Path, *, checksums: bool = True) -> list[str]:
    """What is wrong with a complete-marked checkpoint folder (empty when it is intact)."""
    marker = read_marker(folder)
    if marker is None:
        return [f"{folder}: no readable {COMPLETE} marker"]
    files = marker.get("files")
    if not isinstance(files, dict):
        return []  # written by an older version: nothing recorded to compare with
    problems = []
    for name, rec in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != rec.get("size"):
            problems.append(f"{p}: {p.stat().st_size} bytes, {rec.get('size')} when saved")
        elif checksums and _crc32(p) != rec.get("crc32"):
            problems.append(f"{p}: checksum differs from the one saved")
    world = marker.get("world_size")
    if isinstance(world, int) and "universal_of" not in marker:  # a universal folder has no rank states
        states = [f"rank{r:05d}_state.safetensors" for r in range(world)]
        problems += [f"{folder / n}: missing" for n in states if n not in files and not (folder / n).is_file()]
    return problems


# --------------------------------------------------------------------------- finding checkpoints


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``step{N}`` checkpoint, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = STEP_TAG.match(d.name)
            if m and (d / COMPLETE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).is_file() for w in HF_WEIGHTS)


@dataclass
class Resolved:
    """What a checkpoint argument points at."""

    kind: str  # "deepspeed" (a complete tag folder) or "hf"
    folder: Path  # the tag folder, or the HF folder
    model_dir: Path  # config + tokenizer
    run_dir: Path | None  # the run folder, when known
    step: int | None
    how: str = "as named"  # how it was chosen (said in evaluation logs and reports)

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder.parent

    @property
    def tag(self) -> str:
        return self.folder.name


def _run_model_dir(run_dir: Path) -> Path | None:
    for candidate in (run_dir / MODEL_DIR, run_dir / "hf_model"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def resolve(spec: str | Path, model_dir: str | Path | None = None) -> Resolved:
    """A checkpoint to read: an HF folder, a complete tag folder, a run's ``checkpoints/`` folder
    (its newest complete checkpoint) or a run folder: the checkpoint the run reported (``best`` where
    its ``eval.json`` says it selected one on validation, else its newest complete checkpoint). A
    folder without ``COMPLETE`` is refused."""
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: not a folder")
    if is_hf_folder(path):
        run_dir = path.parent if (path.parent / "train_log.jsonl").is_file() else None
        return Resolved("hf", path, Path(model_dir or path), run_dir, _last_logged_step(run_dir) if run_dir else None)
    if (path / CHECKPOINTS).is_dir():
        selected = _reported_selection(path)
        best = path / CHECKPOINTS / "best"
        if selected is not None and (best / COMPLETE).is_file():
            md = Path(model_dir) if model_dir else _run_model_dir(path)
            if md is None:
                raise FileNotFoundError(f"checkpoint {best}: no model config in {path / MODEL_DIR}")
            return Resolved("deepspeed", best, md, path, selected.get("step"),
                            f"the run's reported checkpoint: best RSUM on {selected.get('split')} (step"
                            f" {selected.get('step')})")
        path = path / CHECKPOINTS
    if not (path / COMPLETE).is_file():
        found = complete_checkpoints(path)
        if any(path.glob("*model_states.pt")):
            raise CheckpointError(f"checkpoint {path}: no {COMPLETE} marker: its save did not finish; refusing it")
        if not found:
            raise FileNotFoundError(
                f"checkpoint {path}: neither a Hugging Face folder (config.json + {HF_WEIGHTS[0]}), a complete"
                f" checkpoint folder (with {COMPLETE}), nor a folder holding complete step* checkpoints"
            )
        path = found[-1][1]
    run_dir = path.parent.parent
    md = Path(model_dir) if model_dir else _run_model_dir(run_dir)
    if md is None:
        raise FileNotFoundError(
            f"checkpoint {path}: no model config in {run_dir / MODEL_DIR} (the trainer writes config.json and the"
            " tokenizer there); pass the folder holding them explicitly"
        )
    m = STEP_TAG.match(path.name)
    step = int(m.group(1)) if m else (read_marker(path) or {}).get("step")
    how = "as named" if str(path) == str(Path(spec)) else f"the newest complete checkpoint (step {step})"
    return Resolved("deepspeed", path, md, run_dir, step, how)


def _reported_selection(run_dir: Path) -> dict | None:
    """``selected_by`` of a run's final report (model selection on validation), if any."""
    try:
        selected = json.loads((run_dir / "eval.json").read_text()).get("selected_by")
    except (OSError, ValueError, AttributeError):
        return None
    return selected if isinstance(selected, dict) else None


def _last_logged_step(run_dir: Path) -> int | None:
    """The step of the last record of a run's ``train_log.jsonl`` (the step its ``hf_model/`` holds)."""
    try:
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def resume_candidates(resume: str, out_dir: Path) -> list[Path]:
    """Folders to try for ``--resume``, best first: ``auto`` = every complete step checkpoint of the
    run, newest first (a damaged one falls back to the next); a path = that checkpoint alone."""
    if resume == "none":
        return []
    if resume == "auto":
        return [folder for _, folder in reversed(complete_checkpoints(out_dir / CHECKPOINTS))]
    if storage.scheme(resume) != "file":
        return [fetch_remote(resume, out_dir)]
    folder = Path(resume)
    if folder.is_dir() and not (folder / COMPLETE).is_file() and complete_checkpoints(folder):
        return [f for _, f in reversed(complete_checkpoints(folder))]
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return [folder]


# --------------------------------------------------------------------------- remote copies


def sync_to_remote(folder: Path, url: str) -> str:
    """Copy a complete checkpoint folder to ``url/{tag}``; the marker goes last, as locally."""
    target = storage.join(url, folder.name)
    storage.copy_tree(str(folder), target, skip=lambda name: name == COMPLETE)
    storage.write_bytes_atomic(storage.join(target, COMPLETE), (folder / COMPLETE).read_bytes())
    return target


def fetch_remote(url: str, out_dir: Path) -> Path:
    """Copy a complete remote checkpoint (``.../step{N}``, or the newest under a folder URL) into
    ``out_dir/checkpoints/`` and return the local folder."""
    url = url.rstrip("/")
    tag = storage.basename(url)
    if not STEP_TAG.match(tag):
        entries = storage.listdir(url) or []
        steps = [(int(m.group(1)), e) for e in entries if (m := STEP_TAG.match(storage.basename(e)))
                 and storage.exists(storage.join(e, COMPLETE))]
        if not steps:
            raise FileNotFoundError(f"--resume {url}: no complete step* checkpoint there")
        url, tag = max(steps)[1], storage.basename(max(steps)[1])
    if not storage.exists(storage.join(url, COMPLETE)):
        raise FileNotFoundError(f"--resume {url}: no {COMPLETE} marker (an unfinished upload)")
    local = out_dir / CHECKPOINTS / tag
    if not (local / COMPLETE).is_file():
        partial = local.with_name(local.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        storage.copy_tree(url, str(partial))
        shutil.rmtree(local, ignore_errors=True)
        os.replace(partial, local)
    return local


# --------------------------------------------------------------------------- saving


class Checkpointer:
    """The run folder of one training run and its checkpoints: where each file goes, and save,
    verify, choose, reshard, prune and sync (every rank holds one)."""

    def __init__(self, out_dir: Path, *, rank: int, world: int, keep: int, remote_sync: str | None = None):
        self.out_dir, self.rank, self.world, self.keep = out_dir, rank, world, keep
        self.ckpt_dir = out_dir / CHECKPOINTS
        self.remote_sync = remote_sync

    # ------------------------------------------------------------------ the run folder

    def folder(self, tag: str) -> Path:
        return self.ckpt_dir / tag

    def is_complete(self, tag: str) -> bool:
        return (self.ckpt_dir / tag / COMPLETE).is_file()

    @property
    def hf_dir(self) -> Path:
        return self.out_dir / HF_DIR

    def write_run_files(self, config: dict, model_config, tokenizer) -> None:
        """Rank 0, at the start: the experiment's ``config.json``, and in ``model/`` the model's config
        and tokenizer (what evaluation and export need beside the weights), each replaced whole."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        storage.write_bytes_atomic(str(self.out_dir / "config.json"), json.dumps(config, indent=2).encode())
        staging = Path(tempfile.mkdtemp(prefix=".model-", dir=self.out_dir))
        model_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(self.out_dir / MODEL_DIR, ignore_errors=True)
        os.replace(staging, self.out_dir / MODEL_DIR)

    def log_sample_keys(self, record: dict) -> None:
        """Append ``record`` (a step's sample keys) to this rank's audit file."""
        folder = self.out_dir / SAMPLE_KEYS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{self.rank:05d}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def outputs(self) -> list[str]:
        """The run's result files that exist now, for the closing log line."""
        return [n for n in ("train_log.jsonl", "eval.json", "eval.md", HF_DIR, "tensorboard") if (self.out_dir / n).exists()]

    # ------------------------------------------------------------------ saving and loading

    def save(self, engine, tag: str, state: dict, client_state: dict[str, Any] | None = None) -> Path:
        """DeepSpeed's files, then this rank's ``state`` (nested; tensors and arrays in safetensors);
        once every rank is done, rank 0 records every file's size and checksum in ``COMPLETE`` (last:
        a save cut short leaves no marker)."""
        import torch.distributed as dist

        scalars, tensors = flatten_state(state)
        folder = self.ckpt_dir / tag
        if self.rank == 0 and folder.exists():
            (folder / COMPLETE).unlink(missing_ok=True)  # overwriting: incomplete until done again
        dist.barrier()
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client_state or {})
        write_state(state_file(folder, self.rank), {**scalars, "rank": self.rank, "world_size": self.world}, tensors)
        records = file_records(folder, rank_files(folder, self.rank))
        gathered: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, records)
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            marker = {"step": scalars.get("step"), "time": time.time(), "world_size": self.world,
                      "zero_stage": engine.zero_optimization_stage(), "files": files}
            storage.write_bytes_atomic(str(folder / COMPLETE), json.dumps(marker, indent=1).encode())
            if STEP_TAG.match(tag):
                self.prune()
            if self.remote_sync:
                log.info("checkpoint %s copied to %s", folder, sync_to_remote(folder, self.remote_sync))
        dist.barrier()
        return folder

    def load_states(self, folder: Path) -> tuple[dict, list[dict]]:
        """(this rank's saved state, every saved rank's), as :meth:`save` was given them: the states of
        all ranks serve a continuation on another layout."""
        saved_world = (read_marker(folder) or {}).get("world_size", self.world)
        peers = [unflatten_state(*read_state(state_file(folder, r))) for r in range(saved_world)]
        return (peers[self.rank] if saved_world == self.world else peers[0]), peers

    def resume_from(self, resume: str, zero_stage: int, beat=lambda what: None) -> tuple[Path | None, Path | None]:
        """(the checkpoint ``--resume`` names, the folder DeepSpeed loads it from): ``auto`` = the
        newest intact step checkpoint (a damaged one falls back to an older); a folder or URL as named
        (a remote one fetched by rank 0 first; a damaged one refused). Saved on another world size or
        ZeRO stage, it loads from DeepSpeed's universal format, converted once by rank 0 and kept."""
        import torch.distributed as dist

        if resume not in ("none", "auto") and storage.scheme(resume) != "file":
            fetched = [str(fetch_remote(resume, self.out_dir)) if self.rank == 0 else None]
            if dist.is_initialized() and self.world > 1:
                dist.broadcast_object_list(fetched, src=0)
            resume = fetched[0]
        candidates = resume_candidates(resume, self.out_dir)
        chosen = self.choose(candidates, explicit=resume not in ("none", "auto") and len(candidates) == 1)
        if chosen is None and resume != "none" and self.rank == 0:
            log.info("--resume %s: no complete checkpoint in %s, starting at step 0", resume, self.ckpt_dir)
        if chosen is None or not needs_universal(chosen, self.world, zero_stage):
            return chosen, chosen
        return chosen, self._universal(chosen, beat)

    def _universal(self, folder: Path, beat) -> Path:
        """Rank 0 converts (once; kept beside the original), the others wait for it. A refused
        folder (a planted pickle) is refused on every rank."""
        import torch.distributed as dist

        out = folder.with_name(folder.name + UNIVERSAL_SUFFIX)
        refused: list[str | None] = [None]
        if self.rank == 0:
            marker = read_marker(folder) or {}
            log.warning("checkpoint %s was saved by %s ranks with ZeRO stage %s; this run has %d ranks: converting"
                        " it to DeepSpeed's universal format in %s (kept for later resumes)", folder,
                        marker.get("world_size"), marker.get("zero_stage"), self.world, out)
            beat(f"converting {folder} to a universal checkpoint")
            try:
                to_universal(folder, workers=max(1, min(4, os.cpu_count() or 1)))
            except CheckpointError as e:
                refused = [str(e)]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(refused, src=0)
        if refused[0]:
            raise CheckpointError(refused[0])
        return out

    def prune(self) -> None:
        """Keep the newest ``keep`` complete step checkpoints (the best one lives apart)."""
        found = complete_checkpoints(self.ckpt_dir)
        for _, folder in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(folder.with_name(folder.name + UNIVERSAL_SUFFIX), ignore_errors=True)

    def choose(self, candidates: list[Path], *, explicit: bool = False) -> Path | None:
        """The first candidate that verifies (sizes, checksums, no pickled code), decided by rank 0
        and broadcast. Automatic: a damaged one is named in a warning and the next one is tried.
        ``explicit`` (a checkpoint the user named): a damaged one is refused on every rank, naming
        the newest intact checkpoint beside it."""
        import torch.distributed as dist

        decision: list[str | None] = [None, None]  # (choice, refusal)
        if self.rank == 0:
            for folder in candidates:
                problems = intact_problems(folder)
                if not problems:
                    decision[0] = str(folder)
                    break
                if explicit:
                    intact = newest_intact(folder.parent, exclude=folder)
                    decision[1] = (f"--resume {folder}: refused, the checkpoint is damaged: {'; '.join(problems[:5])}. "
                                   + (f"The newest intact checkpoint beside it is {intact}: --resume {intact}, or"
                                      " --resume auto" if intact else "No intact checkpoint lies beside it"))
                    break
                log.warning("checkpoint %s is damaged, not using it: %s", folder, "; ".join(problems[:5]))
            if candidates and decision == [None, None]:
                log.warning("no intact checkpoint among %s: starting from scratch", [str(c) for c in candidates])
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[1]:
            raise CheckpointError(decision[1])
        return Path(decision[0]) if decision[0] else None


def intact_problems(folder: Path) -> list[str]:
    """Why a checkpoint folder cannot be loaded (empty when it can): its files against ``COMPLETE``,
    then every pickle against the allow-list."""
    problems = verify(folder)
    if not problems:
        try:
            check_pickles(folder)
        except CheckpointError as e:
            problems = [str(e)]
    return problems


def newest_intact(ckpt_dir: Path, exclude: Path | None = None) -> Path | None:
    """The newest complete step checkpoint of ``ckpt_dir`` that is intact, other than ``exclude``."""
    for _, folder in reversed(complete_checkpoints(ckpt_dir)):
        if folder != exclude and not intact_problems(folder):
            return folder
    return None


# --------------------------------------------------------------------------- the run folder

# What a run writes at the top of train.output_dir; any of them marks the folder as a run's.
RUN_FILES = ("train_log.jsonl", "config.json", CHECKPOINTS, MODEL_DIR, "eval.json", HF_DIR)


def run_folder_problem(out_dir: Path, resume: str) -> str | None:
    """Why a run may not write into ``out_dir`` (None when it may). A folder the user named is the
    user's: a new run (``--resume none``) starts only in an empty or missing folder, never on top
    of an earlier run (their logs, checkpoints and exports would mix) or of files of the user's."""
    if not out_dir.is_dir():
        return None if not out_dir.exists() else f"train.output_dir: {out_dir} is a file, not a folder"
    # Log files (a SLURM --output or a shell's `> run/log` pointed into the folder) are the run's company.
    entries = sorted(p.name for p in out_dir.iterdir() if not p.name.endswith((".out", ".err", ".log")))
    if not entries:
        return None
    ours = [n for n in entries if n in RUN_FILES]
    if ours and resume != "none":
        return None  # continuing this run
    if ours:
        return (f"train.output_dir: {out_dir} holds another run ({', '.join(ours[:4])}): continue it with"
                " --resume auto, or start this one in a new train.output_dir")
    return (f"train.output_dir: {out_dir} holds files that are not a run's ({', '.join(entries[:4])}"
            f"{', ...' if len(entries) > 4 else ''}): choose an empty or new folder")


# --------------------------------------------------------------------------- another world size


def needs_universal(folder: Path, world: int, zero_stage: int) -> bool:
    """Whether a checkpoint was partitioned differently (world size or ZeRO stage) from this run."""
    marker = read_marker(folder) or {}
    return marker.get("world_size", world) != world or marker.get("zero_stage", zero_stage) != zero_stage


def to_universal(folder: Path, *, workers: int = 2) -> Path:
    """DeepSpeed's universal checkpoint of ``folder`` (``ds_to_universal``), made once and kept
    beside it as ``{tag}_universal`` with its own ``COMPLETE`` marker; returns that folder.
    Call on one rank (the others wait): it is written into a private folder and renamed."""
    import argparse

    out = folder.with_name(folder.name + UNIVERSAL_SUFFIX)
    if (out / COMPLETE).is_file() and not verify(out):
        check_pickles(out)  # DeepSpeed's universal loader unpickles every file in it
        return out
    check_pickles(folder)  # the converter unpickles every file
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = folder.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    ds_to_universal(argparse.Namespace(
        input_folder=str(folder), output_folder=str(partial), num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True, inject_missing_state=True))
    names = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    marker = {**(read_marker(folder) or {}), "universal_of": folder.name, "files": file_records(partial, names)}
    storage.write_bytes_atomic(str(partial / COMPLETE), json.dumps(marker, indent=1).encode())
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


# --------------------------------------------------------------------------- weights out


def consolidated_state_dict(folder: Path, *, trust_pickles: bool = False) -> dict[str, Tensor]:
    """The full fp32 state dict of a DeepSpeed checkpoint tag folder, any ZeRO stage, any world size.

    ZeRO 1-3: DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` merges the partitions;
    without ZeRO the model-states file holds the module in its training dtype (cast to fp32 here).
    """
    if not trust_pickles:
        check_pickles(folder)
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        said = io.StringIO()  # its progress: print()s and a tqdm bar, noise in a run's log
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        log.debug("zero_to_fp32: %s", said.getvalue().strip())
        return state
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no DeepSpeed model states")
    module = torch.load(files[0], map_location="cpu", weights_only=not trust_pickles)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


# Pre-training heads: a checkpoint older than one of them may lack its weights without harm here.
UNUSED_BY_EVALUATION = ("mlm.", "mrfr.")


def load_model(spec: str | Path, model_dir: str | Path | None = None, device: str | torch.device = "cpu", *,
               trust_pickles: bool = False):
    """(model in eval mode, tokenizer, Resolved) from an HF folder or a complete DeepSpeed checkpoint."""
    info = resolve(spec, model_dir)
    if info.kind == "hf":
        model = CrossModalModel.from_pretrained(str(info.folder))
    else:
        config = CrossModalConfig.from_pretrained(str(info.model_dir))
        model = CrossModalModel(config)
        _load_into(model, consolidated_state_dict(info.folder, trust_pickles=trust_pickles), str(info.folder),
                   allow_missing=UNUSED_BY_EVALUATION)
    # Passing the config keeps AutoTokenizer from re-reading config.json as an unknown model type.
    tokenizer = load_tokenizer(info.model_dir, config=model.config)
    return model.to(device).eval(), tokenizer, info


def _load_into(model, state: dict[str, Tensor], where: str, allow_missing: tuple[str, ...] = ()) -> None:
    result = model.load_state_dict(state, strict=False)
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if id(params[k]) not in loaded]  # a tied alias is not missing
    unused = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    if unused:
        log.warning("checkpoint %s lacks %d weights of heads that evaluation does not use (left at their initial"
                    " values): %s", where, len(unused), unused[:5])
    missing = [k for k in missing if k not in unused]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {where} does not fit the model config: missing {missing[:10]},"
                         f" unexpected {result.unexpected_keys[:10]}")


_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.index\.json$|^config\.json$")
EXPORT_LIST = ".iais_export.json"  # the files an export wrote: the only folder it may replace


def export_target_problem(out: Path, spec: str | Path) -> str | None:
    """Why ``export_hf`` may not write ``out`` (None when it may): only a missing or empty folder,
    or an earlier export of ours holding nothing else, is replaced; never a run or a user's folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is a file"
    source = Path(spec).resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        return f"{out} holds the checkpoint being exported"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    try:
        written = set(json.loads((out / EXPORT_LIST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{out} is not empty and holds no earlier export ({', '.join(entries[:4])})"
    foreign = [n for n in entries if n not in written and n != EXPORT_LIST]
    if foreign:
        return f"{out} holds files an export did not write ({', '.join(foreign[:4])})"
    return None


def export_hf(spec: str | Path, out_dir: str | Path, *, model_dir: str | Path | None = None,
              trust_pickles: bool = False) -> Path:
    """Consolidate a complete DeepSpeed checkpoint into a Hugging Face folder (``config.json`` with
    ``auto_map``, ``model.safetensors``, the modelling code, tokenizer files and, for pixel models,
    ``preprocessor_config.json``), written into a temporary folder and renamed into place.

    The folder loads with ``AutoModel.from_pretrained(out, trust_remote_code=True)`` where this
    package is not installed (``iais_scale.model.hub``), and with ``CrossModalModel.from_pretrained``
    or plain ``AutoModel`` where it is."""
    info = resolve(spec, model_dir)
    if info.kind != "deepspeed":
        raise ValueError(f"{spec}: already a Hugging Face folder")
    out = Path(out_dir)
    problem = export_target_problem(out, info.folder)
    if problem:
        raise ValueError(f"export: refusing to write {out}: {problem}; name a new or empty folder")
    model = CrossModalModel(CrossModalConfig.from_pretrained(str(info.model_dir)))
    _load_into(model, consolidated_state_dict(info.folder, trust_pickles=trust_pickles), str(info.folder))
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # (this process's own temporary folder)
    model.save_pretrained(str(tmp))
    for f in sorted(info.model_dir.iterdir()):
        if f.is_file() and not _WEIGHT_FILES.match(f.name):  # the tokenizer's files, whatever its kind
            shutil.copy2(f, tmp / f.name)
    write_remote_code(tmp)  # (save_pretrained wrote it too; the copies above must not replace it)
    (tmp / EXPORT_LIST).write_text(json.dumps({"files": sorted(p.name for p in tmp.iterdir())}))
    if out.exists():  # empty, or an earlier export and nothing else: checked again, just before
        problem = export_target_problem(out, info.folder)
        if problem:
            shutil.rmtree(tmp)
            raise ValueError(f"export: refusing to write {out}: {problem}; name a new or empty folder")
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m iais_scale.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a complete DeepSpeed checkpoint -> Hugging Face folder")
    ex.add_argument("checkpoint", help="a run folder, its checkpoints/ folder (newest complete) or a step folder")
    ex.add_argument("out_dir")
    ex.add_argument("--model-dir", default=None, help="config + tokenizer folder (default: the run's model/)")
    ex.add_argument("--trust-pickles", action="store_true",
                    help="load pickles beyond the allow-list (only for checkpoints you made or trust)")
    ex.add_argument("--push-to-hub", metavar="REPO",
                    help="then upload the folder to this Hugging Face Hub repository (created when missing)")
    ex.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    ex.add_argument("--token", help="with --push-to-hub: Hub token (default: HF_TOKEN or the cached login)")
    ex.add_argument("--commit-message", help="with --push-to-hub: the commit message")
    ve = sub.add_parser("verify", help="check a checkpoint's files against its COMPLETE marker")
    ve.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            out = export_hf(args.checkpoint, args.out_dir, model_dir=args.model_dir, trust_pickles=args.trust_pickles)
            print(out)
            if args.push_to_hub:
                print(push_to_hub(out, args.push_to_hub, private=args.private, token=args.token,
                                  commit_message=args.commit_message))
            return 0
        folder = resolve(args.checkpoint).folder
        problems = verify(folder)
        try:
            check_pickles(folder)
        except CheckpointError as e:
            problems.append(str(e))
        print("\n".join(problems) or f"{folder}: intact")
        return 1 if problems else 0
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
