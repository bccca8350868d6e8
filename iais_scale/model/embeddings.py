"""Image-token embeddings (UNITER's region embedding)."""

from __future__ import annotations

from torch import Tensor, nn

from .configuration import CrossModalConfig


class RegionEmbeddings(nn.Module):
    """UNITER: LayerNorm(linear(feature)) + LayerNorm(linear(box geometry)) + type, LayerNorm, dropout.

    The box geometry is the 7-d ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image size; there
    is no position embedding, so the order of the regions carries no information.
    """

    def __init__(self, config: CrossModalConfig):
        super().__init__()
        d = config.hidden_size
        self.feature_linear = nn.Linear(config.region_feature_dim, d)
        self.feature_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.box_linear = nn.Linear(config.region_geometry_dim, d)
        self.box_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: Tensor, boxes: Tensor, type_embedding: Tensor) -> Tensor:
        x = self.feature_norm(self.feature_linear(features))
        x = x + self.box_norm(self.box_linear(boxes)) + type_embedding
        return self.dropout(self.norm(x))

