"""Collation: captions -> padded token ids; images -> padded region features and box geometry, or pixels.

Texts and images are padded separately (dynamic padding to the longest in the batch), so that a
caller can pair any text with any image by indexing: ``text_ids[i]`` with ``region_features[j]``.
A caption that carries the data set's word-piece ids (``samples.Caption``) is collated as
``[CLS] ids [SEP]`` instead of being tokenized. Training batches (``pairs``) truncate every caption
to ``max_text_len``; evaluation (``texts``) never cuts stored ids: the text length grows to the
longest such caption, as UNITER evaluates.

The image part is the collator's ``image_fields`` (``image_fields.py``): region features and
boxes, or pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .image_fields import ImageFields
from .samples import ImageSample

__all__ = ["Collator"]


class Collator:
    def __init__(self, tokenizer, max_text_len: int, image_fields: ImageFields):
        """``image_fields``: what the model's samples carry for the image (``RegionFields`` or
        ``PixelFields``), which decodes and collates it."""
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.image_fields = image_fields
        self._vocab: int | None = None  # len(tokenizer), the bound on stored token ids (computed once)

    def texts(self, captions: Sequence[str], *, truncate_ids: bool = False) -> dict[str, Tensor]:
        """Padded ``text_ids`` / ``text_attention`` of the captions. Texts are tokenized and truncated to
        ``max_text_len``; captions with stored ids are ``[CLS] ids [SEP]``, cut to ``max_text_len`` only
        with ``truncate_ids`` (training), else the batch grows to the longest (evaluation)."""
        captions = list(captions)
        if not any(getattr(c, "token_ids", None) is not None for c in captions):
            enc = self.tokenizer(
                captions,
                padding="longest",
                truncation=True,
                max_length=self.max_text_len,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            return {"text_ids": enc["input_ids"], "text_attention": enc["attention_mask"].bool()}
        return self._texts_with_ids(captions, truncate_ids)

    def _special_ids(self) -> tuple[int, int, int]:
        tok = self.tokenizer
        cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        if cls is None or sep is None or pad is None:
            raise ValueError("captions with token_ids need a tokenizer with [CLS], [SEP] and [PAD] tokens")
        return cls, sep, pad

    def _vocab_size(self) -> int:
        if self._vocab is None:
            self._vocab = len(self.tokenizer)
        return self._vocab

    def _texts_with_ids(self, captions: list, truncate_ids: bool) -> dict[str, Tensor]:
        """The tokenizer path's layout, built by hand: [CLS] ids [SEP], right-padded with [PAD]."""
        cls, sep, pad = self._special_ids()
        rows: list[list[int] | None] = [None] * len(captions)
        texts = [i for i, c in enumerate(captions) if getattr(c, "token_ids", None) is None]
        if texts:
            enc = self.tokenizer([str(captions[i]) for i in texts], truncation=True, max_length=self.max_text_len,
                                 return_token_type_ids=False, return_attention_mask=False)
            for i, ids in zip(texts, enc["input_ids"], strict=True):
                rows[i] = list(ids)
        vocab = self._vocab_size()
        for i, c in enumerate(captions):
            if rows[i] is not None:
                continue
            ids = list(c.token_ids)
            if ids and max(ids) >= vocab:
                raise ValueError(
                    f"caption {str(c)[:60]!r}: token id {max(ids)} is outside the tokenizer's {vocab} tokens;"
                    " the data set's token_ids come from another tokenizer (see its manifest's 'tokenizer')"
                )
            if truncate_ids:
                ids = ids[: max(0, self.max_text_len - 2)]
            rows[i] = [cls, *ids, sep]
        length = max(len(r) for r in rows if r is not None)
        out = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, r in enumerate(rows):
            assert r is not None
            span = slice(length - len(r), length) if left else slice(0, len(r))
            out[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = True
        return {"text_ids": out, "text_attention": mask}

    def word_pieces(self, captions: Sequence[str]) -> list[int]:
        """Word pieces of each caption without [CLS]/[SEP]: its stored ids, else the tokenizer's."""
        counts = [len(c.token_ids) if getattr(c, "token_ids", None) is not None else -1 for c in captions]
        texts = [i for i, n in enumerate(counts) if n < 0]
        if texts:
            enc = self.tokenizer([str(captions[i]) for i in texts], add_special_tokens=False,
                                 return_token_type_ids=False, return_attention_mask=False)
            for i, ids in zip(texts, enc["input_ids"], strict=True):
                counts[i] = len(ids)
        return counts

    def images(self, samples: Sequence[ImageSample]) -> dict[str, Tensor]:
        """The image tensors of the model: region tensors, or ``{"pixel_values": ...}``."""
        return self.image_fields.collate(samples)

    def pairs(self, items: Sequence[tuple[ImageSample, str]]) -> dict:
        """A training batch of matched pairs: text i belongs to image i."""
        samples = [s for s, _ in items]
        batch = {**self.texts([c for _, c in items], truncate_ids=True), **self.images(samples)}
        batch["keys"] = [s.key for s in samples]
        return batch
