"""The single-stream image-text encoder with its heads, read top to bottom.

``[CLS] w_1 .. w_T [SEP] (pad) r_1 .. r_V (pad)`` -> BERT embeddings for the text, UNITER region
embeddings for the image -> transformers' ``BertLayer`` stack (SDPA attention) -> pooled [CLS].
The layers named in ``config.iais_layers`` also give the IAIS relation matrices of the rows that
the caller marks as matched pairs: one extra ``q k^T`` over the compacted word/region positions of
those rows only (``iais_scale.iais``), from the layer's own query/key projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertLayer,
    BertOnlyMLMHead,
    BertPooler,
    BertPreTrainedModel,
)

from .. import iais
from .configuration import CrossModalConfig
from .embeddings import RegionEmbeddings


@dataclass
class EncoderOutput:
    hidden: Tensor  # [P, N, D]
    pooled: Tensor  # [P, D]
    iais_loss: Tensor | None = None  # [M] per matched row, mean over the IAIS layers
    # Detached per-row diagnostics of the last IAIS layer: normalised entropies (see iais.py).
    relation_stats: dict[str, Tensor] = field(default_factory=dict)
    relations: list[iais.RelationMatrices] = field(default_factory=list)  # one per IAIS layer


@dataclass
class IaisRequest:
    """Which rows of the batch are matched pairs, and how to align them."""

    rows: Tensor  # [M] long, row indices into the batch
    alignment: str | None = "singular"  # None: relations only, no loss (evaluation)
    direction: str = "L"


class CrossModalModel(BertPreTrainedModel):
    """Inherits BERT's weight initialisation (incl. the embeddings' position-id buffers on load)."""

    config_class = CrossModalConfig
    base_model_prefix = "cross_modal"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _tied_weights_keys = {"mlm.predictions.decoder.weight": "text_embeddings.word_embeddings.weight"}

    def __init__(self, config: CrossModalConfig):
        super().__init__(config)
        self.text_embeddings = BertEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers))
        self.pooler = BertPooler(config)
        self.itm = nn.Linear(config.hidden_size, 1)  # UNITER's rank/ITM score on the pooled [CLS]
        self.mlm = BertOnlyMLMHead(config)
        self._iais_layers = set(config.resolved_iais_layers())
        self.post_init()

    # ------------------------------------------------------------------ embeddings

    def embed(self, text_ids: Tensor, region_features: Tensor, region_geometry: Tensor) -> Tensor:
        text = self.text_embeddings(input_ids=text_ids)
        image_type = self.text_embeddings.token_type_embeddings.weight[1]
        image = self.region_embeddings(region_features.to(text.dtype), region_geometry.to(text.dtype), image_type)
        return torch.cat([text, image], dim=1)

    def word_mask(self, text_ids: Tensor, text_attention: Tensor) -> Tensor:
        """Valid word positions: attended text tokens other than [CLS] and [SEP]."""
        cfg = self.config
        return text_attention.bool() & (text_ids != cfg.cls_token_id) & (text_ids != cfg.sep_token_id)

    # ------------------------------------------------------------------ one layer

    def _layer(
        self,
        index: int,
        hidden: Tensor,
        attention: Tensor,
        word_mask: Tensor,
        region_mask: Tensor,
        n_text: int,
        request: IaisRequest | None,
    ) -> tuple[Tensor, iais.RelationMatrices | None]:
        """One transformer layer, plus the relation matrices of the requested rows at IAIS layers.

        The relations are an output of this function (never state stashed on the module), so under
        activation checkpointing the recomputation in backward can neither double-count nor drop them.
        """
        layer = self.layers[index]
        rel = None
        if request is not None and index in self._iais_layers:
            attn = layer.attention.self
            x = hidden.index_select(0, request.rows)
            m, n, _ = x.shape
            q = attn.query(x).view(m, n, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
            k = attn.key(x).view(m, n, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
            rel = iais.relation_matrices(
                q,
                k,
                word_mask.index_select(0, request.rows),
                region_mask.index_select(0, request.rows),
                max_words=max(n_text - 2, 1),  # the text part holds [CLS] and [SEP] besides the words
                max_regions=n - n_text,
            )
        return layer(hidden, attention), rel

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        text_ids: Tensor,
        text_attention: Tensor,
        region_features: Tensor,
        region_geometry: Tensor,
        region_attention: Tensor,
        iais_request: IaisRequest | None = None,
    ) -> EncoderOutput:
        """Encode P image-text pairs: text [P, Lt], regions [P, Lr, F] and [P, Lr, 7]."""
        hidden = self.embed(text_ids, region_features, region_geometry)
        n_text, n_regions = text_ids.shape[1], region_features.shape[1]
        valid = torch.cat([text_attention.bool(), region_attention.bool()], dim=1)
        attention = valid[:, None, None, :]  # SDPA boolean mask: True = attend
        pad = valid.new_zeros(valid.shape[0], n_regions)
        word_mask = torch.cat([self.word_mask(text_ids, text_attention), pad], dim=1)
        region_mask = torch.cat([valid.new_zeros(valid.shape[0], n_text), region_attention.bool()], dim=1)

        every = self.config.gradient_checkpointing_every
        relations = []
        for i in range(len(self.layers)):
            args = (i, hidden, attention, word_mask, region_mask, n_text, iais_request)
            if every and self.training and torch.is_grad_enabled() and i % every == 0:
                hidden, rel = checkpoint(self._layer, *args, use_reentrant=False)
            else:
                hidden, rel = self._layer(*args)
            if rel is not None:
                relations.append(rel)
        out = EncoderOutput(hidden=hidden, pooled=self.pooler(hidden), relations=relations)
        if relations and iais_request.alignment is not None:
            losses = [
                iais.iais_loss(r, alignment=iais_request.alignment, direction=iais_request.direction, reduction="none")
                for r in relations
            ]
            out.iais_loss = torch.stack(losses).mean(0)
            out.relation_stats = iais.attention_entropy(relations[-1])
        return out

    # ------------------------------------------------------------------ heads

    def itm_logit(self, out: EncoderOutput) -> Tensor:
        """[P] image-text matching logit; sigmoid gives the score of the spec's recipe."""
        return self.itm(out.pooled).squeeze(-1).float()

    def mlm_logits(self, out: EncoderOutput, n_text: int) -> Tensor:
        """[P, Lt, vocab] word predictions at the text positions."""
        return self.mlm(out.hidden[:, :n_text])
