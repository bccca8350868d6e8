"""Shared fixtures, made once per test session: a tiny demo data set, tiny vision backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iais_scale.data.demo import make_demo

TINY = dict(n_train=96, n_val=8, n_test=16, n_swap_groups=6, shard_size=32)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("tiny_demo") / "demo", seed=1, **TINY)


def damage_json(shard: Path, keys: list[str]) -> None:
    """Rewrite a shard with the JSON of samples ``keys`` torn (each then a counted ``bad_json`` sample)."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name.rsplit(".", 1)[0] in keys and info.name.endswith(".json"):
                data = b'{"captions": ["torn'
            info.size = len(data)
            members.append((info, data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{vit, clip, clip_full, convnext}: folders of tiny transformers vision models (random weights)."""
    return make_backbones(tmp_path_factory.mktemp("backbones"))


def make_backbones(folder: Path) -> dict[str, Path]:
    """Tiny transformers vision models with random weights, saved like downloaded checkpoints."""
    import transformers
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        ConvNextConfig,
        ConvNextModel,
        ViTConfig,
        ViTModel,
    )

    def pil_processor(name: str):
        """The PIL image processor class: ``{name}Pil`` in newer transformers, plain ``{name}`` in 5.3
        (the lowest release pyproject.toml allows), never the torchvision-based fast one."""
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)

    CLIPImageProcessorPil = pil_processor("CLIPImageProcessor")
    ConvNextImageProcessorPil = pil_processor("ConvNextImageProcessor")
    ViTImageProcessorPil = pil_processor("ViTImageProcessor")

    torch.manual_seed(0)
    out = {name: folder / name for name in ("vit", "clip", "clip_full", "convnext")}
    vit = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ViTModel(vit).save_pretrained(out["vit"])  # with its pooler: the import drops it
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out["vit"])
    clip_v = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32,
                  patch_size=8)
    CLIPVisionModel(CLIPVisionConfig(**clip_v)).save_pretrained(out["clip"])
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(out["clip"])
    full = CLIPConfig(text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                       vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                      vision_config=clip_v, projection_dim=8)
    CLIPModel(full).save_pretrained(out["clip_full"])
    processor.save_pretrained(out["clip_full"])
    ConvNextModel(ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)).save_pretrained(
        out["convnext"])
    ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(out["convnext"])
    return out


@pytest.fixture(scope="session")
def damaged_demo(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo with two damaged training samples: skipped and counted as bad, never fatal."""
    import shutil

    root = tmp_path_factory.mktemp("damaged_demo") / "demo"
    shutil.copytree(tiny_demo, root)
    damage_json(root / "train" / "shard-000001.tar", ["train-000040", "train-000057"])
    return root


def shm_in_use(path: str) -> bool:
    """Whether a live process has ``path`` mapped or open (a running job's buffer, maybe not ours)."""
    import os

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if path in f.read():
                    return True
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd")):
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def remove_orphaned_shm(paths: set[str]) -> None:
    """Unlink DeepSpeed all-reduce buffers that no live process uses; a live run's buffer stays."""
    import os

    for path in paths:
        if not shm_in_use(path):
            try:
                os.unlink(path)
            except OSError:
                pass


@pytest.fixture(autouse=True)
def _no_leaked_shm():
    """DeepSpeed's CPU all-reduce buffers that a killed or in-process run of a test left in /dev/shm
    (the trainer unlinks its own): removed after the test, or a long suite fills the RAM disk. Only
    orphans: a training run of the user's on the same machine keeps its buffer."""
    import glob
    import os

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(glob.glob(pattern))
    yield
    remove_orphaned_shm(set(glob.glob(pattern)) - before)
