"""Image checks and hashes of the curate stage: pure functions over PIL and numpy.

- `image_problem`: None, or the reason an image is dropped: `image_decode` (not decodable), `image_size`
  (smallest side below minSide), `aspect_ratio` (long side / short side above maxAspectRatio).
- `pixel_hash`: sha256 of the decoded RGB pixels and the size: equal for the same picture stored in
  two files or encodings (exact dedup).
- `phash` / `dhash`: 64-bit perceptual hashes (DCT-based, as the `imagehash` library's `phash`; and the
  gradient hash) as ints, so near duplicates (resized, re-encoded, slightly changed) differ in few bits.
- `thumbnail`: the image area-averaged to THUMB_SIDE x THUMB_SIDE RGB (every image on one grid), the
  near-duplicate filter's second signal (`groups.aligned_similarity`).
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache

import numpy as np
from PIL import Image
from vlm_core.spec import ImageFilterSpec

IMAGE_REASONS = ("image_decode", "image_size", "aspect_ratio")
THUMB_SIDE = 24  # pixels per side of the thumbnail that confirms near-duplicate candidates (aligned, groups.py)


def decode(data: bytes | None) -> Image.Image | None:
    """The image as RGB, or None if the bytes do not decode (missing, truncated, not an image)."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def image_problem(image: Image.Image | None, spec: ImageFilterSpec) -> str | None:
    """None if the image passes, else one of IMAGE_REASONS."""
    if image is None:
        return "image_decode"
    w, h = image.size
    if min(w, h) < spec.min_side:
        return "image_size"
    if max(w, h) / min(w, h) > spec.max_aspect_ratio:
        return "aspect_ratio"
    return None


def pixel_hash(image: Image.Image) -> str:
    """sha256 (hex) of the RGB pixels and the size."""
    h = hashlib.sha256(f"{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


def _bits_to_int(bits: np.ndarray) -> int:
    out = 0
    for b in bits.reshape(-1):
        out = (out << 1) | int(b)
    return out


def phash(image: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """DCT perceptual hash: grey, resized to 32x32, 2-D DCT, the 8x8 lowest frequencies vs their median."""
    n = hash_size * highfreq_factor
    pixels = np.asarray(image.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(n)
    low = (d @ pixels @ d.T)[:hash_size, :hash_size]
    return _bits_to_int(low > np.median(low))


def dhash(image: Image.Image, hash_size: int = 8) -> int:
    """Gradient hash: grey, resized to 9x8, each pixel brighter than its right neighbour or not."""
    pixels = np.asarray(image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.int16)
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bits in which each 64-bit hash of `a` (uint64 array) differs from `b`."""
    return np.bitwise_count(a ^ np.uint64(b))


def thumbnail(image: Image.Image, side: int = THUMB_SIDE) -> np.ndarray:
    """The image area-averaged (box filter) to `side` x `side` RGB: uint8 [side, side, 3]. Every image lands
    on the same grid whatever its size, so a resized or re-encoded copy gives nearly the same thumbnail."""
    return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.uint8)
