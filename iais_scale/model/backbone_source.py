"""Where a vision backbone comes from: its architecture and data config, and its pretrained weights.

``model.backbone`` in an experiment names it:

* ``hf:FOLDER`` (or a bare folder path): a transformers checkpoint folder (``config.json`` +
  weights; ``preprocessor_config.json`` for the image processor, else that model type's default
  processor). A vision-only model (``ViTModel``, ``CLIPVisionModel``, ``Dinov2Model``, ConvNeXt,
  ResNet, ...) or a two-tower model whose ``vision_config`` is taken (``CLIPModel``,
  ``SiglipModel``). ``hf:ORG/NAME`` also takes a model from the local Hugging Face cache.
* ``timm:NAME``: a timm architecture by name; its weights from ``model.backbone_weights`` (a local
  ``.safetensors``/``.pth`` file) or, with ``pretrained``, from the Hugging Face cache (set
  ``HF_HUB_OFFLINE=1`` on machines without internet). timm needs torchvision (see ``backbone.py``).

``model.backbone_weights``: ``pretrained`` (the folder's weights; timm: the hub cache), ``random``
(the architecture only: tests and ablations) or a state-dict file.

The model is first built from its config (``backbone_fields`` gives the ``CrossModalConfig``
fields), then :func:`load_backbone_weights` copies the weights in. Under ZeRO-3 the parameters are
partitioned by then: they are gathered (``deepspeed.zero.GatheredParameters``, modifier rank 0),
filled, and partitioned again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .backbone import DEFAULT_MEAN, DEFAULT_STD, UNUSED_MODULES, build_timm_model, import_timm

log = logging.getLogger("iais_scale")

WEIGHT_CHOICES = ("pretrained", "random")
# PIL's resampling codes, as Hugging Face image processors store them ("resample": 3), by name.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def parse_backbone(spec: str) -> tuple[str, str]:
    """``"timm:NAME"`` -> ("timm", NAME); ``"hf:X"`` or a bare ``X`` -> ("transformers", X)."""
    if spec.startswith("timm:"):
        return "timm", spec[len("timm:"):]
    if spec.startswith("hf:"):
        return "transformers", spec[len("hf:"):]
    return "transformers", spec


def backbone_problems(spec: str | None, weights: str) -> list[str]:
    """What is wrong with ``model.backbone`` / ``model.backbone_weights``, found without building anything."""
    if not spec:
        return ["model.backbone: required when model.image_input is 'backbone' ('hf:FOLDER' or 'timm:NAME')"]
    library, source = parse_backbone(spec)
    p = []
    if not source:
        p.append(f"model.backbone: {spec!r} names no model")
    if weights not in WEIGHT_CHOICES and not Path(weights).is_file():
        p.append(f"model.backbone_weights: {weights!r} is neither 'pretrained', 'random' nor an existing file")
    if library == "transformers" and source:
        local = source.startswith(("/", ".", "~")) or Path(source).exists()
        if local and not (Path(source).expanduser() / "config.json").is_file():
            p.append(f"model.backbone: {source}/config.json not found (a transformers model folder)")
    if library == "timm":
        try:
            import_timm()
        except ImportError as e:
            p.append(f"model.backbone: {e}")
    return p


# --------------------------------------------------------------------------- architecture + data config


PROCESSOR_KEYS = ("image_mean", "image_std", "do_normalize", "resample", "size", "crop_size", "do_center_crop",
                  "crop_pct")


def _processor_settings(source: str, model_type: str) -> dict:
    """The image processor's settings: the folder's ``preprocessor_config.json`` read as JSON (no
    processor class needed: a broken torchvision cannot get in the way), else the defaults of that
    model type's processor class (the PIL backend preferred), else {}."""
    local = Path(source).expanduser()
    path = local / "preprocessor_config.json" if local.is_dir() else None
    if path is None:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "preprocessor_config.json"))  # the local cache when offline
        except Exception:
            path = None
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: data[k] for k in PROCESSOR_KEYS if k in data}
    try:
        import transformers
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    except Exception:
        return {}
    for mt in (model_type, model_type.removesuffix("_vision_model")):
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(mt)
        if not names:
            continue
        candidates = list(names.values()) if isinstance(names, dict) else [n for n in names if n]
        for name in sorted(candidates, key=lambda n: not n.endswith("Pil")):
            try:
                proc = getattr(transformers, name)()
            except Exception:
                continue
            return {k: getattr(proc, k) for k in PROCESSOR_KEYS if getattr(proc, k, None) is not None}
    return {}


