"""The Hugging Face ecosystem: Auto-class registration, self-contained modelling code, the Hub.

* :func:`register_auto_classes` (run on ``import iais_scale.model``): ``AutoConfig`` and
  ``AutoModel`` know ``model_type: iais_single_stream``.
* :func:`write_remote_code`: copies the modelling code into a model folder -- ``iais.py`` (pure
  torch), ``configuration_iais.py``, ``embeddings.py``, ``backbone.py``, ``image_inputs.py`` and
  ``modeling_iais.py``, their
  package-relative imports rewritten to folder-relative ones -- and records ``auto_map`` in its
  ``config.json``, so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works
  where this package is not installed (the code needs torch and transformers; timm backbones also
  timm). ``CrossModalModel.save_pretrained`` calls it, so every saved or exported folder has it.
* :func:`push_to_hub`: upload such a folder to a Hub repository (``huggingface_hub``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .backbone import DEFAULT_MEAN, DEFAULT_STD
from .configuration import CrossModalConfig
from .encoder import CrossModalModel
from .image_inputs import IMAGE_INPUTS

PACKAGE = Path(__file__).resolve().parents[1]  # iais_scale/
CONFIG_MODULE = "configuration_iais"
MODEL_MODULE = "modeling_iais"
# Exported file -> source file (relative to the package). Order: dependencies first.
EXPORTED = {
    "iais.py": "iais.py",
    f"{CONFIG_MODULE}.py": "model/configuration.py",
    "embeddings.py": "model/embeddings.py",
    "backbone.py": "model/backbone.py",
    "image_inputs.py": "model/image_inputs.py",
    f"{MODEL_MODULE}.py": "model/encoder.py",
}
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.CrossModalConfig", "AutoModel": f"{MODEL_MODULE}.CrossModalModel"}
# Package-relative imports -> folder-relative ones. transformers copies a module's relative imports
# into its module cache only when written ``from .name import ...``: ``from . import iais`` alone
# would leave iais.py behind, hence the second line.
_REWRITES = (
    (re.compile(r"^from \.\. import iais$", re.M),
     "from . import iais\nfrom .iais import RelationMatrices as _RelationMatrices  # noqa: F401 (copies iais.py)"),
    (re.compile(r"^from \.configuration import ", re.M), f"from .{CONFIG_MODULE} import "),
)
_RELATIVE = re.compile(r"^\s*from\s+(\.+)(\w*)\s+import", re.M)


def register_auto_classes() -> None:
    """``AutoConfig``/``AutoModel`` know ``iais_single_stream`` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(CrossModalConfig.model_type, CrossModalConfig, exist_ok=True)
    AutoModel.register(CrossModalConfig, CrossModalModel, exist_ok=True)


def exported_sources() -> dict[str, str]:
    """{file name in the model folder: its text}: the modelling code with its imports rewritten.

    Raises RuntimeError when a relative import would not resolve inside the folder (a module that
    does not travel), so a broken export never gets written."""
    out = {}
    modules = {name[: -len(".py")] for name in EXPORTED}
    for name, src in EXPORTED.items():
        text = (PACKAGE / src).read_text(encoding="utf-8")
        for pattern, repl in _REWRITES:
            text = pattern.sub(repl, text)
        for dots, module in _RELATIVE.findall(text):
            if dots != "." or (module and module not in modules):
                raise RuntimeError(f"{src}: relative import 'from {dots}{module} import' does not travel with"
                                   f" the model folder ({sorted(EXPORTED)})")
        header = (f"# Generated from iais_scale/{src} by iais_scale.model.hub.write_remote_code: the modelling"
                  " code of this folder, for\n# AutoModel.from_pretrained(folder, trust_remote_code=True)."
                  " Edit the package, not this copy.\n")
        out[name] = header + text
    return out


def write_remote_code(folder) -> Path:
    """Write the modelling code into ``folder`` and ``auto_map`` into its ``config.json``."""
    folder = Path(folder)
    for name, text in exported_sources().items():
        (folder / name).write_text(text, encoding="utf-8")
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["auto_map"] = dict(AUTO_MAP)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        processor = image_processor_config(data)
        if processor is not None and not (folder / PROCESSOR_FILE).is_file():
            (folder / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    return folder


PROCESSOR_FILE = "preprocessor_config.json"
_PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def image_processor_config(config: dict) -> dict | None:
    """A ``CLIPImageProcessor`` config equivalent to a pixel model's evaluation transform (shorter side
    to ``S / crop_pct``, centre ``S x S`` crop, its mean/std), or None for region models.
    ``AutoImageProcessor.from_pretrained(folder)`` then gives the model's normalised float pixels
    (the collator's own path gives uint8 pixels, which a backbone model normalises itself)."""
    kind = IMAGE_INPUTS.get(config.get("image_input"))
    if kind is None or not kind.reads_pixels:
        return None
    size = int(config.get("image_size") or 384)
    crop_pct = float(config.get("image_crop_pct") or 1.0)
    mean, std = config.get("image_mean"), config.get("image_std")  # None: the ImageNet default
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(size / crop_pct)},
        "resample": _PIL_CODES.get(config.get("image_resample") or "bicubic", 3),
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean or DEFAULT_MEAN),
        "image_std": list(std or DEFAULT_STD),
    }


def push_to_hub(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload a model folder to the Hub repository ``repo_id`` (created when missing); returns the
    commit URL. Authentication: ``token``, else ``HF_TOKEN`` / the cached login."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload iais_scale model",
                             ignore_patterns=[".iais_*"])  # the export's own list of what it wrote
    return str(getattr(info, "commit_url", info))
