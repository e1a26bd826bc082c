"""Microscopy image readers: TIFF / OME-TIFF (tifffile), PNG / JPEG (Pillow), single files or folders.

Every image comes out as one array in the canonical layout ``(Z, C, H, W)``, the layout the image
featurizer reads without guessing. TIFF axes come from the file's own metadata (OME-XML, ImageJ
or tifffile's inference): ``Y``/``X`` are the plane; ``C`` or ``S`` (samples, e.g. RGB) the
channels; ``Z``, or the unnamed plane axes ``I``/``Q``, the z-stack; each time point ``T`` becomes
its own record (``id[t=3]``), and so does each image series of a multi-series file
(``id[series 1]``). Other axes of length one are dropped; longer ones are a reject, as are files
that cannot be decoded (a corrupt TIFF, a truncated JPEG) and non-finite pixels.

PNG/JPEG go through ``kiban.encoders.image.read_image`` (palette to RGB, alpha dropped). A folder
is read recursively, files in sorted order, ids are paths relative to the folder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kiban.data.readers import collector, register_reader
from kiban.data.rejects import Record, Rejects

__all__ = ["IMAGE_SUFFIXES", "image_stacks", "read_images"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".png", ".jpg", ".jpeg")
_Z_AXES = "ZIQ"
_C_AXES = "CS"


class ImageProblem(ValueError):
    """An image that can be decoded but not laid out as (Z, C, H, W); the message says why."""


def image_stacks(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(suffix for the id, array (Z, C, H, W)) for each series and time point of one image file.

    Raises what the decoder raises for unreadable files, ``ImageProblem`` for unusable layouts.
    """
    path = Path(path)
    if path.name.lower().endswith((".tif", ".tiff")):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = list(tif.series)
            for number, one in enumerate(series):
                label = f"[series {number}]" if len(series) > 1 else ""
                for time, stack in _canonical(one.asarray(), one.axes):
                    yield label + time, stack
        return
    from kiban.encoders.image import read_image

    array = read_image(path)
    axes = "YX" if array.ndim == 2 else "YXS" if array.ndim == 3 else ""
    if not axes:
        raise ImageProblem(
            f"a decoded {path.suffix} image of shape {array.shape} is neither (H, W) nor (H, W, C)"
        )
    yield from _canonical(array, axes)


def _canonical(array: np.ndarray, axes: str) -> Iterator[tuple[str, np.ndarray]]:
    """Reorder ``array`` with tifffile ``axes`` into (Z, C, H, W), one per time point."""
    axes = axes.upper()
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise ImageProblem(f"axes {axes!r} do not describe an image of shape {array.shape}")
    keep = []
    for i, axis in enumerate(axes):
        if axis in "YXT" + _Z_AXES + _C_AXES or array.shape[i] != 1:
            keep.append(i)
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    unknown = [a for a in axes if a not in "YXT" + _Z_AXES + _C_AXES]
    z_axes = [a for a in axes if a in _Z_AXES]
    c_axes = [a for a in axes if a in _C_AXES]
    if unknown or len(z_axes) > 1 or len(c_axes) > 1:
        raise ImageProblem(
            f"cannot lay out axes {axes!r} (shape {array.shape}) as z-stack, channels, height, width: "
            + (f"unsupported axes {', '.join(unknown)}" if unknown else "more than one z or channel axis")
        )
    order = [axes.index(a) for a in ("T", *z_axes, *c_axes, "Y", "X") if a in axes]
    array = array.transpose(order)
    if "T" not in axes:
        array = array[None]
    if not z_axes:
        array = array[:, None]
    if not c_axes:
        array = array[:, :, None]
    for time in range(array.shape[0]):
        yield (f"[t={time}]" if array.shape[0] > 1 else ""), array[time]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return [path]


@register_reader(
    "image",
    suffixes=IMAGE_SUFFIXES,
    description="microscopy images: TIFF/OME-TIFF (z-stacks, channels, time), PNG, JPEG; a file or a folder",
    directories=True,
)
def read_images(path: str | Path, *, rejects: Rejects | None = None) -> Iterator[Record]:
    """Records of one image file or of every image in a folder; items are (Z, C, H, W) arrays."""
    path, rejects = Path(path), collector(rejects)
    root = path if path.is_dir() else path.parent
    layouts: Counter[str] = Counter()
    for file in _files(path):
        name = file.relative_to(root).as_posix()
        try:
            stacks = list(image_stacks(file))
        except ImageProblem as error:
            rejects.reject(id=name, location=str(file), reason="unsupported image layout", detail=str(error))
            continue
        except Exception as error:  # decoders raise many types (TiffFileError, OSError, struct.error, ...)
            rejects.reject(
                id=name,
                location=str(file),
                reason="unreadable image",
                detail=f"cannot be decoded ({type(error).__name__}: {error})",
            )
            continue
        for suffix, stack in stacks:
            record_id = name + suffix
            problem = _problem(stack)
            if problem:
                rejects.reject(
                    id=record_id, location=str(file) + suffix, reason="invalid pixels", detail=problem
                )
                continue
            layouts[f"Z={stack.shape[0]} C={stack.shape[1]}"] += 1
            rejects.accept()
            yield Record(record_id, "image", stack, str(file) + suffix)
        rejects.note("layouts", dict(layouts))


def _problem(stack: np.ndarray) -> str:
    if stack.size == 0:
        return f"the image is empty (shape {stack.shape})"
    if not (np.issubdtype(stack.dtype, np.number) or stack.dtype == bool):
        return f"pixel values must be numbers, got dtype {stack.dtype}"
    if np.issubdtype(stack.dtype, np.floating) and not np.isfinite(stack).all():
        return f"{int((~np.isfinite(stack)).sum())} pixel value(s) are NaN or infinite"
    return ""
