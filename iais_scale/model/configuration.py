"""The model's Hugging Face config: BERT's fields plus the image input and the IAIS layers."""

from __future__ import annotations

from transformers import BertConfig


class CrossModalConfig(BertConfig):
    """A single-stream image-text encoder: ``[CLS] words [SEP] image-tokens`` through BERT layers.

    Extends ``BertConfig`` so that transformers' own BERT embeddings and layers take it unchanged.
    ``iais_layers`` lists the layers (negative indices count from the end) whose self-attention
    yields the IAIS relation matrices; ``cls_token_id``/``sep_token_id`` locate the words.
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
        **kwargs,
    ):
        kwargs.setdefault("type_vocab_size", 2)  # 0: text, 1: image tokens (as in UNITER)
        kwargs.setdefault("attn_implementation", "sdpa")
        super().__init__(**kwargs)
        if image_input not in ("regions", "patches"):
            raise ValueError(f"image_input must be 'regions' or 'patches', got {image_input!r}")
        if image_input == "patches" and image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_input = image_input
        self.region_feature_dim = region_feature_dim
        self.region_geometry_dim = region_geometry_dim
        self.iais_layers = list(iais_layers) if iais_layers is not None else [-1]
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        # 0: off; k: checkpoint every k-th layer's activations (recomputed in backward).
        self.gradient_checkpointing_every = gradient_checkpointing_every
        self.image_size = image_size  # patches: square input side in pixels
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.itc_dim = itc_dim  # > 0: contrastive projections from text-only and image-only passes

    def resolved_iais_layers(self) -> list[int]:
        n = self.num_hidden_layers
        layers = sorted({i % n for i in self.iais_layers})
        for i in self.iais_layers:
            if not -n <= i < n:
                raise ValueError(f"iais layer {i} out of range for {n} layers")
        return layers


def config_from_experiment(
    model,
    *,
    vocab_size: int,
    region_feature_dim: int,
    cls_token_id: int,
    sep_token_id: int,
    pad_token_id: int,
    iais_layers: list[int],
    max_text_len: int,
) -> CrossModalConfig:
    """Build the HF config from an experiment's ``ModelConfig`` (a named size or explicit dims)."""
    from ..config import MODEL_SIZES

    hidden, layers, heads, inter = MODEL_SIZES.get(model.size, (None, None, None, None))
    return CrossModalConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size or hidden,
        num_hidden_layers=model.num_layers or layers,
        num_attention_heads=model.num_heads or heads,
        intermediate_size=model.intermediate_size or inter,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        max_position_embeddings=max(512, max_text_len),
        region_feature_dim=model.region_feature_dim or region_feature_dim,
        iais_layers=iais_layers,
        cls_token_id=cls_token_id,
        sep_token_id=sep_token_id,
        pad_token_id=pad_token_id,
        gradient_checkpointing_every=model.checkpoint_every_k_layers if model.gradient_checkpointing else 0,
        image_input=model.image_input,
        image_size=model.image_size,
        patch_size=model.patch_size,
        itc_dim=model.itc_dim,
    )
