"""What a sample carries for its image, decoded from the shard and collated into model tensors.

Two carriers cover every model input (``model/image_inputs.py`` says which one a model reads):

* :class:`RegionFields`: detector region features ``feat.npy`` with their boxes (``boxes.npy``
  and/or ``geometry.npy``) -> ``region_features`` [P, n, D], ``region_geometry`` [P, n, 7] and
  ``region_attention`` [P, n], padded to the batch's largest image.
* :class:`PixelFields`: the encoded image (its header checked when decoded) -> ``pixel_values``
  [P, 3, S, S] through an ``ImageTransform`` (``transforms.py``): float32 normalised by the
  transform's mean and std, or uint8 when the model normalises itself (``normalise=False``).

A training draw's pixels are decoded (and augmented) by :meth:`PixelFields.prepare` where the
stream makes its batches; images that arrive undecoded (evaluation) take the deterministic
transform. A new carrier is a subclass with ``sample`` and ``collate``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import format as fmt
from .samples import BadSample, ImageSample, check_image, load_regions
from .transforms import BadImage, ImageTransform

_EMPTY_FEATURES = np.zeros((0, 0), np.float32)
_EMPTY_BOXES = np.zeros((0, 4), np.float32)


class ImageFields:
    """One carrier of the image: how ``samples.decode_sample`` fills a sample, and how a batch of
    samples becomes the model's image tensors."""

    needs = "the image members"  # what a sample must hold (error messages)

    def sample(self, raw: dict, key: str, meta: dict, image: bytes | None, captions: list[str]) -> ImageSample:
        """The sample of the raw members (BadSample when they lack what this carrier needs)."""
        raise NotImplementedError

    def prepare(self, sample: ImageSample) -> None:
        """Work done once per training draw, where the stream makes its batches (nothing by default)."""

    def collate(self, samples: Sequence[ImageSample]) -> dict[str, Tensor]:
        raise NotImplementedError


class RegionFields(ImageFields):
    """Region features and boxes. ``max_regions`` bounds an image's regions (None: no bound);
    ``feature_dim`` the features' width when known; ``keep_image`` keeps the encoded image too."""

    needs = "region features (feat.npy with boxes.npy or geometry.npy)"

    def __init__(self, max_regions: int | None = None, feature_dim: int | None = None, *, keep_image: bool = False):
        if max_regions is not None and max_regions < 1:
            raise ValueError(f"max_regions: at least 1 (or None: no bound), got {max_regions}")
        self.max_regions, self.feature_dim, self.keep_image = max_regions, feature_dim, keep_image

    def sample(self, raw, key, meta, image, captions):
        features, boxes, geometry = load_regions(raw, meta, feature_dim=self.feature_dim, max_regions=self.max_regions)
        return ImageSample(key=key, image_id=meta["image_id"], captions=captions, width=meta["width"],
                           height=meta["height"], features=features, boxes=boxes, meta=meta,
                           image=image if self.keep_image else None, geometry=geometry)

    def collate(self, samples):
        n = max(s.features.shape[0] for s in samples)
        if self.max_regions is not None and n > self.max_regions:
            raise ValueError(f"an image has {n} regions, more than max_regions={self.max_regions}")
        if n == 0:
            raise ValueError("no region features in these samples (decoded for pixels?)")
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


class PixelFields(ImageFields):
    """The encoded image, turned into pixels by ``transform`` (default: ``ImageTransform(384)``, the
    explicit ImageNet default). ``normalise=False`` hands the model uint8 pixels (a backbone
    normalises them with its own mean and std, so evaluation needs only the size)."""

    needs = "an encoded image (jpg, png or webp)"

    def __init__(self, transform: ImageTransform | None = None, *, normalise: bool = True):
        self.transform = transform or ImageTransform(384)
        self.normalise = normalise
        self._draws = 0  # training draws decoded by this process (seeds the augmentation with the key)

    def sample(self, raw, key, meta, image, captions):
        if image is None:
            raise BadSample("missing_image", key)
        width, height = check_image(image, key)
        return ImageSample(key=key, image_id=meta["image_id"], captions=captions, width=width, height=height,
                           features=_EMPTY_FEATURES, boxes=_EMPTY_BOXES, meta=meta, image=image)

    def prepare(self, sample):
        sample.pixels = self.draw(sample)

    def draw(self, sample: ImageSample) -> np.ndarray:
        """A training draw's ``[S, S, 3]`` uint8 pixels: augmented when the transform's ``augment``
        is enabled, else the evaluation pixels. Each draw is seeded by (transform seed, sample key,
        this process's draw count): reproducible for a given stream, different on every visit."""
        rng = None
        if self.transform.augment.enabled:
            self._draws += 1
            rng = np.random.default_rng([self.transform.seed, zlib.crc32(sample.key.encode()), self._draws])
        return self._pixels(sample, rng)

    def eval_pixels(self, sample: ImageSample) -> np.ndarray:
        """The sample's deterministic ``[S, S, 3]`` uint8 pixels (evaluation)."""
        return self._pixels(sample, None)

    def _pixels(self, sample: ImageSample, rng: np.random.Generator | None) -> np.ndarray:
        if sample.image is None:
            raise BadSample("missing_image", sample.key)
        try:
            return self.transform.pixels(sample.image, train=rng is not None, rng=rng, key=sample.key)
        except BadImage as e:
            raise BadSample("bad_image", str(e)) from None

    def collate(self, samples):
        """``pixel_values`` [P, 3, S, S] from ``sample.pixels`` when drawn, else the evaluation pixels."""
        arrays = [s.pixels if s.pixels is not None else self.eval_pixels(s) for s in samples]
        u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [P, 3, S, S] view of NHWC
        return {"pixel_values": self.transform.normalise(u8) if self.normalise else u8.contiguous()}


def box_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes [n, 4] -> UNITER's 7-d ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image size."""
    return fmt.normalised_geometry(boxes, width, height)


def sample_geometry(sample: ImageSample) -> np.ndarray:
    """The sample's ``[n, 7]`` geometry: ``geometry.npy`` as stored, else computed from its pixel boxes."""
    if sample.geometry is not None:
        return sample.geometry
    return box_geometry(sample.boxes, sample.width, sample.height)
