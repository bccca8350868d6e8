"""The model's Hugging Face config: BERT's fields plus the image input and the IAIS layers.

Self-contained (transformers only): it travels with exported models (``model/hub.py``).
"""

from __future__ import annotations

from transformers import BertConfig

BACKBONE_LIBRARIES = ("transformers", "timm")


# name -> (hidden, layers, heads, intermediate)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 4, 4, 512),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "xl": (2048, 24, 16, 8192),  # ~1.3B parameters
}


class CrossModalConfig(BertConfig):
    """A single-stream image-text encoder: ``[CLS] words [SEP] image-tokens`` through BERT layers.

    Extends ``BertConfig`` so that transformers' own BERT embeddings and layers take it unchanged.
    ``iais_layers`` lists the layers (negative indices count from the end) whose self-attention
    yields the IAIS relation matrices; ``cls_token_id``/``sep_token_id`` locate the words.

    ``image_input`` names one of ``image_inputs.IMAGE_INPUTS`` (checked when the model is built):
    ``regions`` (detector features + box geometry), ``patches`` (a ViLT-style patch projection of
    ``image_size`` pixels) or ``backbone``: a vision backbone, described by
    ``vision_backbone`` (``{"library": "transformers", "config": <its config dict>}`` or
    ``{"library": "timm", "name": ..., "kwargs": {...}}``), whose output tokens (a ViT's patch
    tokens or a CNN's grid cells, average-pooled to at most ``backbone_max_tokens`` when > 0) enter
    the region embedding (``region_feature_dim`` = the backbone's width) with the geometry of their
    grid cells. ``backbone_trainable_blocks``: 0 frozen, N the last N blocks (and what follows
    them), -1 all of it. ``image_size``/``image_mean``/``image_std``/``image_resample``/
    ``image_crop_pct`` are the backbone's data config: uint8 pixels are normalised in the model.
    """

    model_type = "iais_single_stream"

    def __init__(
        self,
        image_input: str = "regions",
        region_feature_dim: int = 2048,
        region_geometry_dim: int = 7,
        iais_layers: list[int] | None = None,
        cls_token_id: int = 101,
        sep_token_id: int = 102,
        gradient_checkpointing_every: int = 0,
        image_size: int = 384,
        patch_size: int = 32,
        num_channels: int = 3,
        itc_dim: int = 0,
        vision_backbone: dict | None = None,
        backbone_trainable_blocks: int = 0,
        backbone_max_tokens: int = 0,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        image_resample: str = "bicubic",
        image_crop_pct: float = 1.0,
        **kwargs,
    ):
        kwargs.setdefault("type_vocab_size", 2)  # 0: text, 1: image tokens (as in UNITER)
        kwargs.setdefault("attn_implementation", "sdpa")
        super().__init__(**kwargs)
        if backbone_trainable_blocks < -1:
            raise ValueError(f"backbone_trainable_blocks: 0 (frozen), N > 0 or -1 (all), got {backbone_trainable_blocks}")
        if backbone_max_tokens < 0:
            raise ValueError(f"backbone_max_tokens: 0 (no pooling) or positive, got {backbone_max_tokens}")
        self.image_input = image_input
        self.region_feature_dim = region_feature_dim
        self.region_geometry_dim = region_geometry_dim
        self.iais_layers = list(iais_layers) if iais_layers is not None else [-1]
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        # 0: off; k: checkpoint every k-th layer's activations (recomputed in backward).
        self.gradient_checkpointing_every = gradient_checkpointing_every
        self.image_size = image_size  # patches/backbone: square input side in pixels
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.itc_dim = itc_dim  # > 0: contrastive projections from text-only and image-only passes
        self.vision_backbone = dict(vision_backbone) if vision_backbone else None
        self.backbone_trainable_blocks = backbone_trainable_blocks
        self.backbone_max_tokens = backbone_max_tokens
        self.image_mean = list(image_mean) if image_mean is not None else None
        self.image_std = list(image_std) if image_std is not None else None
        self.image_resample = image_resample
        self.image_crop_pct = image_crop_pct

    def resolved_iais_layers(self) -> list[int]:
        n = self.num_hidden_layers
        layers = sorted({i % n for i in self.iais_layers})
        for i in self.iais_layers:
            if not -n <= i < n:
                raise ValueError(f"iais layer {i} out of range for {n} layers")
        return layers
