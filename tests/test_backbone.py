"""Raw images through a pretrained vision backbone: grid tokens, freezing, transforms, feature
extraction, and the real trainer (DeepSpeed ZeRO-2 / ZeRO-3, 2 CPU ranks) with IAIS and wandb.

The backbones are tiny transformers models with random weights, created and saved by the session
fixture ``backbones`` of conftest.py (no hub download): a ViT (``ViTModel`` + ``ViTImageProcessor``),
a CLIP vision tower and a two-tower CLIP (its ``vision_config`` taken), a ConvNeXt (a CNN grid).
timm needs a torchvision this CPU torch cannot import: here timm backbones are covered by a clear
error and by the adapter's contract with a stand-in module (``test_timm_adapter_*``); the real timm
runs in ``test_vision_extra.py``, in a venv with the [vision] extra.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import ROOT, backbone_model, pixels, text_batch
from PIL import Image

from iais_scale.config import ConfigError, load_config
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import PixelFields, RegionFields
from iais_scale.data.samples import ImageSample
from iais_scale.data.transforms import Augment, ImageTransform
from iais_scale.model import CrossModalConfig, IaisRequest
from iais_scale.model.backbone import grid_geometry, pooled_grid, unique_rows
from iais_scale.model.backbone_source import backbone_fields, backbone_problems

# --------------------------------------------------------------------------- tiny models


# --------------------------------------------------------------------------- architecture and data config


def test_backbone_fields_come_from_the_model_and_its_image_processor(backbones):
    vit = backbone_fields(str(backbones["vit"]))  # a bare folder: transformers
    assert vit["region_feature_dim"] == 32 and vit["image_size"] == 32
    assert vit["image_mean"] == [0.5, 0.5, 0.5] and vit["image_resample"] == "bilinear"
    clip = backbone_fields(f"hf:{backbones['clip']}")
    assert clip["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert clip["image_resample"] == "bicubic" and clip["image_crop_pct"] == 1.0
    assert clip["vision_backbone"]["config"]["model_type"] == "clip_vision_model"
    full = backbone_fields(f"hf:{backbones['clip_full']}")  # a two-tower CLIP: its vision tower
    assert full["vision_backbone"]["config"]["model_type"] == "clip_vision_model" and full["region_feature_dim"] == 24
    convnext = backbone_fields(f"hf:{backbones['convnext']}")
    assert convnext["region_feature_dim"] == 16 and convnext["image_crop_pct"] == pytest.approx(0.875)


def test_two_tower_checkpoint_loads_its_vision_tower(backbones):
    from safetensors.torch import load_file

    m = backbone_model(f"hf:{backbones['clip_full']}")
    source = load_file(str(backbones["clip_full"] / "model.safetensors"))
    own = m.image_backbone.model.state_dict()
    # CLIPVisionModel names its weights vision_model.* in transformers 5.3, without the prefix later.
    name = {k: k if k.startswith("vision_model.") else f"vision_model.{k}" for k in own}
    compared = [k for k in own if name[k] in source]
    assert len(compared) > 20 and all(torch.equal(own[k], source[name[k]]) for k in compared)


def test_problems_are_reported_before_anything_is_built(tmp_path):
    assert "required" in backbone_problems(None, "pretrained")[0]
    assert "config.json not found" in backbone_problems(f"hf:{tmp_path}", "pretrained")[0]
    assert any("neither" in q for q in backbone_problems(f"hf:{tmp_path}", "no/such/file.pt"))


def test_timm_backbones_need_timm_and_torchvision_named_in_the_error():
    try:
        import timm  # noqa: F401
    except Exception:
        problems = backbone_problems("timm:vit_tiny_patch16_224", "pretrained")
        assert problems and "timm and torchvision" in problems[0] and "iais_scale[vision]" in problems[0]
        return
    pytest.skip("timm imports here: its real path is covered by the adapter test below")


def test_timm_adapter_against_timm_interface(monkeypatch):
    """The timm path (create_model(name, num_classes=0), forward_features, num_prefix_tokens,
    patch_embed.patch_size, blocks, num_features, pretrained_cfg) with a stand-in module: the
    real timm runs in test_vision_extra.py."""

    class PatchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_size = (8, 8)
            self.proj = torch.nn.Conv2d(3, 12, 8, 8)

    class TinyViT(torch.nn.Module):
        num_prefix_tokens, num_features = 1, 12

        def __init__(self):
            super().__init__()
            self.pretrained_cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.1, 0.2, 0.3),
                                   "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 12))
            self.patch_embed = PatchEmbed()
            self.blocks = torch.nn.Sequential(*[torch.nn.Linear(12, 12) for _ in range(3)])
            self.norm = torch.nn.LayerNorm(12)

        def forward_features(self, x):
            t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
            return self.norm(self.blocks(torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1)))

        def set_grad_checkpointing(self, enable=True):
            self.checkpointing = enable

    calls = []

    def create_model(name, pretrained=False, **kw):
        calls.append((name, pretrained, kw))
        return TinyViT()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    from iais_scale.model import backbone_source

    backbone_source._backbone_fields.cache_clear()
    fields = backbone_fields("timm:tiny_vit")
    assert fields["region_feature_dim"] == 12 and fields["image_crop_pct"] == 0.9
    assert fields["image_mean"] == [0.1, 0.2, 0.3] and fields["vision_backbone"]["name"] == "tiny_vit"
    m = backbone_model("timm:tiny_vit", trainable=1, every=1, load=False)
    assert calls[-1] == ("tiny_vit", False, {"num_classes": 0}) and m.image_backbone.model.checkpointing
    trainable = [n for n, p in m.image_backbone.model.named_parameters() if p.requires_grad]
    assert trainable == ["blocks.2.weight", "blocks.2.bias", "norm.weight", "norm.bias"]
    feats, geometry = m.image_backbone(pixels(2))
    assert feats.shape == (2, 16, 12) and geometry.shape == (16, 7)  # [CLS] dropped: 4 x 4 patches
    backbone_source._backbone_fields.cache_clear()


# --------------------------------------------------------------------------- grid tokens


def test_grid_geometry_and_pooling():
    g = grid_geometry(4, 4)
    assert g.shape == (16, 7)
    torch.testing.assert_close(g[5], torch.tensor([0.25, 0.25, 0.5, 0.5, 0.25, 0.25, 0.0625]))
    assert pooled_grid(4, 4, 9) == (3, 3) and pooled_grid(7, 7, 49) == (7, 7) and pooled_grid(14, 7, 20) == (6, 3)
    pooled = grid_geometry(4, 4, 2, 2)
    torch.testing.assert_close(pooled[3], torch.tensor([0.5, 0.5, 1.0, 1.0, 0.5, 0.5, 0.25]))
    third = grid_geometry(4, 4, 3, 3)  # adaptive bins overlap: [0, 2), [1, 3), [2, 4)
    torch.testing.assert_close(third[4, :4], torch.tensor([0.25, 0.25, 0.75, 0.75]))


def test_grid_cells_are_the_image_tokens_of_iais(backbones):
    m = backbone_model(f"hf:{backbones['vit']}", max_tokens=9).eval()
    ids, att = text_batch(3)
    out = m(ids, att, pixel_values=pixels(3), iais_request=IaisRequest(torch.tensor([0, 2]), "singular", "L"))
    assert out.hidden.shape == (3, 6 + 9, 32)  # 4 x 4 patches pooled to 3 x 3
    rel = out.relations[-1]
    assert rel.region_mask.shape == (2, 9) and rel.region_mask.all()
    assert rel.region_pos[0].tolist() == list(range(6, 15)) and rel.s_v.shape == (2, 9, 9)
    assert out.iais_loss.shape == (2,) and torch.isfinite(out.iais_loss).all()
    # Each token carries its cell's geometry through the region embedding (the box projection).
    tokens, valid = m.embed_image(pixel_values=pixels(1))
    feats, geometry = m.image_backbone(pixels(1))
    e = m.region_embeddings
    expected = e.norm(e.feature_norm(e.feature_linear(feats)) + e.box_norm(e.box_linear(geometry[None]))
                      + m.text_embeddings.token_type_embeddings.weight[1])
    torch.testing.assert_close(tokens, expected)
    assert valid.all()


def test_cnn_grid_cells(backbones):
    m = backbone_model(f"hf:{backbones['convnext']}").eval()
    feats, geometry = m.image_backbone(pixels(2))
    assert feats.shape == (2, 16, 16) and geometry[:, 6].sum() == pytest.approx(1.0)  # 32 px / 8 = 4 x 4 cells


def test_uint8_pixels_are_normalised_with_the_backbone_mean_and_std(backbones):
    m = backbone_model(f"hf:{backbones['clip']}").eval()
    px = pixels(2)
    mean = torch.tensor(backbone_fields(f"hf:{backbones['clip']}")["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(backbone_fields(f"hf:{backbones['clip']}")["image_std"]).view(1, 3, 1, 1)
    normalised = (px.float() / 255 - mean) / std
    torch.testing.assert_close(m.image_backbone.normalise(px), normalised)
    ids, att = text_batch(2)
    torch.testing.assert_close(m(ids, att, pixel_values=px).hidden, m(ids, att, pixel_values=normalised).hidden)


def test_repeated_images_run_the_backbone_once_with_the_same_result(backbones):
    m = backbone_model(f"hf:{backbones['vit']}", trainable=-1).eval()
    px = pixels(3)
    batch = px[torch.tensor([0, 1, 0, 2, 1, 1])]
    first, inverse = unique_rows(batch)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1, 1]
    assert unique_rows(px) is None
    seen = []
    m.image_backbone.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]),
                                                     with_kwargs=True)
    feats, _ = m.image_backbone(batch)
    assert seen == [3]
    alone = torch.cat([m.image_backbone(batch[i : i + 1])[0] for i in range(6)])
    torch.testing.assert_close(feats, alone)


# --------------------------------------------------------------------------- freezing and checkpointing


def test_frozen_partial_and_trainable_backbones(backbones):
    src = f"hf:{backbones['vit']}"
    frozen = backbone_model(src, trainable=0)
    assert not any(p.requires_grad for p in frozen.image_backbone.parameters())
    assert frozen.train().image_backbone.model.training is False  # stays in eval mode
    partial = backbone_model(src, trainable=1).train()
    names = [n for n, p in partial.image_backbone.model.named_parameters() if p.requires_grad]
    blocks = partial.image_backbone.blocks()
    assert len(blocks) == 3  # ViT's layers
    last = {id(q) for q in blocks[-1].parameters()} | {id(q) for q in partial.image_backbone.model.layernorm.parameters()}
    assert {id(q) for q in partial.image_backbone.parameters() if q.requires_grad} == last and names
    assert not blocks[0].training and blocks[2].training
    full = backbone_model(src, trainable=-1)
    assert all(p.requires_grad for p in full.image_backbone.model.parameters())
    ids, att = text_batch(2)
    out = partial(ids, att, pixel_values=pixels(2))
    partial.itm_logit(out).sum().backward()
    assert all(q.grad is None for q in blocks[0].parameters())
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in blocks[2].parameters() if q.dim() > 1)


@pytest.mark.parametrize("trainable", [1, -1])
def test_activation_checkpointing_gives_equal_gradients(backbones, trainable):
    src = f"hf:{backbones['clip']}"
    ids, att = text_batch(4)
    px = pixels(4)
    results = []
    for every in (0, 1):
        m = backbone_model(src, trainable=trainable, every=every).train()
        out = m(ids, att, pixel_values=px, iais_request=IaisRequest(torch.tensor([0, 1, 3]), "singular", "L"))
        loss = m.itm_logit(out).sum() + out.iais_loss.sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss0, loss1)
    saved = []
    for every in (0, 1):  # the backbone's own checkpointing is engaged: less kept for backward
        m = backbone_model(src, trainable=trainable, every=every).train()
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.image_backbone(px)[0].sum().backward()
        saved.append(sum(storages.values()))
    assert saved[1] < 0.7 * saved[0], saved
    assert g0.keys() == g1.keys() and any(k.startswith("image_backbone.") for k in g0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_groups_give_the_backbone_its_own_learning_rate(backbones):
    from iais_scale.engine import _optimizer

    cfg = load_config(None, [f"model.backbone=hf:{backbones['vit']}", "model.image_input=backbone",
                             "model.backbone_trainable_blocks=1", "model.backbone_lr=1e-5", "optim.lr=1e-3"])
    m = backbone_model(f"hf:{backbones['vit']}", trainable=1)
    opt = _optimizer(cfg, m, {})
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[:2] == [1e-3, 1e-3] and set(lrs[2:]) == {1e-5} and len(lrs) == 4
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in m.parameters() if p.requires_grad}  # frozen ones in none


# --------------------------------------------------------------------------- transforms


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def sample(image: bytes, key: str = "k") -> ImageSample:
    return ImageSample(key=key, image_id=key, captions=["x"], width=1, height=1, features=np.zeros((0, 0), np.float32),
                       boxes=np.zeros((0, 4), np.float32), image=image)


def test_backbone_collator_takes_the_backbone_transform(backbones):
    config = CrossModalConfig(image_input="backbone", **backbone_fields(f"hf:{backbones['clip']}"))
    t = ImageTransform.from_backbone(config)
    assert t.size == 32 and t.resample == "bicubic" and t.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    c = Collator(None, 8, PixelFields(t, normalise=False))
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    px = c.images([sample(png(img))])["pixel_values"]
    assert px.dtype == torch.uint8 and px.shape == (1, 3, 32, 32)
    # The patches model: the explicit default (ImageNet statistics), normalised by the collator.
    patches = Collator(None, 8, PixelFields(ImageTransform(32))).images([sample(png(img))])["pixel_values"]
    torch.testing.assert_close(patches, ImageTransform(32).normalise(px))


def test_evaluation_is_a_centre_crop_and_training_draws_augment():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = 255  # a white strip outside the centre square
    data = png(img)
    noise = png(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8))
    t = ImageTransform(16, resample="bilinear", crop_pct=0.875,
                       augment=Augment(random_resized_crop=True, scale=(0.2, 1.0), color_jitter=0.4))
    assert t.eval_box(80, 40) == pytest.approx((22.5, 2.5, 57.5, 37.5))
    ev = t.pixels(data)
    assert ev.shape == (16, 16, 3) and ev.max() == 0 and np.array_equal(ev, t.pixels(data))
    c = Collator(None, 8, PixelFields(t, normalise=False))
    draws = [c.image_fields.draw(sample(data)) for _ in range(8)]
    assert all(d.shape == (16, 16, 3) for d in draws) and any(d.max() > 0 for d in draws)  # crops reach the strip
    assert len({c.image_fields.draw(sample(noise)).tobytes() for _ in range(8)}) == 8
    again = Collator(None, 8, PixelFields(t, normalise=False))
    assert all(np.array_equal(a, again.image_fields.draw(sample(data))) for a in draws)  # seeded: reproducible
    assert len({again.image_fields.draw(sample(data)).tobytes() for _ in range(8)}) > 1
    assert np.array_equal(c.images([sample(data)])["pixel_values"][0].permute(1, 2, 0).numpy(), ev)  # evaluation: no augment
    flip = ImageTransform(16, augment=Augment(hflip=True))
    flipped = {flip.pixels(png(np.tile(np.arange(80, dtype=np.uint8)[None, :, None], (80, 1, 3))), train=True,
                          rng=np.random.default_rng(s))[0, 0, 0] for s in range(10)}
    assert len(flipped) == 2  # left edge dark or, flipped, bright


def test_flip_is_refused_for_relation_data(tiny_demo, tmp_path, backbones):
    base = [f"data.root={tiny_demo}", "model.image_input=backbone", f"model.backbone=hf:{backbones['vit']}"]
    with pytest.raises(ConfigError, match="hflip: a horizontal flip swaps left and right.*demo"):
        load_config("configs/demo.yaml", [*base, "data.augment.hflip=true"])
    with pytest.raises(ConfigError, match="relation_captions is true"):
        load_config("configs/demo.yaml", [*base, "data.augment.hflip=true", f"data.root={tmp_path}",
                                          "data.relation_captions=true"])
    # Declared non-relational, or a data set whose manifest says nothing relational: allowed.
    load_config("configs/demo.yaml", [*base, "data.augment.hflip=true", "data.relation_captions=false"])
    (tmp_path / "manifest.json").write_text(json.dumps({"generator": "karpathy", "splits": {"train": 1}}))
    load_config("configs/demo.yaml", [*base, "data.augment.hflip=true", f"data.root={tmp_path}"])
    (tmp_path / "manifest.json").write_text(json.dumps({"generator": "x", "relation_captions": True, "splits": {}}))
    with pytest.raises(ConfigError, match="manifest declares relation_captions"):
        load_config("configs/demo.yaml", [*base, "data.augment.hflip=true", f"data.root={tmp_path}"])
    # The other augmentations are fine on relation data; region inputs take none.
    load_config("configs/demo.yaml", [*base, "data.augment.random_resized_crop=true", "data.augment.color_jitter=0.2"])
    with pytest.raises(ConfigError, match="augments pixels"):
        load_config("configs/demo.yaml", [f"data.root={tiny_demo}", "data.augment.color_jitter=0.2"])


def test_backbone_config_problems_all_at_once(backbones):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", ["model.image_input=backbone", "model.backbone_trainable_blocks=-2",
                                          "model.backbone_lr=1e-4", "model.backbone_max_tokens=0",
                                          "data.augment.scale=[0.9, 0.1]", "train.report_to=[tensorboard, mlflow]"])
    text = str(e.value)
    for needle in ("model.backbone: required", "backbone_trainable_blocks", "backbone_max_tokens", "augment.scale",
                   "unknown target 'mlflow'"):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="only used with a backbone image input"):
        load_config("configs/demo.yaml", [f"model.backbone=hf:{backbones['vit']}"])


# --------------------------------------------------------------------------- offline features


def extract(tiny_demo: Path, out: Path, backbone: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_tools", "features", "--backbone", backbone, "--images-from", str(tiny_demo),
           "--out", str(out), "--batch-size", "16", "--shard-size", "20", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_feature_extraction_writes_grid_features_the_model_would_compute(tiny_demo, tmp_path, backbones):
    from iais_scale.data.retrieval import read_split

    src = f"hf:{backbones['vit']}"
    out = tmp_path / "feats"
    proc = extract(tiny_demo, out, src, "--max-tokens", "9", "--feature-dtype", "float32")
    assert "images/s" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["feature_dim"] == 32 and manifest["relation_captions"] is True
    assert manifest["splits"] == json.loads((tiny_demo / "manifest.json").read_text())["splits"]
    assert (out / "tokenizer").is_dir()
    verify = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    regions = read_split(out / "test", RegionFields())
    images = read_split(tiny_demo / "test", PixelFields())
    assert [s.key for s in regions] == [s.key for s in images] and regions[0].meta["captions"] == images[0].meta["captions"]
    # The features are the frozen backbone's, pooled to 3 x 3, on the evaluation transform's pixels.
    m = backbone_model(src, max_tokens=9).eval()
    collator = Collator(None, 8, PixelFields(ImageTransform.from_backbone(m.config), normalise=False))
    feats, geometry = m.image_backbone(collator.images(images[:4])["pixel_values"])
    torch.testing.assert_close(torch.from_numpy(np.stack([s.features for s in regions[:4]])), feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(regions[0].geometry), geometry)  # square images: crop = image
    # A regions model reads them as it reads detector features.
    config = load_config("configs/demo.yaml", [f"data.root={out}", "data.make_demo=false"])
    assert config.model.image_input == "regions"


def test_feature_extraction_resumes_after_an_interruption(tiny_demo, tmp_path, backbones, monkeypatch):
    from data_tools import convert
    from data_tools.features import extract_backbone_features

    src = f"hf:{backbones['clip']}"
    whole = tmp_path / "whole"
    extract_backbone_features(str(tiny_demo), str(whole), src, split="train", shard_size=20, batch_size=8,
                              out=lambda *_: None)
    cut = tmp_path / "cut"

    def stop(split, name):
        if name == "shard-000002.tar":
            raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_after_shard", stop)
    with pytest.raises(KeyboardInterrupt):
        extract_backbone_features(str(tiny_demo), str(cut), src, split="train", shard_size=20, batch_size=8,
                                  out=lambda *_: None)
    assert not (cut / "manifest.json").exists() and (cut / "train" / "progress.jsonl").is_file()
    monkeypatch.setattr(convert, "_after_shard", lambda split, name: None)
    lines = []
    extract_backbone_features(str(tiny_demo), str(cut), src, split="train", shard_size=20, batch_size=8,
                              out=lines.append)
    assert any("train: 96 samples" in line for line in lines)
    for shard in sorted((whole / "train").glob("*.tar")):
        assert (cut / "train" / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_feature_extraction_counts_the_samples_a_damaged_shard_lost(tiny_demo, tmp_path, backbones, monkeypatch):
    """A source shard cut short: every record it no longer holds is a counted skip, never silently gone;
    the skips never make a backbone forward larger than --batch-size."""
    import shutil

    from data_tools.features import extract_backbone_features
    from iais_scale.model.backbone import VisionBackbone

    sizes = []
    forward = VisionBackbone.forward

    def counted(self, pixels, *args, **kwargs):
        sizes.append(pixels.shape[0])
        return forward(self, pixels, *args, **kwargs)

    monkeypatch.setattr(VisionBackbone, "forward", counted)

    src_root = tmp_path / "src"
    shutil.copytree(tiny_demo, src_root)
    shard = src_root / "train" / "shard-000001.tar"  # samples 32..63
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # about half its samples, then a torn member
    out = tmp_path / "out"
    extract_backbone_features(str(src_root), str(out), f"hf:{backbones['clip']}", split="train", shard_size=20,
                              batch_size=5, out=lambda *_: None)  # 5: the skips do not fill whole batches
    manifest = json.loads((out / "manifest.json").read_text())
    lost = manifest["skipped"]["train"]["unreadable_image"]
    assert 0 < lost < 32 and manifest["splits"]["train"] + lost == 96
    skipped = json.loads((out / "train" / "skipped.json").read_text())
    assert skipped["counts"] == {"unreadable_image": lost}
    assert {i["input"] for i in skipped["items"]} == {f"{src_root / 'train'}#{n}" for n in range(64 - lost, 64)}
    assert max(sizes) == 5 and sum(sizes) == manifest["splits"]["train"], sizes


def test_feature_extraction_overwrite_replaces_the_whole_data_set(tiny_demo, tmp_path, backbones):
    """--overwrite leaves nothing of the data set it replaces: not its tokenizer (the new source has
    none), not a split the new run does not write; a damaged manifest is another data set's."""
    import shutil

    from data_tools.features import extract_backbone_features

    src = f"hf:{backbones['clip']}"
    out = tmp_path / "out"
    extract_backbone_features(str(tiny_demo), str(out), src, split="train", shard_size=50, batch_size=16,
                              out=lambda *_: None)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    bare = tmp_path / "bare"
    shutil.copytree(tiny_demo / "train", bare)  # a folder of shards: no manifest, no tokenizer
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(FileExistsError, match="--overwrite"):
        extract_backbone_features(str(bare), str(out), src, split="other", shard_size=50, batch_size=16,
                                  out=lambda *_: None)
    manifest = extract_backbone_features(str(bare), str(out), src, split="other", shard_size=50, batch_size=16,
                                         overwrite=True, out=lambda *_: None)
    assert manifest["splits"] == {"other": 96}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "other"]


