"""Image-token embeddings: UNITER's region embedding (and its feature regression head) and ViLT's patch embedding."""

from __future__ import annotations

import torch
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
        self.feature_norm = Float32LayerNorm(d, eps=config.layer_norm_eps)
        self.box_linear = nn.Linear(config.region_geometry_dim, d)
        self.box_norm = Float32LayerNorm(d, eps=config.layer_norm_eps)
        self.norm = Float32LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: Tensor, boxes: Tensor, type_embedding: Tensor) -> Tensor:
        x = self.feature_norm(self.feature_linear(features))
        x = x + self.box_norm(self.box_linear(boxes)) + type_embedding
        return self.dropout(self.norm(x))


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm, computed in float32 for float16 inputs. A padded region's features (zeros, as is the
    bias of a fresh linear layer) give a constant row, whose backward through a float16 LayerNorm on
    the CPU is NaN (eps=1e-12 underflows there): fp16 training would skip every step. (A module of its
    own, not a function: ZeRO-3 gathers its parameters when it is called.)"""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float16:
            return super().forward(x)
        w, b = (None if t is None else t.float() for t in (self.weight, self.bias))
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class PatchEmbeddings(nn.Module):
    """ViLT-style: non-overlapping patches projected by a strided convolution, plus learned 2-d
    (row, column) position embeddings and the image type, LayerNorm, dropout. No detector needed."""

    def __init__(self, config: CrossModalConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.grid = config.image_size // p
        self.projection = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.row_embeddings = nn.Embedding(self.grid, d)
        self.col_embeddings = nn.Embedding(self.grid, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: Tensor, type_embedding: Tensor) -> Tensor:
        """[P, C, S, S] normalised pixels -> [P, grid * grid, d] tokens, row-major."""
        if pixel_values.shape[-1] != self.grid * self.projection.stride[0] or pixel_values.shape[-2] != pixel_values.shape[-1]:
            raise ValueError(f"pixel_values must be square {self.grid * self.projection.stride[0]} px, got {tuple(pixel_values.shape)}")
        x = self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        idx = torch.arange(self.grid, device=x.device)
        pos = (self.row_embeddings(idx)[:, None, :] + self.col_embeddings(idx)[None, :, :]).flatten(0, 1)
        return self.dropout(self.norm(x + pos + type_embedding))


class RegionFeatureRegression(nn.Module):
    """UNITER's masked-region feature regression head. Its output layer reuses (transposed) the
    region feature projection ``feature_weight`` [d, F] passed in, as UNITER ties them."""

    def __init__(self, config: CrossModalConfig):
        super().__init__()
        d = config.hidden_size
        self.net = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=config.layer_norm_eps))
        self.bias = nn.Parameter(torch.zeros(config.region_feature_dim))

    def forward(self, hidden: Tensor, feature_weight: Tensor) -> Tensor:
        return nn.functional.linear(self.net(hidden), feature_weight.t(), self.bias)
