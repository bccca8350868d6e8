"""A pretrained vision backbone as the image side of the single-stream encoder (grid features).

``VisionBackbone`` wraps a transformers vision tower (``ViTModel``, ``CLIPVisionModel``, any
``AutoModel`` of a vision config; ConvNeXt/ResNet grids too) or a timm model, rebuilt from the
model config alone (``config.vision_backbone``); its weights come with the model's own
(``from_pretrained``) or, at the start of training, from the backbone's folder or file
(``backbone_source.load_backbone_weights``). Its output tokens -- a ViT's patch tokens without the
[CLS]/register tokens, or a CNN's grid cells -- become image tokens of the encoder, each with the
7-d geometry ``[x1, y1, x2, y2, w, h, w*h]`` of its grid cell in the input crop (normalised), which
the region embedding takes as UNITER takes a detector's boxes. ``config.backbone_max_tokens`` > 0
average-pools the grid to at most that many cells (keeping its aspect); the pooled cells' geometry
is the union of the cells they average.

Inputs: ``pixel_values`` uint8 ``[P, 3, S, S]`` (what the collator gives: normalised here with the
backbone's ``image_mean``/``image_std``) or floats already normalised that way. Identical images in
a batch (a text scored against one image, hard-negative groups, all-pairs evaluation) go through the
backbone once.

Freezing (``config.backbone_trainable_blocks``): 0 freezes the backbone (run without autograd,
kept in eval mode), N > 0 trains its last N blocks and everything after them (final norms), -1
trains all of it. Parameters the token output never uses (poolers, CLIP's post-layernorm,
classifier heads) are always frozen. Frozen parts stay in eval mode (dropout off, batch-norm
statistics fixed) whatever ``train()`` says.

This module needs only torch and transformers (timm for timm backbones): it travels with exported
models (``model/hub.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .configuration import CrossModalConfig

# Module names whose parameters the token output never uses.
UNUSED_MODULES = ("pooler", "post_layernorm", "head", "fc_norm", "classifier")
# Names of the block lists that partial freezing counts from the end.
BLOCK_LISTS = ("layer", "layers", "blocks", "stages", "resblocks")
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
MAX_PREFIX_TOKENS = 16  # [CLS] + register tokens before the patch tokens
_HASH_WEIGHTS: dict[int, Tensor] = {}


class MissingBackboneLibrary(ImportError):
    """The library a backbone needs is not importable."""


def import_timm():
    """``timm``, or an ImportError that names what is missing (timm imports torchvision)."""
    try:
        import timm  # noqa: PLC0415
    except Exception as e:  # ImportError, or a RuntimeError from a torchvision built for another torch
        raise MissingBackboneLibrary(
            "timm backbones need the packages timm and torchvision (pip install 'iais_scale[vision]', with a"
            f" torchvision built for your torch: {torch.__version__}); importing timm failed:"
            f" {type(e).__name__}: {e}"
        ) from None
    return timm


def build_transformers_model(config_dict: dict) -> nn.Module:
    """A transformers vision model from its config dict (``model_type`` included), randomly initialised."""
    from transformers import AutoConfig, AutoModel

    d = dict(config_dict)
    model_type = d.pop("model_type")
    for k in ("transformers_version", "_name_or_path", "architectures"):
        d.pop(k, None)
    vcfg = AutoConfig.for_model(model_type, **d)
    try:
        return AutoModel.from_config(vcfg, add_pooling_layer=False)  # ViT-like: no unused pooler
    except TypeError:
        return AutoModel.from_config(vcfg)


def build_timm_model(name: str, kwargs: dict | None = None) -> nn.Module:
    """A timm model by name without its classifier (``num_classes=0``), randomly initialised."""
    timm = import_timm()
    kw = {"num_classes": 0, **(kwargs or {})}
    return timm.create_model(name, pretrained=False, **kw)


def pooled_grid(h: int, w: int, max_tokens: int) -> tuple[int, int]:
    """The largest grid of at most ``max_tokens`` cells with about the aspect of ``h x w`` (no upsampling)."""
    if max_tokens <= 0 or h * w <= max_tokens:
        return h, w
    s = math.sqrt(max_tokens / (h * w))
    ph, pw = max(1, min(h, math.floor(h * s))), max(1, min(w, math.floor(w * s)))
    while ph * pw > max_tokens:
        if ph >= pw:
            ph -= 1
        else:
            pw -= 1
    # Grow the side that still fits (floor can leave room for one more row or column).
    while (ph + 1) * pw <= max_tokens and ph < h:
        ph += 1
    while ph * (pw + 1) <= max_tokens and pw < w:
        pw += 1
    return ph, pw


def _bins(n: int, out: int) -> list[tuple[int, int]]:
    """The input ranges ``[start, end)`` adaptive average pooling averages for each of ``out`` outputs."""
    return [(math.floor(i * n / out), math.ceil((i + 1) * n / out)) for i in range(out)]


def grid_geometry(h: int, w: int, ph: int | None = None, pw: int | None = None) -> Tensor:
    """``[ph * pw, 7]`` float32 geometry of the (pooled) cells of an ``h x w`` grid, row-major:
    ``[x1, y1, x2, y2, w, h, w*h]`` normalised to the input crop."""
    ph, pw = ph or h, pw or w
    rows = [(a / h, b / h) for a, b in _bins(h, ph)]
    cols = [(a / w, b / w) for a, b in _bins(w, pw)]
    out = [[x1, y1, x2, y2, x2 - x1, y2 - y1, (x2 - x1) * (y2 - y1)] for y1, y2 in rows for x1, x2 in cols]
    return torch.tensor(out, dtype=torch.float32)


def unique_rows(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, inverse)`` with ``x[first][inverse] == x`` when ``x`` [P, ...] has repeated rows, else
    None. Exact: rows are grouped by an integer hash of their bytes, then compared."""
    n = x.shape[0]
    if n < 2:
        return None
    flat = x.reshape(n, -1)
    if flat.dtype.is_floating_point and flat.dtype.itemsize == 2:
        flat = flat.view(torch.int16)
    elif flat.dtype.is_floating_point:
        flat = flat.view(torch.int32) if flat.dtype.itemsize == 4 else flat.view(torch.int64)
    width = flat.shape[1]
    if width not in _HASH_WEIGHTS:
        gen = torch.Generator().manual_seed(width)
        _HASH_WEIGHTS[width] = torch.randint(1, 1 << 31, (width,), generator=gen, dtype=torch.int64)
    weights = _HASH_WEIGHTS[width].to(flat.device)
    h = torch.zeros(n, dtype=torch.int64, device=flat.device)
    step = max(1, (1 << 22) // n)  # bounded temporary memory
    for i in range(0, width, step):
        h += (flat[:, i : i + step].long() * weights[i : i + step]).sum(1)
    keys, inverse = torch.unique(h, return_inverse=True)
    if keys.numel() == n:
        return None
    first = torch.full((keys.numel(),), n, dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=flat.device), reduce="amin")
    order = first.argsort()  # unique rows in order of first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=flat.device)
    first, inverse = first[order], rank[inverse]
    if not torch.equal(flat, flat.index_select(0, first.index_select(0, inverse))):
        return None  # a hash collision of different images: no deduplication
    return first, inverse