# --------------------------------------------------------------------------- the real trainer


# Backbone runs log every 2 steps, with the IAIS weight constant from the start.
BACKBONE_RUN = ("train.log_every=2", "model.image_input=backbone", "objectives.iais.schedule=constant")


def train(tiny_demo: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return helpers.train(tiny_demo, out, *BACKBONE_RUN, *extra, env=env)


def frozen_and_trained(run: Path, source: Path) -> tuple[int, int]:
    """(backbone tensors equal to the pretrained ones, tensors that changed) in the exported model."""
    from safetensors.torch import load_file

    model, pretrained = load_file(str(run / "hf_model" / "model.safetensors")), load_file(str(source / "model.safetensors"))
    same = changed = 0
    for k, v in pretrained.items():
        if f"image_backbone.model.{k}" in model:
            if torch.equal(model[f"image_backbone.model.{k}"].float(), v.float()):
                same += 1
            else:
                changed += 1
    return same, changed


def backbone_drift(run: Path, source: Path) -> float:
    """The largest change of any backbone weight between the pretrained source and the exported model."""
    from safetensors.torch import load_file

    model, pretrained = load_file(str(run / "hf_model" / "model.safetensors")), load_file(str(source / "model.safetensors"))
    return max((model[f"image_backbone.model.{k}"].float() - v.float()).abs().max().item()
               for k, v in pretrained.items() if f"image_backbone.model.{k}" in model)


@pytest.mark.slow
def test_zero2_partly_frozen_vit_with_iais_wandb_resume_and_standalone_evaluation(tiny_demo, tmp_path, backbones):
    """ZeRO-2: a ViT whose last block trains at its own learning rate, grid pooled to 9 tokens, IAIS
    on; wandb offline keeps one run across a resume; the stand-alone evaluator reproduces the
    trainer's report from the checkpoint."""
    out = tmp_path / "run"
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    common = [f"model.backbone=hf:{backbones['vit']}", "model.backbone_trainable_blocks=1", "model.backbone_lr=1e-4",
              "model.backbone_max_tokens=9", "train.report_to=[tensorboard,wandb]", "train.checkpoint_every=4"]
    train(tiny_demo, out, *common, "train.steps=4", env=env)
    first = {p.name.rsplit("-", 1)[-1] for p in (wandb_dir / "wandb").glob("offline-run-*")}
    from iais_scale.checkpoint import read_state, state_file

    saved = read_state(state_file(out / "checkpoints" / "step4", 0))[0]["wandb_run_id"]
    assert first == {saved} and saved
    train(tiny_demo, out, *common, "train.steps=8", "--resume", "auto", env=env)
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[-1] for p in runs} == {saved}  # the same run, continued
    assert read_state(state_file(out / "checkpoints" / "step8", 0))[0]["wandb_run_id"] == saved

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) for r in records) and records[-1]["iais"] > 0
    same, changed = frozen_and_trained(out, backbones["vit"])
    assert same >= 30 and changed > 0  # embeddings and early blocks frozen; the last block trained
    config = json.loads((out / "hf_model" / "config.json").read_text())
    assert config["image_input"] == "backbone" and config["auto_map"]["AutoModel"] == "modeling_iais.CrossModalModel"

    report = json.loads((out / "eval.json").read_text())
    proc = subprocess.run([sys.executable, "launchers/evaluate.py", "--checkpoint", str(out), "--data", str(tiny_demo),
                           "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    alone = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert alone["images"] == report["images"] == 16
    assert alone["rsum"] == pytest.approx(report["rsum"]) and alone["tr_r1"] == pytest.approx(report["tr_r1"])


@pytest.mark.slow
def test_zero3_clip_tower_trained_under_activation_checkpointing(tiny_demo, tmp_path, backbones):
    """ZeRO-3: the backbone is built partitioned (zero.Init) and its pretrained weights gathered in;
    the whole CLIP tower trains under activation checkpointing, with IAIS."""
    out = tmp_path / "run"
    train(tiny_demo, out, f"model.backbone=hf:{backbones['clip']}", "model.backbone_trainable_blocks=-1",
          "model.gradient_checkpointing=true", "train.deepspeed_config=configs/deepspeed/zero3.json", "train.steps=6")
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["iais"] > 0 and np.isfinite(records[-1]["grad_norm"])
    assert len(list((out / "checkpoints" / "step6").glob("*model_states.pt"))) == 2  # partitioned
    same, changed = frozen_and_trained(out, backbones["clip"])
    assert same == 2 and changed > 20  # only CLIP's post-layernorm (unused by the tokens) stays frozen
    # The trained tensors started from the pretrained ones: 6 Adam steps (lr 1e-3 x step/50 in warm-up,
    # 4.2e-4 in all) moved no weight further than 4.2e-4 here; with backbone_weights=random, 0.83.
    assert backbone_drift(out, backbones["clip"]) < 2e-3
    assert json.loads((out / "eval.json").read_text())["images"] == 16


def test_feature_extraction_without_timm_is_a_one_line_error(tiny_demo, tmp_path, capsys):
    from data_tools.__main__ import main as data_tools_main

    try:
        import timm  # noqa: F401

        pytest.skip("timm imports here")
    except Exception:
        pass
    assert data_tools_main(["features", "--backbone", "timm:vit_tiny_patch16_224", "--weights", "random",
                            "--images-from", str(tiny_demo), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: timm backbones need the packages timm and torchvision") and "Traceback" not in err
