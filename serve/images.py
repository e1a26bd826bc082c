"""Microscopy images from ``data:`` URLs: base64 -> PNG / JPEG (PIL) or TIFF (tifffile) -> numpy.

The server never fetches a URL (no ``http(s)://``): images travel inside the request, so a request
can make the server read nothing but its own body. Sizes are checked from the file header before
any pixel is decoded, so a small file that claims a huge image (a decompression bomb) costs nothing.

Two limits, both in the unit of the work they bound:

* voxels: the decoded array's size, every axis counted (height, width, channels, samples, slices,
  time ...): what decoding costs in memory;
* encoder passes: how many 2-D slices the image encoder runs its backbone on (slices x tiles; the
  image encoder does not tile, so one pass per z-slice). Every slice is resized to the encoder's
  input size, so a (100000, 3, 1, 1) stack of a few hundred bytes would be 100000 full passes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re

import numpy as np

__all__ = ["ImageError", "decode_data_url", "image_passes"]

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.IGNORECASE
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_PIL_FORMATS = ("PNG", "JPEG")


class ImageError(ValueError):
    """An image that cannot be used; ``limit`` names the server limit it broke, if any."""

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        """Name the problem and, if one was broken, the server limit."""
        self.limit = limit
        super().__init__(message)


def image_passes(shape: tuple[int, ...]) -> int:
    """Encoder passes of an image array.

    Encoder passes of an array of ``shape`` as the image featurizer reads it: a 4-D (Z, C, H, W)
    or (Z, H, W, C) stack is one pass per z-slice; a 2-D or 3-D image one pass.
    """
    return int(shape[0]) if len(shape) == 4 else 1


def decode_data_url(url: str, *, max_voxels: int, max_passes: int) -> np.ndarray:
    """The image in a ``data:image/...;base64,...`` URL as an array: (H, W), (H, W, C) or TIFF axes as stored.

    max_voxels bounds the decoded array's size (every axis counted), max_passes the encoder passes
    (``image_passes``); both are checked from the header, before decoding. Raises ImageError.
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
        return _tiff(raw, max_voxels, max_passes)
    return _pil(raw, max_voxels)


def _pil(raw: bytes, max_voxels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw), formats=_PIL_FORMATS) as image:
            width, height = image.size  # from the header; nothing decoded yet
            bands = len(image.getbands())
            _check_voxels(width * height * bands, f"{width}x{height}x{bands} (width x height x channels)", max_voxels)
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
            f"is over the limit max_image_voxels={max_voxels} ({error})", limit="max_image_voxels"
        ) from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for corrupt or truncated data
        raise ImageError(
            f"cannot be decoded as PNG, JPEG or TIFF ({type(error).__name__}: {error})"
        ) from None


def _tiff(raw: bytes, max_voxels: int, max_passes: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tiff:
            series = tiff.series[0]
            shape = tuple(int(n) for n in series.shape)
            described = "x".join(map(str, shape)) + f" ({series.axes})"
            _check_voxels(math.prod(shape), described, max_voxels)  # every axis, C and S included
            passes = image_passes(shape)
            if passes > max_passes:
                raise ImageError(
                    f"is {described}: {passes} z-slices, each one encoder pass, over the limit "
                    f"max_image_passes={max_passes}",
                    limit="max_image_passes",
                )
            return np.asarray(series.asarray())
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - tifffile raises many types for corrupt data
        raise ImageError(f"cannot be decoded as TIFF ({type(error).__name__}: {error})") from None


def _check_voxels(voxels: int, shape: str, max_voxels: int) -> None:
    if voxels > max_voxels:
        raise ImageError(
            f"is {shape}: {voxels} voxels, over the limit max_image_voxels={max_voxels}",
            limit="max_image_voxels",
        )
