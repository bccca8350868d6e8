"""Collation: captions -> padded token ids; images -> padded region features and box geometry, or pixels.

Texts and images are padded separately (dynamic padding to the longest in the batch), so that a
caller can pair any text with any image by indexing: ``text_ids[i]`` with ``region_features[j]``.
A caption that carries the data set's word-piece ids (``samples.Caption``) is collated as
``[CLS] ids [SEP]`` instead of being tokenized. Training batches (``pairs``) truncate every caption
to ``max_text_len``; evaluation (``texts``) never cuts stored ids: the text length grows to the
longest such caption, as UNITER evaluates.

The image input follows the model's ``image_input``: ``"regions"`` gives ``region_features`` [P, n, D],
``region_geometry`` [P, n, 7] and ``region_attention`` [P, n]; ``"patches"`` and ``"backbone"`` give
``pixel_values`` [P, 3, S, S] decoded from the sample's encoded image by an ``ImageTransform``
(``data/transforms.py``): JPEG decoded at reduced scale (``draft``) when it is at least twice the
target, RGB, the centre square of the shorter side (times ``crop_pct``) resized to S. ``patches``
pixels are float32, normalised by the transform's mean and std (by default the explicit ImageNet
statistics, bicubic, the whole shorter side); ``backbone`` pixels stay uint8 and the model's vision
backbone normalises them with its own mean and std (so evaluation needs only the size).

Training augmentation (the transform's ``augment``: random resized crop, colour jitter, flip) is
applied where the training stream decodes its draws, :meth:`Collator.load_pixels`; images of
samples that arrive undecoded (evaluation: ``images``) always take the deterministic transform.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import format as fmt
from .samples import IMAGE_MODES, BadSample, ImageSample
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BadImage, ImageTransform

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODEL_IMAGE_INPUTS", "Collator", "box_geometry", "load_pixels",
           "sample_geometry"]

# What a model consumes -> what its samples must carry (samples.IMAGE_MODES): a backbone reads pixels.
MODEL_IMAGE_INPUTS = {"regions": "regions", "patches": "patches", "backbone": "patches"}


def box_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes [n, 4] -> UNITER's 7-d ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image size."""
    return fmt.normalised_geometry(boxes, width, height)


def sample_geometry(sample: ImageSample) -> np.ndarray:
    """The sample's ``[n, 7]`` geometry: ``geometry.npy`` as stored, else computed from its pixel boxes."""
    if sample.geometry is not None:
        return sample.geometry
    return box_geometry(sample.boxes, sample.width, sample.height)


def load_pixels(data: bytes, size: int, key: str = "?") -> np.ndarray:
    """Encoded image -> ``[size, size, 3]`` uint8 RGB: shorter side resized to ``size`` (bicubic),
    centre crop (the default transform's evaluation pixels).

    Raises ``BadSample("bad_image")`` when the image does not decode.
    """
    try:
        return ImageTransform(size).pixels(data, key=key)
    except BadImage as e:
        raise BadSample("bad_image", str(e)) from None


