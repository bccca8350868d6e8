"""The model config of an experiment (its ``model:`` section, ``iais_scale.config.ModelConfig``) -> ``CrossModalConfig``."""

from __future__ import annotations

from .backbone_source import backbone_fields
from .configuration import MODEL_SIZES, CrossModalConfig
from .image_inputs import image_input_of


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
    """Build the HF config from an experiment's ``ModelConfig`` (a named size or explicit dims).

    ``image_input: backbone`` reads the backbone's config and data config (``backbone_source``):
    its width becomes ``region_feature_dim``, its input size, mean/std, interpolation and crop the
    ``image_*`` fields.
    """
    hidden, layers, heads, inter = MODEL_SIZES.get(model.size, (None, None, None, None))
    kw = dict(
        image_size=model.image_size,
        patch_size=model.patch_size,
        region_feature_dim=model.region_feature_dim or region_feature_dim,
    )
    image_input = image_input_of(model)
    if image_input.uses_backbone:
        kw.update(backbone_fields(model.backbone))
        kw.update(backbone_trainable_blocks=model.backbone_trainable_blocks,
                  backbone_max_tokens=model.backbone_max_tokens or 0)
    config = CrossModalConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size or hidden,
        num_hidden_layers=model.num_layers or layers,
        num_attention_heads=model.num_heads or heads,
        intermediate_size=model.intermediate_size or inter,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        max_position_embeddings=max(512, max_text_len),
        iais_layers=iais_layers,
        cls_token_id=cls_token_id,
        sep_token_id=sep_token_id,
        pad_token_id=pad_token_id,
        gradient_checkpointing_every=model.checkpoint_every_k_layers if model.gradient_checkpointing else 0,
        image_input=model.image_input,
        itc_dim=model.itc_dim,
        **kw,
    )
    image_input.check(config)
    return config
