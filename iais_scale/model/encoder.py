"""The single-stream image-text encoder with its heads, read top to bottom.

``[CLS] w_1 .. w_T [SEP] (pad) r_1 .. r_V (pad)`` -> BERT embeddings for the text, UNITER region
embeddings for the image (detector regions, or a vision backbone's grid cells with their cell
geometry; ViLT patches otherwise) -> transformers' ``BertLayer`` stack (SDPA attention) -> pooled [CLS].
The layers named in ``config.iais_layers`` also give the IAIS relation matrices of the rows that
the caller marks as matched pairs: one extra ``q k^T`` over the compacted word/region positions of
those rows only (``iais_scale.iais``), from the layer's own query/key projections.
"""

from __future__ import annotations

import math
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
from .image_inputs import image_input_of, image_tensor_keys

# Set by ``iais_scale.model`` (hub.write_remote_code): ``save_pretrained`` also writes the modelling
# code and ``auto_map``, so that a saved folder loads with ``trust_remote_code=True`` anywhere.
REMOTE_CODE_WRITER = None

TEXT_TENSOR_KEYS = ("text_ids", "text_attention")


def image_tensors(batch: dict) -> dict[str, Tensor]:
    """The image inputs a batch carries: region features or pixels."""
    return {k: batch[k] for k in image_tensor_keys() if k in batch}


def select_pairs(texts: dict, images: dict, text_idx: Tensor, image_idx: Tensor) -> dict[str, Tensor]:
    """Model inputs of the pairs (text_idx[p], image_idx[p]): texts and images are padded
    separately by the collator, so any text pairs with any image by indexing."""
    out = {k: texts[k].index_select(0, text_idx.to(texts[k].device)) for k in TEXT_TENSOR_KEYS}
    out.update({k: v.index_select(0, image_idx.to(v.device)) for k, v in image_tensors(images).items()})
    return out


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
    per_head: bool = False  # also each head's S_L and S_V (ISDa restricts them per head)