def _size_value(size, key: str):
    if size is None:
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def hf_data_config(source: str, vision_config) -> dict:
    """``image_size``/``mean``/``std``/``resample``/``crop_pct`` from the image processor (model
    config's ``image_size`` wins for ViT-like models, whose position embeddings fix it)."""
    proc = _processor_settings(source, vision_config.model_type)
    mean, std, resample, crop_pct, size = DEFAULT_MEAN, DEFAULT_STD, "bicubic", 1.0, None
    if proc.get("do_normalize", True) is not False:
        mean = tuple(float(v) for v in (proc.get("image_mean") or mean))
        std = tuple(float(v) for v in (proc.get("image_std") or std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if proc.get("resample") is not None:
        resample = RESAMPLE_NAMES.get(int(proc["resample"]), "bicubic")
    crop = _size_value(proc.get("crop_size"), "height") if proc.get("do_center_crop") else None
    short = _size_value(proc.get("size"), "shortest_edge")
    height = _size_value(proc.get("size"), "height")
    if crop and (short or height):
        size, crop_pct = crop, crop / (short or height)
    elif short:
        size = short
        crop_pct = float(proc.get("crop_pct") or 1.0)
    elif height:
        size = height
    model_size = getattr(vision_config, "image_size", None)
    if isinstance(model_size, (tuple, list)):
        model_size = model_size[0]
    if model_size and size and model_size != size:
        log.warning("backbone %s: image processor size %s, model image_size %s: using %s", source, size,
                    model_size, model_size)
    size = int(model_size or size or 224)
    return {"image_size": size, "image_mean": list(mean), "image_std": list(std), "image_resample": resample,
            "image_crop_pct": min(1.0, max(0.05, float(crop_pct)))}


def _vision_config(source: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source, trust_remote_code=False)  # never code from a download
    return getattr(cfg, "vision_config", None) or cfg


def _width(vision_config) -> int:
    for name in ("hidden_size", "embed_dim"):
        v = getattr(vision_config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    sizes = getattr(vision_config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ValueError(f"cannot tell the output width of a {vision_config.model_type} backbone")


def _timm_data_config(model: nn.Module) -> dict:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = cfg.get("input_size", (3, 224, 224))[-1]
    interp = cfg.get("interpolation", "bicubic")
    return {"image_size": int(size), "image_mean": [float(v) for v in cfg.get("mean", DEFAULT_MEAN)],
            "image_std": [float(v) for v in cfg.get("std", DEFAULT_STD)],
            "image_resample": interp if interp in RESAMPLE_NAMES.values() else "bicubic",
            "image_crop_pct": float(cfg.get("crop_pct", 1.0) or 1.0)}


@functools.lru_cache(maxsize=16)
def _backbone_fields(spec: str) -> str:
    library, source = parse_backbone(spec)
    if library == "transformers":
        vcfg = _vision_config(source)
        fields = {"vision_backbone": {"library": "transformers", "source": spec, "config": vcfg.to_dict()},
                  "region_feature_dim": _width(vcfg), **hf_data_config(source, vcfg)}
    else:
        try:
            with torch.device("meta"):  # no memory, no init: only its width and data config are read
                model = build_timm_model(source)
        except RuntimeError:  # older timm (1.0.3-1.0.15 measured) calls .item() while building a ViT
            model = build_timm_model(source)
        fields = {"vision_backbone": {"library": "timm", "source": spec, "name": source, "kwargs": {}},
                  "region_feature_dim": int(model.num_features), **_timm_data_config(model)}
    return json.dumps(fields)


def backbone_fields(spec: str) -> dict:
    """The ``CrossModalConfig`` fields of a backbone: ``vision_backbone`` (what rebuilds it),
    ``region_feature_dim`` (its width) and its data config (``image_size``, ``image_mean``,
    ``image_std``, ``image_resample``, ``image_crop_pct``). Reads configs only (timm: builds the
    model on the meta device where it can)."""
    return json.loads(_backbone_fields(spec))


# --------------------------------------------------------------------------- weights


@dataclass
class BackboneLoad:
    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.source}: {self.loaded} tensors loaded, {len(self.missing)} missing {self.missing[:5]},"
                f" {len(self.unexpected)} unexpected {self.unexpected[:5]}")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state-dict file: ``.safetensors``, or a torch file of tensors (``weights_only``), unwrapping
    ``state_dict``/``model`` nesting and a ``module.`` prefix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _source_state(target: nn.Module, library: str, source: str, weights: str) -> dict[str, Tensor]:
    if weights not in WEIGHT_CHOICES:
        return read_state_dict(weights)
    if library == "transformers":
        from transformers.utils import logging as hf_logging

        verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the unused pooler's "unexpected keys" table: checked below instead
        hf_logging.disable_progress_bar()
        try:
            return type(target).from_pretrained(source).state_dict()
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
    timm = import_timm()
    return timm.create_model(source, pretrained=True, num_classes=0).state_dict()


def _fit_keys(target: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a wrapper prefix (``vit.``, ``vision_model.``, ...) when the target's keys lack it."""
    keys = set(target.state_dict())
    if len(keys & state.keys()) >= len(keys) // 2:
        return state
    best = state
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state if "." in k}):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if len(keys & stripped.keys()) > len(keys & best.keys()):
            best = stripped
    return best


def load_backbone_weights(model: nn.Module, spec: str, weights: str = "pretrained") -> BackboneLoad:
    """Copy the backbone's pretrained weights into ``model.image_backbone`` (a ``CrossModalModel``;
    or into ``model`` itself, a ``VisionBackbone``).

    Every shape must match and every tensor the token output uses must be filled (``ValueError``
    otherwise). Under ZeRO-3 (partitioned parameters) the backbone's parameters are gathered with
    modifier rank 0, filled on every rank (rank 0's values are kept) and partitioned again.
    """
    library, source = parse_backbone(spec)
    report = BackboneLoad(f"{spec} ({weights})")
    if weights == "random":
        return report
    target = getattr(model, "image_backbone", model).model  # a CrossModalModel or a VisionBackbone
    state = _fit_keys(target, _source_state(target, library, source, weights))
    own = target.state_dict(keep_vars=True)
    shapes = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in own.items()}
    bad = [f"{k}: {tuple(v.shape)} in {spec}, {shapes[k]} in the model" for k, v in state.items()
           if k in shapes and tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError("backbone weights do not fit the backbone config:\n  " + "\n  ".join(bad[:20]))
    report.unexpected = sorted(k for k in state if k not in own)
    report.missing = sorted(k for k in own if k not in state and not any(
        part in UNUSED_MODULES for part in k.split(".")) and not k.endswith(("position_ids", "num_batches_tracked")))
    if report.missing:
        raise ValueError(f"backbone weights of {spec} lack {len(report.missing)} tensors the model uses:"
                         f" {report.missing[:10]}")
    usable = {k: v for k, v in state.items() if k in own}
    params = [p for p in target.parameters() if hasattr(p, "ds_id")]
    if params:  # ZeRO-3: partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            _copy(own, usable)
    else:
        _copy(own, usable)
    report.loaded = len(usable)
    return report


@torch.no_grad()
def _copy(own: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    for k, v in state.items():
        own[k].data.copy_(v.to(dtype=own[k].dtype))
