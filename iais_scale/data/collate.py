"""Collation: captions -> padded token ids, regions -> padded features and box geometry.

Texts and images are padded separately (dynamic padding to the longest in the batch), so that a
caller can pair any text with any image by indexing: ``text_ids[i]`` with ``region_features[j]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .samples import ImageSample


def box_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes [n, 4] -> UNITER's 7-d ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image size."""
    x1, y1, x2, y2 = (boxes / np.array([width, height, width, height], np.float32)).clip(0, 1).T
    w, h = x2 - x1, y2 - y1
    return np.stack([x1, y1, x2, y2, w, h, w * h], -1).astype(np.float32)


class Collator:
    def __init__(self, tokenizer, max_text_len: int, max_regions: int):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.max_regions = max_regions

    def texts(self, captions: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"text_ids": enc["input_ids"], "text_attention": enc["attention_mask"].bool()}

    def images(self, samples: Sequence[ImageSample]) -> dict[str, Tensor]:
        n = max(s.features.shape[0] for s in samples)
        if n > self.max_regions:
            raise ValueError(f"an image has {n} regions, more than max_regions={self.max_regions}")
        dim = samples[0].features.shape[1]
        feats = np.zeros((len(samples), n, dim), np.float32)
        geom = np.zeros((len(samples), n, 7), np.float32)
        mask = np.zeros((len(samples), n), bool)
        for i, s in enumerate(samples):
            if s.features.shape[1] != dim:
                raise ValueError(f"{s.key}: feature dim {s.features.shape[1]}, expected {dim}")
            k = s.features.shape[0]
            feats[i, :k] = s.features
            geom[i, :k] = box_geometry(s.boxes, s.width, s.height)
            mask[i, :k] = True
        return {
            "region_features": torch.from_numpy(feats),
            "region_geometry": torch.from_numpy(geom),
            "region_attention": torch.from_numpy(mask),
        }

    def pairs(self, items: Sequence[tuple[ImageSample, str]]) -> dict:
        """A training batch of matched pairs: text i belongs to image i."""
        samples = [s for s, _ in items]
        batch = {**self.texts([c for _, c in items]), **self.images(samples)}
        batch["keys"] = [s.key for s in samples]
        return batch
