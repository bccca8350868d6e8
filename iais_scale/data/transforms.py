"""Image transforms of the pixel inputs (``patches`` and ``backbone`` models), with PIL and numpy only.

An :class:`ImageTransform` says how an encoded image becomes the model's ``[S, S, 3]`` uint8 pixels
and how those are normalised:

* **evaluation** (deterministic): the centre square of side ``min(w, h) * crop_pct`` is resized to
  ``S x S`` with ``resample`` (the same as "shorter side to ``S / crop_pct``, centre ``S x S``
  crop"). ``crop_pct`` 1 keeps the whole shorter side.
* **training** (``augment``, off by default): a random resized crop (area fraction in ``scale``,
  aspect ratio in ``ratio``, log-uniform), colour jitter (brightness, contrast and saturation
  factors drawn from ``[1 - j, 1 + j]``, in random order) and a horizontal flip (probability 0.5).
  The flip is off by default, and ``iais_scale.config`` refuses it for relation data: it swaps left
  and right, so a flipped "a circle left of a square" is false of its image.
* **normalisation**: ``(x / 255 - mean) / std`` per channel. A ``patches`` model gets the
  normalised float pixels from the collator; a ``backbone`` model gets the uint8 pixels and applies
  its backbone's mean and std itself (``model.backbone.VisionBackbone``), so that any collator of
  the right size feeds it correctly.

``ImageTransform.from_backbone`` takes size, interpolation, crop and mean/std from a vision
backbone's own data config (its model config's ``image_*`` fields, see ``model/backbone.py``); the
``patches`` model's transform is the explicit default: ImageNet mean and std, bicubic, whole
shorter side.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

# The patches model's normalisation (and the historical one of this package): ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# PIL's integer codes, as Hugging Face image processors store them ("resample": 3).
RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLE.items()}


class BadImage(ValueError):
    """An image that does not decode (the collator turns it into ``BadSample("bad_image")``)."""


@dataclass(frozen=True)
class Augment:
    """Training augmentation of pixel inputs (all off by default)."""

    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio (w / h) of the crop, log-uniform
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - j, 1 + j]; 0: off
    hflip: bool = False  # flip left-right with probability 0.5 (never for relation data)

    @property
    def enabled(self) -> bool:
        return self.random_resized_crop or self.color_jitter > 0 or self.hflip

    def problems(self, where: str = "augment") -> list[str]:
        p = []
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            p.append(f"{where}.scale: need 0 < min <= max <= 1 (got {list(self.scale)})")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            p.append(f"{where}.ratio: need 0 < min <= max (got {list(self.ratio)})")
        if not 0 <= self.color_jitter < 1:
            p.append(f"{where}.color_jitter: must lie in [0, 1) (got {self.color_jitter})")
        return p


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image -> ``[size, size, 3]`` uint8 (evaluation or training draw) -> normalised floats."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = "bicubic"
    crop_pct: float = 1.0  # evaluation: the centre crop keeps this fraction of the shorter side
    augment: Augment = field(default_factory=Augment)
    seed: int = 0  # of the augmentation draws (with the sample key and the draw count)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size: must be at least 1, got {self.size}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample: one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct: must lie in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"mean/std: three values each, std > 0 (got {self.mean}, {self.std})")
        problems = self.augment.problems()
        if problems:
            raise ValueError("; ".join(problems))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(cls, config, augment: Augment | None = None, seed: int = 0) -> ImageTransform:
        """The transform of a model config's image fields (``image_size``, ``image_mean``,
        ``image_std``, ``image_resample``, ``image_crop_pct``); defaults where one is absent."""
        return cls(
            size=int(config.image_size),
            mean=tuple(getattr(config, "image_mean", None) or IMAGENET_MEAN),
            std=tuple(getattr(config, "image_std", None) or IMAGENET_STD),
            resample=getattr(config, "image_resample", None) or "bicubic",
            crop_pct=float(getattr(config, "image_crop_pct", None) or 1.0),
            augment=augment or Augment(),
            seed=seed,
        )

    def with_augment(self, augment: Augment | None, seed: int | None = None) -> ImageTransform:
        return replace(self, augment=augment or Augment(), seed=self.seed if seed is None else seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = asdict(self.augment)
        return d

    # ------------------------------------------------------------------ geometry

    def eval_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centre crop (pixels ``x1, y1, x2, y2``) that evaluation resizes to ``size x size``."""
        side = min(width, height) * self.crop_pct
        x1, y1 = (width - side) / 2, (height - side) / 2
        return x1, y1, x1 + side, y1 + side

    def train_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """A random resized crop: area fraction in ``scale``, aspect ratio log-uniform in ``ratio``
        (10 tries, then the largest centre crop of an allowed ratio), else the evaluation crop."""
        a = self.augment
        if not a.random_resized_crop:
            return self.eval_box(width, height)
        area = width * height
        log_lo, log_hi = math.log(a.ratio[0]), math.log(a.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(a.scale[0], a.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x = int(rng.integers(0, width - w + 1))
                y = int(rng.integers(0, height - h + 1))
                return float(x), float(y), float(x + w), float(y + h)
        aspect = min(max(width / height, a.ratio[0]), a.ratio[1])
        w, h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
        w, h = min(w, width), min(h, height)
        return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2

    def draft_size(self, train: bool) -> int:
        """The smallest side a JPEG may be decoded at (``draft``) without losing output detail."""
        if train and self.augment.random_resized_crop:
            return math.ceil(self.size / math.sqrt(self.augment.scale[0]))
        return math.ceil(self.size / self.crop_pct)

    # ------------------------------------------------------------------ pixels

    def pixels(self, data: bytes, *, train: bool = False, rng: np.random.Generator | None = None,
               key: str = "?") -> np.ndarray:
        """Encoded image -> ``[size, size, 3]`` uint8 RGB (a training draw with ``train`` and an
        enabled ``augment``). Raises :class:`BadImage` when the image does not decode."""
        train = train and self.augment.enabled
        if train and rng is None:
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format in ("JPEG", "MPO"):
                    # Decode at 1/2, 1/4 or 1/8 scale (in the IDCT) while both sides stay large enough.
                    d = self.draft_size(train)
                    im.draft("RGB", (d, d))
                if im.mode == "P":
                    im = im.convert("RGBA")  # palette transparency first, or PIL warns
                im = im.convert("RGB") if im.mode != "RGB" else im
                w, h = im.size
                box = self.train_box(w, h, rng) if train else self.eval_box(w, h)
                out = im.resize((self.size, self.size), RESAMPLE[self.resample], box=box, reducing_gap=3.0)
                if train:
                    out = self._photometric(out, rng)
                return np.asarray(out)
        except Exception as e:  # PIL raises many types (OSError for truncated data, SyntaxError, ...)
            raise BadImage(f"{key}: {type(e).__name__}: {e}") from None

    def _photometric(self, im: Image.Image, rng: np.random.Generator) -> Image.Image:
        a = self.augment
        if a.hflip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if a.color_jitter > 0:
            lo, hi = max(0.0, 1 - a.color_jitter), 1 + a.color_jitter
            enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
            for i in rng.permutation(len(enhancers)):
                im = enhancers[int(i)](im).enhance(float(rng.uniform(lo, hi)))
        return im

    # ------------------------------------------------------------------ normalisation

    def normalise(self, u8: Tensor) -> Tensor:
        """``[P, 3, S, S]`` uint8 -> float32 ``(x / 255 - mean) / std``, computed as one multiply-add
        per channel (the patches collator's historical arithmetic, bit for bit)."""
        return normalise_u8(u8, self.mean, self.std)


def normalise_u8(u8: Tensor, mean, std) -> Tensor:
    """``[P, 3, S, S]`` uint8 -> float32 ``(x / 255 - mean) / std`` (as ``x * scale + shift``)."""
    std_t = torch.tensor(std, dtype=torch.float32, device=u8.device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = -torch.tensor(mean, dtype=torch.float32, device=u8.device).view(1, 3, 1, 1) / std_t
    out = torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
    out.copy_(u8)
    return out.mul_(scale).add_(shift)
