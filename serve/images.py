"""Microscopy images from ``data:`` URLs: base64 -> PNG / JPEG (PIL) or TIFF (tifffile) -> numpy.

The server never fetches a URL (no ``http(s)://``): images travel inside the request, so a request
can make the server read nothing but its own body. Sizes are checked from the file header before
any pixel is decoded, so a small file that claims a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re

import numpy as np

__all__ = ["ImageError", "decode_data_url"]

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.IGNORECASE
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_PIL_FORMATS = ("PNG", "JPEG")


class ImageError(ValueError):
    """An image that cannot be used; ``limit`` names the server limit it broke, if any."""

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        self.limit = limit
        super().__init__(message)


def decode_data_url(url: str, *, max_pixels: int) -> np.ndarray:
    """The image in a ``data:image/...;base64,...`` URL as an array: (H, W), (H, W, C) or TIFF axes as stored.

    max_pixels bounds height x width x slices (channels not counted). Raises ImageError.
    """
    match = _DATA_URL.match(url)
    if not match:
        kind = "an http(s) URL" if url.lower().startswith(("http://", "https://")) else "not a data URL"
        raise ImageError(
            f"is {kind}; send the image inline as data:image/png;base64,... (the server fetches nothing)"
        )
    if not match.group("b64"):
        raise ImageError("is a data URL without ';base64'; only base64-encoded images are accepted")
    try:
        raw = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"holds corrupt base64 ({error})") from None
    if not raw:
        raise ImageError("holds no image bytes")
    if raw.startswith(_TIFF_MAGIC):
        return _tiff(raw, max_pixels)
    return _pil(raw, max_pixels)


def _pil(raw: bytes, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw), formats=_PIL_FORMATS) as image:
            width, height = image.size  # from the header; nothing decoded yet
            _check_pixels(width * height, f"{width}x{height}", max_pixels)
            image.load()
            if image.mode in ("P", "PA", "RGBA", "CMYK"):  # alpha is not a measured channel
                image = image.convert("RGB")
            elif image.mode == "LA":
                image = image.convert("L")
            return np.asarray(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("is not a PNG, JPEG or TIFF image") from None
    except Image.DecompressionBombError as error:  # PIL's own guard fires first above ~179 M pixels
        raise ImageError(
            f"is over the limit max_image_pixels={max_pixels} ({error})", limit="max_image_pixels"
        ) from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for corrupt or truncated data
        raise ImageError(
            f"cannot be decoded as PNG, JPEG or TIFF ({type(error).__name__}: {error})"
        ) from None


def _tiff(raw: bytes, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tiff:
            series = tiff.series[0]
            # axes letters: C / S are channels and samples, everything else is space (Z, Y, X, ...)
            pixels = math.prod(n for axis, n in zip(series.axes, series.shape) if axis not in "CS")
            _check_pixels(pixels, "x".join(map(str, series.shape)) + f" ({series.axes})", max_pixels)
            return np.asarray(series.asarray())
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - tifffile raises many types for corrupt data
        raise ImageError(f"cannot be decoded as TIFF ({type(error).__name__}: {error})") from None


def _check_pixels(pixels: int, shape: str, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageError(
            f"is {shape}: {pixels} pixels, over the limit max_image_pixels={max_pixels}",
            limit="max_image_pixels",
        )
