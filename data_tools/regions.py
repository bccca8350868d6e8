"""Per-image region features from ``.npz`` files (bottom-up-attention / BUTD style).

One file per image, named after the image file's stem (``1000092795.npz`` for
``1000092795.jpg``; the converters also try the source's numeric id, e.g. the
COCO id). Accepted array names, the first present wins:

- features ``[n, D]``: ``features`` or ``x`` (``[D, n]`` is transposed when the
  box count tells which axis holds the regions);
- boxes ``[n, 4]`` as ``x1, y1, x2, y2`` pixels: ``boxes`` or ``bbox``;
- the size of the image the boxes refer to: ``image_w``/``image_h`` or ``w``/``h``
  (optional when the image itself is converted too; boxes are rescaled if it
  differs from the image's size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iais_scale.data.format import BOXES_DTYPE, validate_regions

FEATURE_NAMES = ("features", "x")
BOX_NAMES = ("boxes", "bbox")
WIDTH_NAMES = ("image_w", "w")
HEIGHT_NAMES = ("image_h", "h")


def _first(z: Any, names: tuple[str, ...], required: bool = True) -> np.ndarray | None:
    for name in names:
        if name in z.files:
            return z[name]
    if required:
        raise ValueError(f"no array named {' or '.join(repr(n) for n in names)} (has {sorted(z.files)})")
    return None


def _scalar(value: np.ndarray | None, name: str) -> int | None:
    if value is None:
        return None
    if value.size != 1 or not np.isfinite(value).all() or value.reshape(()) <= 0:
        raise ValueError(f"{name}: must be one positive number, got {value!r}")
    return int(round(float(value.reshape(()))))


def check_npz_size(path: str | Path, max_bytes: int) -> None:
    """Refuse an .npz whose members declare more than ``max_bytes`` in all, before expanding any:
    a few MB compressed can declare gigabytes."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        total = sum(i.file_size for i in zf.infolist())
    if total > max_bytes:
        raise ValueError(f"{path}: its arrays declare {total} bytes, over the limit of {max_bytes} (--max-array-mb)")


def load_regions(
    path: str | Path, image_size: tuple[int, int] | None, dtype: str = "keep", *, max_bytes: int = 512 << 20
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Return (features [n, D], boxes [n, 4] float32 pixels, (width, height)) checked against the format.

    ``image_size`` is the size of the image stored with the features (None for
    feature-only samples, which then need ``image_w``/``image_h`` in the file).
    Raises ValueError (NaN features, bad shapes, boxes outside the image, ...),
    or whatever numpy raises for an unreadable file.
    """
    check_npz_size(path, max_bytes)
    with np.load(path, allow_pickle=False) as z:
        feat = np.asarray(_first(z, FEATURE_NAMES))
        boxes = np.asarray(_first(z, BOX_NAMES))
        width = _scalar(_first(z, WIDTH_NAMES, required=False), "image_w")
        height = _scalar(_first(z, HEIGHT_NAMES, required=False), "image_h")
    if feat.ndim != 2 or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"features {list(feat.shape)} / boxes {list(boxes.shape)}: expected [n, D] and [n, 4]")
    if feat.shape[0] != boxes.shape[0] and feat.shape[1] == boxes.shape[0]:
        feat = feat.T  # stored as [D, n]
    if feat.dtype.kind != "f":
        raise ValueError(f"features: dtype must be floating point, got {feat.dtype}")
    if dtype != "keep":
        feat = feat.astype(dtype)
    elif feat.dtype.itemsize not in (2, 4):
        feat = feat.astype(np.float32)  # float64 and other widths
    feat = np.ascontiguousarray(feat)
    boxes = np.ascontiguousarray(boxes, dtype=BOXES_DTYPE)
    if image_size is None:
        if width is None or height is None:
            raise ValueError("no image_w/image_h in the file and no image to take the size from")
        image_size = (width, height)
    elif width is not None and height is not None and (width, height) != image_size:
        # Features extracted from a resized copy: bring the boxes into the stored image's pixels.
        scale = np.array([image_size[0] / width, image_size[1] / height] * 2, dtype=np.float64)
        boxes = (boxes * scale).astype(BOXES_DTYPE)
    validate_regions(feat, boxes, *image_size)
    return feat, boxes, image_size
