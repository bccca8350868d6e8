"""Helpers shared by the test modules: starting the trainer, waiting on it, reading what it wrote,
and the tiny models and batches several modules build. Fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.retrieval import read_split
from iais_scale.model import CrossModalConfig, CrossModalModel
from iais_scale.model.backbone_source import backbone_fields, load_backbone_weights

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- starting the trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tiny_demo: Path, out: Path, *extra: str, env: dict | None = None,
          launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """The trainer on the tiny demo, 2 CPU ranks; ``extra`` overrides (later ones win) and options."""
    cmd = [
        *(launcher or [shutil.which("deepspeed") or sys.exit("deepspeed launcher not on PATH")]),
        "--num_gpus", "2", "--master_port", str(free_port()),
        "launchers/train.py", "--config", "configs/demo.yaml",
        f"data.root={tiny_demo}", "data.make_demo=false",
        f"train.output_dir={out}", "train.steps=30", "train.log_every=3", "train.micro_batch_size=8",
        "objectives.mlm_only_steps=0", "objectives.num_candidates=4", "objectives.num_hard=2",
        "model.dropout=0.0", *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def one_rank(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``launchers/train.py`` as a 1-rank job started without the DeepSpeed launcher."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "launchers/train.py", "--config", "configs/demo.yaml", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def evaluate_launcher():
    """``launchers/evaluate.py`` as a module (its ``main``)."""
    spec = importlib.util.spec_from_file_location("evaluate_launcher", ROOT / "launchers" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- what a run wrote


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "hf_model" / "model.safetensors")


def assert_same_weights(run: Path, reference: Path) -> None:
    a, b = weights(reference), weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name[4:]) for p in (out / "checkpoints").glob("step*/COMPLETE")
                  if p.parent.name[4:].isdigit())


# --------------------------------------------------------------------------- tiny models and batches

B = 8  # pairs per rank in the 2-rank objective tests
CLS, SEP, PAD = 1, 2, 0  # the token ids of the backbone tests' 40-word vocabulary


def make_model(tokenizer, feature_dim: int) -> CrossModalModel:
    """A 2-layer regions model with ITC, IAIS on its last layer, no dropout."""
    torch.manual_seed(0)
    return CrossModalModel(CrossModalConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=feature_dim, iais_layers=[-1], itc_dim=16, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def make_batch(tiny_demo, rows: slice) -> dict:
    tok = AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))
    samples = read_split(tiny_demo / "train", RegionFields(8))[rows]
    # Caption lengths and region counts differ between the halves, so the ranks pad differently.
    items = [(s, s.captions[0] + " and more words here" if i == 2 else s.captions[0]) for i, s in enumerate(samples, rows.start)]
    return Collator(tok, 24, RegionFields(8)).pairs(items)


def backbone_model(source: str, *, trainable: int = 0, max_tokens: int = 0, every: int = 0, load: bool = True,
                   **kw) -> CrossModalModel:
    """A 2-layer model over the vision backbone ``source`` (hf:FOLDER), its weights loaded."""
    cfg = CrossModalConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, image_input="backbone", backbone_trainable_blocks=trainable,
        backbone_max_tokens=max_tokens, gradient_checkpointing_every=every, **backbone_fields(source), **kw)
    torch.manual_seed(0)
    model = CrossModalModel(cfg)
    if load:
        load_backbone_weights(model, source)
    return model


def text_batch(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (p, 6), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids, torch.ones_like(ids, dtype=torch.bool)


def pixels(p: int, size: int = 32, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (p, 3, size, size), generator=g, dtype=torch.uint8)