class CrossModalModel(BertPreTrainedModel):
    """Inherits BERT's weight initialisation (incl. the embeddings' position-id buffers on load)."""

    config_class = CrossModalConfig
    base_model_prefix = "cross_modal"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _tied_weights_keys = {
        "mlm.predictions.decoder.weight": "text_embeddings.word_embeddings.weight",
        "mlm.predictions.decoder.bias": "mlm.predictions.bias",
    }

    def __init__(self, config: CrossModalConfig):
        super().__init__(config)
        self.text_embeddings = BertEmbeddings(config)
        self.image_input = image_input_of(config)  # model/image_inputs.py: the image side's modules
        self.image_input.check(config)
        self.image_input.build(self, config)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers))
        self.pooler = BertPooler(config)
        self.itm = nn.Linear(config.hidden_size, 1)  # UNITER's rank/ITM score on the pooled [CLS]
        self.mlm = BertOnlyMLMHead(config)
        if config.itc_dim:
            self.itc_text_proj = nn.Linear(config.hidden_size, config.itc_dim)
            self.itc_image_proj = nn.Linear(config.hidden_size, config.itc_dim)
            # CLIP's initial temperature; shape [1], not [] (DeepSpeed cannot flatten 0-dim parameters).
            self.itc_logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self._iais_layers = set(config.resolved_iais_layers())
        self.post_init()
        self.image_input.after_init(self, config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, plus the modelling code and ``auto_map`` in the folder
        (when this package is installed): it then loads with ``trust_remote_code=True`` without it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if REMOTE_CODE_WRITER is not None and kwargs.get("is_main_process", True):
            REMOTE_CODE_WRITER(save_directory)

    # ------------------------------------------------------------------ embeddings

    def embed_image(self, **tensors: Tensor | None) -> tuple[Tensor, Tensor]:
        """Image tokens [P, Li, d] and their validity [P, Li] from the collated image tensors (none:
        zero image tokens, the text-only pass of ITC)."""
        image_type = self.text_embeddings.token_type_embeddings.weight[1]
        given = {k: v for k, v in tensors.items() if v is not None}
        if not given:
            return image_type.new_zeros(0, 0, image_type.shape[0]), torch.zeros(0, 0, dtype=torch.bool)
        unknown = sorted(set(given) - set(self.image_input.tensors))
        if unknown:
            raise ValueError(f"a {self.image_input.name} model reads {', '.join(self.image_input.tensors)};"
                             f" got {', '.join(unknown)}")
        return self.image_input.embed(self, image_type, **given)

    def image_tokens_per_image(self) -> int:
        """Image tokens of one image when the input fixes them (patches, a backbone's pooled grid);
        0 for region models, whose count is in their attention mask."""
        return self.image_input.tokens_per_image(self)

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
                per_head=request.per_head,
            )
        return layer(hidden, attention), rel

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        text_ids: Tensor,
        text_attention: Tensor,
        *,
        iais_request: IaisRequest | None = None,
        **image: Tensor | None,
    ) -> EncoderOutput:
        """Encode P image-text pairs: text [P, Lt] with the image tensors of the model's input
        (``image_inputs.py``: regions ``region_features`` [P, Lr, F], ``region_geometry`` [P, Lr, 7],
        ``region_attention`` [P, Lr]; pixels ``pixel_values`` [P, 3, S, S]). No image tensors, or
        zero image tokens, encode the text alone."""
        text = self.text_embeddings(input_ids=text_ids)
        image, image_valid = self.embed_image(**image)
        if image.shape[0] == 0:  # no image given: zero image tokens
            image, image_valid = text[:, :0], text_attention.bool()[:, :0]
        hidden = torch.cat([text, image], dim=1)
        n_text, n_image = text_ids.shape[1], image.shape[1]
        valid = torch.cat([text_attention.bool(), image_valid], dim=1)
        attention = valid[:, None, None, :]  # SDPA boolean mask: True = attend
        pad = valid.new_zeros(valid.shape[0], n_image)
        word_mask = torch.cat([self.word_mask(text_ids, text_attention), pad], dim=1)
        region_mask = torch.cat([valid.new_zeros(valid.shape[0], n_text), image_valid], dim=1)

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
            out.relation_stats = {k: v.detach() for k, v in iais.attention_entropy(relations[-1]).items()}  # logged
        return out

    # ------------------------------------------------------------------ heads

    def itm_logit(self, out: EncoderOutput) -> Tensor:
        """[P] image-text matching logit; sigmoid gives the score of the spec's recipe."""
        return self.itm(out.pooled).squeeze(-1).float()

    def mlm_logits(self, out: EncoderOutput, n_text: int) -> Tensor:
        """[P, Lt, vocab] word predictions at the text positions."""
        return self.mlm(out.hidden[:, :n_text])

    def mrfr_predictions(self, out: EncoderOutput, n_text: int) -> Tensor:
        """[P, Lr, F] region features regressed from the outputs at the image positions."""
        return self.mrfr(out.hidden[:, n_text:], self.region_embeddings.feature_linear.weight)

    # ------------------------------------------------------------------ scoring pairs

    def pair_logits(self, texts: dict[str, Tensor], images: dict[str, Tensor], text_idx: Tensor,
                    image_idx: Tensor) -> Tensor:
        """[P] ITM logits of the pairs (text ``text_idx[p]``, image ``image_idx[p]``) drawn from
        collated ``texts`` and ``images`` (one forward: callers chunk, or shard over ranks)."""
        return self.itm_logit(self(**select_pairs(texts, images, text_idx, image_idx)))

    # ------------------------------------------------------------------ contrastive (ITC)

    def itc_embeddings(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """[B, itc_dim] text and image embeddings of a batch's text-only and image-only passes."""
        return self.itc_text(batch["text_ids"], batch["text_attention"]), self.itc_image(**image_tensors(batch))

    def itc_text(self, text_ids: Tensor, text_attention: Tensor) -> Tensor:
        """[n, itc_dim] L2-normalised text embeddings from a text-only pass of the same encoder."""
        cls = self(text_ids, text_attention).hidden[:, 0]
        return nn.functional.normalize(self.itc_text_proj(cls).float(), dim=-1)

    def itc_image(self, **image: Tensor) -> Tensor:
        """[n, itc_dim] L2-normalised image embeddings from an image-only pass: ``[CLS] [SEP]`` + image."""
        first = next(v for v in image.values() if v is not None)
        ids = torch.tensor([self.config.cls_token_id, self.config.sep_token_id], device=first.device)
        ids = ids.expand(first.shape[0], 2)
        cls = self(ids, torch.ones_like(ids, dtype=torch.bool), **image).hidden[:, 0]
        return nn.functional.normalize(self.itc_image_proj(cls).float(), dim=-1)
