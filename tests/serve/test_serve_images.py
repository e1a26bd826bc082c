"""Images from data URLs (``kiban.serve.images``): formats, channel handling, and limits checked from
the header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from kiban.serve.images import ImageError, decode_data_url


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def test_png_modes_become_measured_channels():
    rgba = Image.fromarray(np.full((8, 6, 4), 200, dtype=np.uint8), mode="RGBA")
    assert decode_data_url(_url(_png(rgba)), max_voxels=1000, max_passes=1).shape == (8, 6, 3)  # alpha dropped
    gray = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(8, 6))
    np.testing.assert_array_equal(decode_data_url(_url(_png(gray)), max_voxels=1000, max_passes=1), np.asarray(gray))
    palette = gray.convert("P")
    assert decode_data_url(_url(_png(palette)), max_voxels=1000, max_passes=1).shape == (8, 6, 3)


def test_tiff_stacks_keep_their_axes_and_count_every_axis_and_every_pass():
    import tifffile

    stack = np.random.default_rng(0).random((3, 2, 16, 16), dtype=np.float32)  # Z, C, Y, X
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack, metadata={"axes": "ZCYX"})
    url = _url(buffer.getvalue(), "image/tiff")
    np.testing.assert_array_equal(decode_data_url(url, max_voxels=3 * 2 * 16 * 16, max_passes=3), stack)
    with pytest.raises(ImageError, match="1536 voxels, over the limit max_image_voxels=1535") as error:
        decode_data_url(url, max_voxels=3 * 2 * 16 * 16 - 1, max_passes=3)  # channels count too
    assert error.value.limit == "max_image_voxels"
    with pytest.raises(ImageError, match="3 z-slices, each one encoder pass, over the limit max_image_passes=2"):
        decode_data_url(url, max_voxels=10**6, max_passes=2)


def test_a_deep_stack_of_tiny_slices_is_refused_by_its_passes_before_decoding():
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((100_000, 3, 2, 2), dtype=np.uint8), compression="zlib")
    url = _url(buffer.getvalue(), "image/tiff")
    with pytest.raises(ImageError, match="100000 z-slices") as error:
        decode_data_url(url, max_voxels=10**7, max_passes=16)
    assert error.value.limit == "max_image_passes"


def test_a_huge_image_claimed_by_a_tiny_file_is_refused_before_decoding():
    raw = bytearray(_png(Image.new("L", (4, 4))))
    # rewrite the header to claim 100000 x 100000 pixels (and fix its checksum)
    header = struct.pack(">II", 100_000, 100_000) + raw[24:29]
    raw[16:29] = header
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    started = time.perf_counter()
    for limit in (4096 * 4096, 10**9):  # under PIL's own bomb guard, and over it
        with pytest.raises(ImageError, match=f"max_image_voxels={limit}") as error:
            decode_data_url(_url(bytes(raw)), max_voxels=limit, max_passes=1)
        assert error.value.limit == "max_image_voxels" and "10000000000" in str(error.value)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.org/cells.png", r"an http\(s\) URL"),
        ("file:///etc/passwd", "not a data URL"),
        ("data:image/png,rawbytes", "without ';base64'"),
        ("data:image/png;base64,", "no image bytes"),
        ("data:image/png;base64,@@@@", "corrupt base64"),
        (_url(b"GIF89a" + b"\x00" * 32, "image/gif"), "not a PNG, JPEG or TIFF"),
        (_url(b"II*\x00" + b"\x00" * 32, "image/tiff"), "cannot be decoded as TIFF"),
        (_url(_png(Image.new("L", (4, 4)))[:40]), "not a PNG"),
        (
            _url(_png(Image.fromarray(np.arange(900, dtype=np.uint16).reshape(30, 30)))[:-40]),
            "cannot be decoded",
        ),
    ],
)
def test_unusable_urls_say_why(url, message):
    with pytest.raises(ImageError, match=message):
        decode_data_url(url, max_voxels=1000, max_passes=1)
