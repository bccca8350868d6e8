"""The [vision] extra on the README's CPU set-up, and a real timm backbone end to end.

The README installs the CPU wheel of torch 2.13. PyPI's torchvision is built for PyPI's CUDA torch
and does not import beside that wheel, and transformers imports torchvision whenever one is
installed. So the extra asks for a torchvision (>= 0.29.1) whose pinned torch pip must install
beside it: a PyPI (CUDA) build that runs on the CPU too. This test makes that set-up for real: a venv
over this environment's packages (the README's set-up), then ``pip install -e '.[vision]'``. In it,
``vit_tiny_patch16_224`` (timm, random weights) extracts grid features, trains 4 steps on raw images
with IAIS on 2 DeepSpeed ranks, and the stand-alone evaluator reproduces the trainer's report.

The venv (about 5.5 GB, a minute to build from the machine's wheels) is kept under
``~/.cache/iais_scale-tests`` for the next run, keyed by the checkout and pyproject.toml.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="session")
def vision_python() -> Path:
    """The python of a venv with the [vision] extra installed over this environment's packages."""
    key = hashlib.sha1(f"{ROOT}\n{sys.version}\n{(ROOT / 'pyproject.toml').read_text()}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iais_scale-tests"
    venv = cache / f"vision-venv-{key}"
    done = venv / "built"  # written last: a venv without it is a build that was cut off
    if not done.is_file():
        for old in cache.glob("vision-venv-*"):  # our own earlier venvs: one at a time (5.5 GB each)
            shutil.rmtree(old)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
        proc = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[vision]"],
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        done.write_text("ok\n")
    return venv / "bin/python"


def run(python: Path, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # (its venv takes a minute to build)
def test_the_vision_extra_never_breaks_the_import_on_the_cpu_setup(vision_python):
    versions = json.loads(run(vision_python, "-c", (
        "import json, torch, torchvision, timm, iais_scale.model, data_tools.features;"
        "print(json.dumps([torch.__version__, torchvision.__version__, timm.__version__, iais_scale.model.__file__]))"
    )).stdout)
    assert versions[3].startswith(str(ROOT)), versions  # this checkout, installed into the venv
    import torch

    # pip replaced the CPU wheel by the torch that torchvision was built for (in the venv only).
    assert versions[0] != torch.__version__ and "+cpu" not in versions[0], (versions, torch.__version__)


@pytest.mark.slow
def test_a_real_timm_backbone_extracts_features_trains_and_evaluates(vision_python, tiny_demo, tmp_path):
    feats = tmp_path / "feats"
    proc = run(vision_python, "-m", "data_tools", "features", "--backbone", BACKBONE, "--weights", "random",
               "--images-from", str(tiny_demo), "--out", str(feats), "--batch-size", "16", "--shard-size", "20",
               "--max-tokens", "9", "--feature-dtype", "float32")
    assert "images/s" in proc.stdout
    manifest = json.loads((feats / "manifest.json").read_text())
    assert manifest["feature_dim"] == 192 and manifest["params"]["backbone"] == BACKBONE, manifest
    run(vision_python, "-m", "data_tools", "verify", str(feats))

    # Raw images through the timm ViT (its last block trained), IAIS on, 2 ranks of DeepSpeed ZeRO-2. The
    # launcher runs on the venv's python; the comm op is built for the venv's torch in its own folder.
    out = tmp_path / "run"
    env = {"TORCH_EXTENSIONS_DIR": str(vision_python.parents[1] / "torch_extensions")}
    helpers.train(tiny_demo, out, "train.log_every=2", "model.image_input=backbone",
                     "objectives.iais.schedule=constant", f"model.backbone={BACKBONE}", "model.backbone_weights=random",
                     "model.backbone_trainable_blocks=1", "model.backbone_max_tokens=9", "train.steps=4",
                     launcher=[str(vision_python), "-m", "deepspeed.launcher.runner"], env=env)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["loss"] == r["loss"] for r in records)
    assert records[-1]["iais"] > 0
    config = json.loads((out / "hf_model" / "config.json").read_text())
    assert config["vision_backbone"]["library"] == "timm", config["vision_backbone"]

    report = json.loads((out / "eval.json").read_text())
    run(vision_python, "launchers/evaluate.py", "--checkpoint", str(out), "--data", str(tiny_demo),
        "--out", str(tmp_path / "eval"))
    alone = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert alone["images"] == report["images"] == 16
    assert alone["rsum"] == pytest.approx(report["rsum"]) and alone["tr_r1"] == pytest.approx(report["tr_r1"])