class VisionBackbone(nn.Module):
    """Pixels -> (grid features [P, N, D], their geometry [N, 7])."""

    def __init__(self, config: CrossModalConfig):
        super().__init__()
        spec = config.vision_backbone or {}
        self.library = spec.get("library")
        if self.library == "transformers":
            self.model = build_transformers_model(spec["config"])
            self.patch_size = spec["config"].get("patch_size")
        elif self.library == "timm":
            self.model = build_timm_model(spec["name"], spec.get("kwargs"))
            patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
            self.patch_size = patch[0] if isinstance(patch, (tuple, list)) else patch
        else:
            raise ValueError(f"vision_backbone: unknown library {self.library!r}")
        if isinstance(self.patch_size, (tuple, list)):
            self.patch_size = self.patch_size[0]
        self.dim = config.region_feature_dim
        self.image_size = config.image_size
        self.max_tokens = config.backbone_max_tokens
        self.trainable_blocks = config.backbone_trainable_blocks
        self.mean = tuple(config.image_mean or DEFAULT_MEAN)
        self.std = tuple(config.image_std or DEFAULT_STD)
        self._frozen_roots: list[nn.Module] = []
        self.set_trainable(self.trainable_blocks)
        if config.gradient_checkpointing_every and self.trainable_blocks != 0:
            self.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ trainability

    def blocks(self) -> list[nn.Module]:
        """The backbone's block list (the longest ``layer(s)``/``blocks``/``stages`` list), or []."""
        best: list[nn.Module] = []
        for name, module in self.model.named_modules():
            if name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(module, (nn.ModuleList, nn.Sequential)):
                if len(module) > len(best):
                    best = list(module)
        if not best:  # ResNet-style: layer1, layer2, ... as direct children
            best = [m for n, m in self.model.named_children() if n.startswith("layer") and n[5:].isdigit()]
        return best

    def set_trainable(self, trainable_blocks: int) -> None:
        """Set ``requires_grad`` by ``trainable_blocks`` (see the module docstring)."""
        names = [n for n, _ in self.model.named_parameters()]
        if trainable_blocks == 0:
            start = len(names)
        elif trainable_blocks < 0:
            start = 0
        else:
            blocks = self.blocks()
            if not blocks:
                raise ValueError(f"backbone_trainable_blocks={trainable_blocks}: no block list found in"
                                 f" {type(self.model).__name__}; use 0 (frozen) or -1 (all)")
            first = blocks[max(0, len(blocks) - trainable_blocks)]
            first_param = next(first.parameters(), None)
            ids = [id(p) for p in self.model.parameters()]
            start = ids.index(id(first_param)) if first_param is not None else len(names)
        for i, (name, p) in enumerate(self.model.named_parameters()):
            unused = any(part in UNUSED_MODULES for part in name.split("."))
            p.requires_grad_(i >= start and not unused)
        self.trainable_blocks = trainable_blocks
        self._frozen_roots = []
        self._find_frozen(self.model)
        self.train(self.training)

    def _find_frozen(self, module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            self._frozen_roots.append(module)
            return
        for child in module.children():
            if next(child.parameters(), None) is not None:
                self._find_frozen(child)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_roots:
            m.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's block activations in backward (transformers' or timm's own)."""
        if getattr(self.model, "supports_gradient_checkpointing", False):
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ forward

    def normalise(self, pixel_values: Tensor) -> Tensor:
        """uint8 pixels -> ``(x / 255 - mean) / std`` float32; float pixels pass unchanged."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        x = pixel_values.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def grid(self, hidden: Tensor, height: int, width: int) -> Tensor:
        """The backbone's output as a grid ``[P, gh, gw, D]``."""
        if hidden.dim() == 4:
            if self.library == "transformers" or (hidden.shape[1] == self.dim and hidden.shape[-1] != self.dim):
                return hidden.permute(0, 2, 3, 1)  # NCHW (CNNs)
            return hidden  # NHWC (timm's Swin, ...)
        if hidden.dim() != 3:
            raise ValueError(f"backbone output of shape {tuple(hidden.shape)}: expected [P, L, D] or a 2-d grid")
        n = hidden.shape[1]
        prefix = getattr(self.model, "num_prefix_tokens", None)
        gh = gw = 0
        if self.patch_size:
            gh, gw = height // self.patch_size, width // self.patch_size
        if not (gh and 0 <= n - gh * gw <= MAX_PREFIX_TOKENS and (prefix is None or prefix == n - gh * gw)):
            gh = gw = math.isqrt(n - (prefix or 0))  # a hierarchical model (Swin): the last stage's grid
        if prefix is None:
            prefix = n - gh * gw  # [CLS] and register tokens come first
        if gh < 1 or n - prefix != gh * gw:
            raise ValueError(f"backbone output of {n} tokens does not hold a square grid (+ prefix tokens)")
        return hidden[:, prefix:].reshape(hidden.shape[0], gh, gw, hidden.shape[-1])

    def features(self, x: Tensor) -> Tensor:
        """Normalised pixels [P, 3, S, S] -> the output grid [P, gh, gw, D]."""
        if self.library == "transformers":
            out = self.model(pixel_values=x)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        else:
            hidden = self.model.forward_features(x)
        return self.grid(hidden, x.shape[-2], x.shape[-1])

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """[P, 3, S, S] pixels -> (features [P, N, D], geometry [N, 7]) of the (pooled) grid cells."""
        dedup = unique_rows(pixel_values)
        x = pixel_values.index_select(0, dedup[0]) if dedup is not None else pixel_values
        param = next(self.model.parameters(), None)
        x = self.normalise(x)
        x = x.to(param.dtype) if param is not None and param.dtype.is_floating_point else x
        if self.frozen:
            with torch.no_grad():
                grid = self.features(x)
        else:
            grid = self.features(x)
        p, gh, gw, d = grid.shape
        ph, pw = pooled_grid(gh, gw, self.max_tokens)
        if (ph, pw) != (gh, gw):
            grid = nn.functional.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), (ph, pw)).permute(0, 2, 3, 1)
        feats = grid.reshape(p, ph * pw, d)
        self.tokens_per_image = ph * pw  # for throughput figures (the trainer's tokens/s)
        if dedup is not None:
            feats = feats.index_select(0, dedup[1])
        return feats, grid_geometry(gh, gw, ph, pw).to(feats.device)
