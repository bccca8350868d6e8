"""The Hugging Face ecosystem: Auto classes, self-contained remote code, export CLI and Hub push.

The remote-code test loads saved folders in a Python that cannot import this package (``-I -S``:
no .pth files, so no editable install; only site-packages on the path, checked by the script).
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import backbone_model, pixels, text_batch

from iais_scale.model import CrossModalConfig, CrossModalModel
from iais_scale.model.hub import EXPORTED, exported_sources

ROOT = Path(__file__).resolve().parents[1]


def regions_model(**kw) -> CrossModalModel:
    torch.manual_seed(0)
    cfg = CrossModalConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, region_feature_dim=6, cls_token_id=1, sep_token_id=2, pad_token_id=0,
                           itc_dim=8, **kw)
    return CrossModalModel(cfg).eval()


def region_inputs(p: int = 3) -> dict:
    g = torch.Generator().manual_seed(3)
    ids, att = text_batch(p)
    return {"text_ids": ids, "text_attention": att, "region_features": torch.randn(p, 4, 6, generator=g),
            "region_geometry": torch.rand(p, 4, 7, generator=g), "region_attention": torch.ones(p, 4, dtype=torch.bool)}


def test_auto_classes_know_the_model(tmp_path):
    from transformers import AutoConfig, AutoModel

    regions_model().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is CrossModalConfig
    loaded = AutoModel.from_pretrained(tmp_path)  # this package installed: its own classes, no remote code
    assert type(loaded) is CrossModalModel


def test_saved_folder_carries_self_contained_code(tmp_path, backbones):
    regions_model().save_pretrained(tmp_path / "regions")
    files = {p.name for p in (tmp_path / "regions").iterdir()}
    assert set(EXPORTED) <= files and "preprocessor_config.json" not in files
    config = json.loads((tmp_path / "regions" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_iais.CrossModalConfig",
                                  "AutoModel": "modeling_iais.CrossModalModel"}
    for name, text in exported_sources().items():
        imports = [line for line in text.splitlines() if line.lstrip().startswith(("import ", "from "))]
        assert not any("iais_scale" in line or line.lstrip().startswith("from ..") for line in imports), name
    backbone_model(f"hf:{backbones['clip']}").save_pretrained(tmp_path / "clip")
    processor = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["resample"] == 3
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(tmp_path / "clip")
    assert list(proc.image_std) == pytest.approx([0.26862954, 0.26130258, 0.27577711])


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.append({site!r})
    try:
        import iais_scale
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("iais_scale is importable here: " + iais_scale.__file__)
    assert not any("iais_scale" in p for p in sys.modules)
    import torch
    from transformers import AutoModel
    results = {{}}
    for name, folder in {folders!r}.items():
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        inputs = torch.load(folder + "/inputs.pt", weights_only=True)
        with torch.no_grad():
            out = model(**inputs)
            results[name] = {{"hidden": out.hidden, "itm": model.itm_logit(out)}}
            if model.config.itc_dim:
                results[name]["itc"] = model.itc_image(**{{k: v for k, v in inputs.items() if not k.startswith("text")}})
    torch.save(results, {out!r})
    print("loaded without iais_scale:", sorted(results))
""")


def test_remote_code_reproduces_the_model_without_this_package(tmp_path, backbones):
    models = {"regions": (regions_model(), region_inputs()),
              "backbone": (backbone_model(f"hf:{backbones['vit']}", max_tokens=9, itc_dim=8).eval(),
                           {**dict(zip(("text_ids", "text_attention"), text_batch(3), strict=True)),
                            "pixel_values": pixels(3)})}
    folders, expected = {}, {}
    for name, (model, inputs) in models.items():
        folder = tmp_path / name
        model.save_pretrained(folder)
        torch.save(inputs, folder / "inputs.pt")
        folders[name] = str(folder)
        with torch.no_grad():
            out = model(**inputs)
            expected[name] = {"hidden": out.hidden, "itm": model.itm_logit(out)}
            expected[name]["itc"] = model.itc_image(**{k: v for k, v in inputs.items() if not k.startswith("text")})
    out_file = tmp_path / "remote.pt"
    script = SCRIPT.format(site=site.getsitepackages()[0], folders=folders, out=str(out_file))
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded without iais_scale: ['backbone', 'regions']" in proc.stdout
    remote = torch.load(out_file, weights_only=True)
    for name in models:
        for key, value in expected[name].items():
            torch.testing.assert_close(remote[name][key], value, msg=f"{name}/{key}")


def fake_checkpoint(run: Path, model: CrossModalModel, tokenizer_dir: Path) -> Path:
    """A complete DeepSpeed checkpoint without ZeRO partitions (mp_rank_00_model_states.pt) and the
    run's model/ folder: what export reads."""
    step = run / "checkpoints" / "step3"
    step.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / "mp_rank_00_model_states.pt")
    (step / "COMPLETE").write_text(json.dumps({"step": 3, "files": {}}))
    model.config.save_pretrained(run / "model")
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, run / "model" / f.name)
    return step


def test_export_cli_writes_auto_map_and_code_and_pushes_to_the_hub(tmp_path, tiny_demo, backbones, monkeypatch):
    import huggingface_hub

    from iais_scale import checkpoint

    model = backbone_model(f"hf:{backbones['clip']}")
    fake_checkpoint(tmp_path / "run", model, tiny_demo / "tokenizer")
    calls = []

    class FakeApi:  # records what a push does; the network is never reached
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw.get("private")))

        def upload_folder(self, repo_id, folder_path, **kw):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "export"
    code = checkpoint.main(["export", str(tmp_path / "run"), str(out), "--push-to-hub", "me/tiny-iais", "--private",
                            "--token", "t0k"])
    assert code == 0
    assert calls[0] == ("token", "t0k") and calls[1] == ("create_repo", "me/tiny-iais", True)
    uploaded = calls[2][2]
    assert calls[2][1] == "me/tiny-iais" and set(EXPORTED) <= set(uploaded)
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(uploaded)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoConfig"] == "configuration_iais.CrossModalConfig"
    reloaded = CrossModalModel.from_pretrained(out).eval()
    ids, att = text_batch(2)
    px = pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, att, pixel_values=px).hidden, model.eval()(ids, att, pixel_values=px).hidden)
