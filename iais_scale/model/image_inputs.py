"""The image inputs a model reads, each defined once.

An ``ImageInput`` says what the samples of its models carry (region features and boxes, or an
encoded image), which tensors the collator hands the model, which modules embed them into image
tokens, and how its pixels are normalised. ``model.image_input`` in an experiment and
``image_input`` in a model's config.json name one of ``IMAGE_INPUTS``.

A new input is a subclass (its embedding module beside it, in ``embeddings.py`` or a module of its
own) plus its entry in ``IMAGE_INPUTS``; a module of its own also goes into ``hub.EXPORTED``, so that
exported folders carry it. The data side needs nothing new as long as the samples carry regions or
an image (``data/image_fields.py``).

This module needs only torch and transformers: it travels with exported models (``model/hub.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .backbone import VisionBackbone
from .configuration import BACKBONE_LIBRARIES
from .embeddings import PatchEmbeddings, RegionEmbeddings, RegionFeatureRegression


class ImageInput:
    """One kind of image input. Its methods take the model whose image side they build and run."""

    name: ClassVar[str]
    reads_pixels: ClassVar[bool]  # samples carry an encoded image; else region features and boxes
    model_normalises: ClassVar[bool] = False  # pixels arrive as uint8; the model applies its mean/std
    uses_backbone: ClassVar[bool] = False  # model.backbone names a vision tower (its config and weights)
    mrfr_head: ClassVar[bool] = False  # masked region feature regression can train it
    tensors: ClassVar[tuple[str, ...]]  # the forward's image keywords, as the collator names them

    @classmethod
    def check(cls, config) -> None:
        """Raise ValueError when the model config cannot hold this input."""

    @classmethod
    def build(cls, model: nn.Module, config) -> None:
        """Attach the image-side modules to ``model`` (their attribute names are the weight names)."""
        raise NotImplementedError

    @classmethod
    def after_init(cls, model: nn.Module, config) -> None:
        """Run after the model's weight initialisation (``post_init``)."""

    @classmethod
    def embed(cls, model: nn.Module, type_embedding: Tensor, **tensors: Tensor) -> tuple[Tensor, Tensor]:
        """Image tokens [P, Li, d] and their validity [P, Li] from the collated tensors."""
        raise NotImplementedError

    @classmethod
    def tokens_per_image(cls, model: nn.Module) -> int:
        """Image tokens of one image when fixed (throughput figures); 0 when each image has its own count."""
        return 0

    @classmethod
    def _require(cls, tensors: dict[str, Tensor]) -> list[Tensor]:
        missing = [k for k in cls.tensors if tensors.get(k) is None]
        if missing:
            raise ValueError(f"a {cls.name} model needs {', '.join(cls.tensors)}; missing {', '.join(missing)}")
        return [tensors[k] for k in cls.tensors]


def _all_valid(tokens: Tensor) -> Tensor:
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


class Regions(ImageInput):
    """UNITER's input: detector region features with their box geometry, padded per batch."""

    name = "regions"
    reads_pixels = False
    mrfr_head = True
    tensors = ("region_features", "region_geometry", "region_attention")

    @classmethod
    def build(cls, model, config):
        model.region_embeddings = RegionEmbeddings(config)
        model.mrfr = RegionFeatureRegression(config)

    @classmethod
    def embed(cls, model, type_embedding, **tensors):
        features, geometry, attention = cls._require(tensors)
        dtype = type_embedding.dtype
        return model.region_embeddings(features.to(dtype), geometry.to(dtype), type_embedding), attention.bool()


class Patches(ImageInput):
    """ViLT's input: the image's non-overlapping patches, no detector (``PatchEmbeddings``)."""

    name = "patches"
    reads_pixels = True
    tensors = ("pixel_values",)

    @classmethod
    def check(cls, config):
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")

    @classmethod
    def build(cls, model, config):
        model.patch_embeddings = PatchEmbeddings(config)

    @classmethod
    def embed(cls, model, type_embedding, **tensors):
        (pixels,) = cls._require(tensors)
        tokens = model.patch_embeddings(pixels, type_embedding)
        return tokens, _all_valid(tokens)

    @classmethod
    def tokens_per_image(cls, model):
        return (model.config.image_size // model.config.patch_size) ** 2


class Backbone(ImageInput):
    """A pretrained vision backbone's grid cells, entering like regions: their features and the
    geometry of their cells (``VisionBackbone``). Pixels arrive uint8; the backbone normalises."""

    name = "backbone"
    reads_pixels = True
    model_normalises = True
    uses_backbone = True
    tensors = ("pixel_values",)

    @classmethod
    def check(cls, config):
        library = (config.vision_backbone or {}).get("library")
        if library not in BACKBONE_LIBRARIES:
            raise ValueError(f"image_input 'backbone' needs vision_backbone with library in {BACKBONE_LIBRARIES},"
                             f" got {config.vision_backbone!r}")

    @classmethod
    def build(cls, model, config):
        model.image_backbone = VisionBackbone(config)
        model.region_embeddings = RegionEmbeddings(config)

    @classmethod
    def after_init(cls, model, config):
        model.image_backbone.set_trainable(config.backbone_trainable_blocks)  # post_init leaves requires_grad

    @classmethod
    def embed(cls, model, type_embedding, **tensors):
        (pixels,) = cls._require(tensors)
        features, geometry = model.image_backbone(pixels)
        dtype = type_embedding.dtype
        boxes = geometry.to(dtype).expand(features.shape[0], -1, -1)
        tokens = model.region_embeddings(features.to(dtype), boxes, type_embedding)
        return tokens, _all_valid(tokens)

    @classmethod
    def tokens_per_image(cls, model):
        return getattr(model.image_backbone, "tokens_per_image", 0)  # known once it has run


IMAGE_INPUTS: dict[str, type[ImageInput]] = {kind.name: kind for kind in (Regions, Patches, Backbone)}


def image_tensor_keys() -> tuple[str, ...]:
    """Every image tensor a registered input reads: what a batch's image part is made of."""
    return tuple(dict.fromkeys(k for kind in IMAGE_INPUTS.values() for k in kind.tensors))


def image_input_of(config) -> type[ImageInput]:
    """The ``ImageInput`` a model config (or an experiment's ``model`` section) names, checked."""
    kind = IMAGE_INPUTS.get(config.image_input)
    if kind is None:
        raise ValueError(f"image_input must be one of {tuple(IMAGE_INPUTS)}, got {config.image_input!r}")
    return kind
