"""The package without a checkout: a wheel built from the repository holds the experiment and
DeepSpeed configs and the console scripts, and trains from an empty folder with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_holds_the_configs_and_trains_the_demo_through_its_console_script(tiny_demo, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("iais_scale-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("iais_scale/configs/")}
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} | {p.name for p in (ROOT / "configs/deepspeed").glob("*.json")} <= shipped
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("iais-train = iais_scale.cli:train", "iais-evaluate = iais_scale.cli:evaluate",
                   "iais-data = data_tools.__main__:main"):
        assert script in entry_points, entry_points

    # A fresh venv (the dependencies from this environment), the wheel alone, an empty working folder.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(venv / "bin/python"), "-c", "import iais_scale; print(iais_scale.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout's
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([str(venv / "bin/iais-train"), "--config", "demo", f"data.root={tiny_demo}",
                           "data.make_demo=false", "train.steps=3", "train.log_every=1", "train.micro_batch_size=8",
                           "objectives.mlm_only_steps=1", "objectives.num_candidates=4", "objectives.num_hard=2",
                           "eval.max_images=4", "train.deepspeed_config=zero2"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = work / "runs" / "demo"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["deepspeed_config"] == str(venv / "lib" / f"python{sys.version_info.major}."
                                                      f"{sys.version_info.minor}" / "site-packages" / "iais_scale"
                                                      / "configs" / "deepspeed" / "zero2.json")
    assert (run / "eval.json").is_file() and (run / "hf_model" / "model.safetensors").is_file()
    for script in ("iais-evaluate", "iais-data"):
        assert subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, timeout=60).returncode == 0


def test_a_torchvision_built_for_another_torch_is_named_in_one_line(tmp_path):
    """PyPI's torchvision (the [vision] extra beside the CPU torch) fails inside transformers' import;
    iais_scale.model says what is wrong and what to do instead of a 30-line traceback from there."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    proc = subprocess.run([sys.executable, "-c", "import iais_scale.model"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: torchvision is installed but does not work with torch") and \
        "pip uninstall torchvision timm" in last, proc.stderr[-2000:]