class Collator:
    def __init__(
        self,
        tokenizer,
        max_text_len: int,
        max_regions: int,
        *,
        image_input: str = "regions",
        image_size: int = 384,
        feature_dim: int | None = None,
        transform: ImageTransform | None = None,
    ):
        """``image_input`` is the model's (``regions``, ``patches`` or ``backbone``); ``transform``
        the pixel models' image transform (default: ``ImageTransform(image_size)``, the explicit
        ImageNet default; a backbone model's comes from ``ImageTransform.from_backbone(config)``).
        Afterwards ``image_input`` names what the samples carry (``regions`` or ``patches``, i.e.
        pixels, as ``samples.decode_sample`` takes it) and ``model_input`` the model's input."""
        if image_input not in MODEL_IMAGE_INPUTS:
            raise ValueError(f"image_input: one of {tuple(MODEL_IMAGE_INPUTS)}, got {image_input!r}")
        if transform is not None:
            image_size = transform.size
        if image_size < 1:
            raise ValueError(f"image_size: must be at least 1, got {image_size}")
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.model_input = image_input
        self.image_input = MODEL_IMAGE_INPUTS[image_input]
        assert self.image_input in IMAGE_MODES
        self.image_size = image_size
        self.feature_dim = feature_dim if image_input == "regions" else None  # checked at decode time
        self.transform = transform or ImageTransform(image_size)
        self._vocab: int | None = None  # len(tokenizer), the bound on stored token ids (computed once)
        self._draws = 0  # training draws decoded by this process (seeds the augmentation with the key)

    @property
    def needs_pixels(self) -> bool:
        """Whether ``images`` decodes the encoded image (``patches``/``backbone``) rather than using regions."""
        return self.image_input == "patches"

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

    def load_pixels(self, sample: ImageSample) -> np.ndarray:
        """A training draw's image as ``[S, S, 3]`` uint8 (BadSample ``missing_image`` / ``bad_image``):
        augmented when the transform has ``augment`` enabled, else the evaluation pixels. Each draw
        is seeded by (transform seed, sample key, this process's draw count): reproducible for a
        given stream, different on every visit of a sample."""
        if sample.image is None:
            raise BadSample("missing_image", sample.key)
        rng = None
        if self.transform.augment.enabled:
            self._draws += 1
            rng = np.random.default_rng([self.transform.seed, zlib.crc32(sample.key.encode()), self._draws])
        try:
            return self.transform.pixels(sample.image, train=rng is not None, rng=rng, key=sample.key)
        except BadImage as e:
            raise BadSample("bad_image", str(e)) from None

    def eval_pixels(self, sample: ImageSample) -> np.ndarray:
        """The sample's deterministic ``[S, S, 3]`` uint8 pixels (evaluation)."""
        if sample.image is None:
            raise BadSample("missing_image", sample.key)
        try:
            return self.transform.pixels(sample.image, key=sample.key)
        except BadImage as e:
            raise BadSample("bad_image", str(e)) from None

    def pixel_values(self, samples: Sequence[ImageSample]) -> Tensor:
        """[P, 3, S, S]: float32 normalised by the transform (``patches``), or uint8 (``backbone``:
        the model normalises). Uses ``sample.pixels`` when already decoded (a training draw), else
        the deterministic evaluation pixels."""
        arrays = [s.pixels if s.pixels is not None else self.eval_pixels(s) for s in samples]
        u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [P, 3, S, S] view of NHWC
        if self.model_input == "backbone":
            return u8.contiguous()
        return self.transform.normalise(u8)

    def regions(self, samples: Sequence[ImageSample]) -> dict[str, Tensor]:
        n = max(s.features.shape[0] for s in samples)
        if n > self.max_regions:
            raise ValueError(f"an image has {n} regions, more than max_regions={self.max_regions}")
        if n == 0:
            raise ValueError("no region features in these samples (decoded for image_input='patches'?)")
        dim = samples[0].features.shape[1]
        feats = np.zeros((len(samples), n, dim), np.float32)
        geom = np.zeros((len(samples), n, 7), np.float32)
        mask = np.zeros((len(samples), n), bool)
        for i, s in enumerate(samples):
            if s.features.shape[1] != dim:
                raise ValueError(f"{s.key}: feature dim {s.features.shape[1]}, expected {dim}")
            k = s.features.shape[0]
            feats[i, :k] = s.features
            geom[i, :k] = sample_geometry(s)
            mask[i, :k] = True
        return {
            "region_features": torch.from_numpy(feats),
            "region_geometry": torch.from_numpy(geom),
            "region_attention": torch.from_numpy(mask),
        }

    def images(self, samples: Sequence[ImageSample]) -> dict[str, Tensor]:
        """The image inputs of the model: region tensors, or ``{"pixel_values": ...}`` for pixel models."""
        if self.needs_pixels:
            return {"pixel_values": self.pixel_values(samples)}
        return self.regions(samples)

    def pairs(self, items: Sequence[tuple[ImageSample, str]]) -> dict:
        """A training batch of matched pairs: text i belongs to image i."""
        samples = [s for s, _ in items]
        batch = {**self.texts([c for _, c in items], truncate_ids=True), **self.images(samples)}
        batch["keys"] = [s.key for s in samples]
        return batch
