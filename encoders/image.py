"""The microscopy image encoder: any timm backbone, any channel count, 2-D images and z-stacks.

The featurizer turns one image (array, tensor or file path) into a float tensor [Z, C, S, S]:
channels resolved against ``in_chans``, every z-slice resized to ``img_size`` and each channel
normalised over the whole image. The encoder runs a timm backbone (``timm.create_model(name,
in_chans=C)``; timm adapts a pretrained RGB stem to C channels) on every real z-slice and returns its
spatial tokens: a ViT's patch tokens, or a CNN's final feature map flattened to h*w tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kiban.encoders.base import (
    Encoder,
    InvalidInput,
    ModalityTokens,
    pad_stack,
    register_encoder,
    register_preset,
)

__all__ = ["ImageEncoder", "ImageEncoderConfig", "ImageFeaturizer", "read_image"]

logger = logging.getLogger(__name__)

MODALITY = "image"
_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class ImageEncoderConfig:
    """Settings of the image encoder; plain values, so it round-trips through YAML.

    model_name: a timm model name (``timm.list_models()``), ViT or CNN.
    in_chans: channels per image (1 for grayscale, 3 for RGB, 5 for Cell Painting, ...).
    img_size: every z-slice is resized to img_size x img_size pixels (bilinear).
    model_kwargs: extra keyword arguments of ``timm.create_model``, as (name, value) pairs, e.g.
        (("depth", 2), ("embed_dim", 32)) for a small ViT.
    weights_path: a local timm weights file (.safetensors, or .pth/.pt read with weights_only); a
        3-channel checkpoint is adapted to ``in_chans`` by timm, a classifier head is dropped. Or a
        kiban encoder folder (config.json + model.safetensors, as ``kiban pretrain image`` writes
        it), loaded as it is: same model, same channels.
    z_mode: "tokens" encodes each z-slice and concatenates their tokens (N = Z * patches);
        "mean" averages the tokens of the slices (N = patches).
    normalize: "percentile" rescales each channel so its percentiles[0]..percentiles[1] map to 0..1
        (clipped), robust to hot pixels; "zscore" gives each channel zero mean and unit variance.
    """

    model_name: str = "vit_small_patch16_224"
    in_chans: int = 3
    img_size: int = 224
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    weights_path: str | None = None
    z_mode: str = "tokens"
    normalize: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self) -> None:
        """Normalise list values from YAML/JSON to tuples."""
        # YAML/JSON give lists; keep tuples so configs compare equal after a round trip
        self.model_kwargs = tuple((str(key), value) for key, value in self.model_kwargs)
        self.percentiles = tuple(self.percentiles)


# ----------------------------------------------------------------------------------------------
# Featurizer


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file: TIFF with tifffile (axes as stored), PNG/JPEG/... with PIL.

    PIL palette images become RGB and an alpha channel is dropped (RGBA -> RGB, LA -> L), since
    alpha is not a measured channel. Raises FileNotFoundError / OSError when unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("P", "PA", "RGBA", "CMYK"):
            image = image.convert("RGB")
        elif image.mode == "LA":
            image = image.convert("L")
        return np.asarray(image)


class ImageFeaturizer:
    """One image -> ``pixels`` [Z, C, S, S] float32; ``collate`` pads over Z with a ``slice_mask``.

    Accepted shapes, with C = ``in_chans``:
      (H, W)                    one channel (needs in_chans = 1)
      (C, H, W) or (H, W, C)    channel-first if the first axis has C entries, else channel-last if the
                                last one has; when both do (e.g. a 3x100x3 array) channel-first wins
      (Z, C, H, W) or (Z, H, W, C)  a z-stack, channels resolved the same way on the last three axes
    A single-channel z-stack must be passed as (Z, 1, H, W): a 3-D array is always one image.

    Each slice is resized to S x S (bilinear, antialiased; aspect ratio not kept), then each channel
    is normalised with statistics over all its slices and pixels, so slices of one stack stay
    comparable. Natural-image (ImageNet) mean/std are deliberately not used: microscopy channels are
    stains, not colours.
    """

    modality = MODALITY

    def __init__(
        self,
        *,
        in_chans: int,
        img_size: int,
        normalize: str = "percentile",
        percentiles: Sequence[float] = (1.0, 99.0),
    ) -> None:
        """Check and keep the normalisation settings."""
        if in_chans < 1:
            raise ValueError(f"in_chans must be at least 1, got {in_chans}")
        if normalize not in ("percentile", "zscore"):
            raise ValueError(f"normalize must be 'percentile' or 'zscore', got {normalize!r}")
        low, high = percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {tuple(percentiles)}")
        self.in_chans = in_chans
        self.img_size = img_size
        self.normalize = normalize
        self.percentiles = (float(low), float(high))

    @classmethod
    def from_config(cls, config: ImageEncoderConfig) -> ImageFeaturizer:
        """The featurizer of an ``ImageEncoderConfig``."""
        return cls(
            in_chans=config.in_chans,
            img_size=config.img_size,
            normalize=config.normalize,
            percentiles=config.percentiles,
        )

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """Features of one image; raises InvalidInput naming ``item_id`` (or describing the item)."""
        name = item_id if item_id is not None else _describe_image(item)
        stack = self._to_zchw(self._to_array(item, name), name)
        pixels = torch.from_numpy(stack)
        size = (self.img_size, self.img_size)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return {"pixels": self._normalized(pixels)}

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pixels [B, Z, C, S, S] (Z = the most slices of any item) and slice_mask [B, Z]."""
        pixels, slice_mask = pad_stack([f["pixels"] for f in features])
        return {"pixels": pixels, "slice_mask": slice_mask}

    def _to_array(self, item: Any, name: Any) -> np.ndarray:
        if isinstance(item, (str, Path)):
            try:
                item = read_image(item)
            except FileNotFoundError:
                raise InvalidInput(MODALITY, name, "file not found") from None
            except Exception as error:  # PIL/tifffile raise many types for a corrupt or foreign file
                raise InvalidInput(
                    MODALITY, name, f"cannot be read as an image ({type(error).__name__}: {error})"
                ) from None
        if isinstance(item, Tensor):
            item = item.detach().cpu()
            item = (item.float() if item.is_floating_point() else item).numpy()  # numpy has no bfloat16
        if not isinstance(item, np.ndarray):
            raise InvalidInput(
                MODALITY,
                name,
                f"expected a numpy array, a torch tensor or an image file path, got {type(item).__name__}",
            )
        if item.dtype == bool:
            item = item.astype(np.float32)
        if not (np.issubdtype(item.dtype, np.integer) or np.issubdtype(item.dtype, np.floating)):
            raise InvalidInput(MODALITY, name, f"pixel values must be numbers, got dtype {item.dtype}")
        return item

    def _to_zchw(self, array: np.ndarray, name: Any) -> np.ndarray:
        shape, c = tuple(array.shape), self.in_chans
        if array.ndim not in (2, 3, 4):
            raise InvalidInput(
                MODALITY,
                name,
                f"has {array.ndim} dimension(s) (shape {shape}); "
                "expected (H, W), (C, H, W), (H, W, C) or (Z, C, H, W)",
            )
        if array.size == 0:
            raise InvalidInput(MODALITY, name, f"is empty (shape {shape})")
        if array.ndim == 2:
            if c != 1:
                raise InvalidInput(
                    MODALITY,
                    name,
                    f"is a 2-D (H, W) image of one channel (shape {shape}), but in_chans is {c}",
                )
            array = array[None, None]
        else:
            if array.ndim == 3:
                array = array[None]
            if array.shape[1] == c:
                pass  # (Z, C, H, W)
            elif array.shape[3] == c:
                array = array.transpose(0, 3, 1, 2)  # (Z, H, W, C)
            else:
                raise InvalidInput(
                    MODALITY,
                    name,
                    f"shape {shape} has no axis of {c} channels (in_chans) where channels can be: "
                    "first or last of (C, H, W) / (H, W, C), after Z for (Z, C, H, W)",
                )
        stack = np.ascontiguousarray(array, dtype=np.float32)
        bad = ~np.isfinite(stack)
        if bad.any():
            raise InvalidInput(MODALITY, name, f"has {int(bad.sum())} non-finite pixel value(s) (NaN or inf)")
        return stack

    def _normalized(self, pixels: Tensor) -> Tensor:
        """Per-channel normalisation over all slices and pixels of [Z, C, S, S].

        A channel whose spread is float noise (a constant image after resizing) becomes all zeros
        rather than amplified noise.
        """
        per_channel = pixels.transpose(0, 1).reshape(pixels.shape[1], -1).numpy().astype(np.float64)
        if self.normalize == "percentile":
            # numpy, not torch.quantile: the latter refuses inputs above 16M values (deep z-stacks)
            center, top = np.percentile(per_channel, self.percentiles, axis=1)
            spread = top - center
        else:
            center, spread = per_channel.mean(axis=1), per_channel.std(axis=1)
        flat = spread <= 1e-6 * np.maximum(np.abs(center), np.abs(center + spread))
        out = (pixels - _as_channels(center)) / _as_channels(np.where(flat, 1.0, spread))
        if self.normalize == "percentile":
            out = out.clamp(0.0, 1.0)
        out[:, torch.from_numpy(flat)] = 0.0
        return out


def _as_channels(values: np.ndarray) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def _describe_image(item: Any) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    shape = getattr(item, "shape", None)
    if shape is not None:
        return f"{type(item).__name__} of shape {tuple(shape)}"
    return f"{type(item).__name__} item"


# ----------------------------------------------------------------------------------------------
# Encoder


def _examples() -> list[Any]:
    """Three valid RGB items of different sizes and layouts: (H, W, C) uint8, (C, H, W) float, a z-stack."""
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8),
        rng.random((3, 40, 40), dtype=np.float32),
        rng.random((2, 3, 32, 32), dtype=np.float32),
    ]


@register_encoder(MODALITY, config=ImageEncoderConfig, examples=_examples, default_preset="vit_small")
class ImageEncoder(Encoder):
    """A timm backbone over every z-slice of a batch of images; spatial tokens out.

    Input (from ``ImageFeaturizer.collate``): pixels [B, Z, C, S, S], slice_mask [B, Z]. Output
    ModalityTokens: B images; N = Z * P tokens in z_mode "tokens" (slice-major: all P tokens of slice
    0, then slice 1, ...) or N = P in z_mode "mean"; D = the backbone's ``num_features``. P is the
    number of spatial positions of one slice: a ViT's patch tokens (its CLS/register "prefix" tokens
    are dropped, so every token is a place in the image, as for CNNs) or the h*w cells of a CNN's
    last feature map. Tokens of padded slices are masked False and zero.

    Follows timm (Wightman, github.com/huggingface/pytorch-image-models): ViT (Dosovitskiy et al.
    2021) by default; channel-adapted stems as used for multi-channel microscopy, e.g. Cell
    Painting ViTs (Kraus et al. 2024, "Masked autoencoders for microscopy are scalable learners").
    """

    modality = MODALITY

    def __init__(self, config: ImageEncoderConfig) -> None:
        """Build the timm backbone of ``config`` (loading ``weights_path`` when set) and its featurizer."""
        super().__init__()
        if config.z_mode not in ("tokens", "mean"):
            raise ValueError(f"z_mode must be 'tokens' or 'mean', got {config.z_mode!r}")
        self.config = config
        self.featurizer = ImageFeaturizer.from_config(config)
        self.backbone = _create_backbone(config)
        self.output_dim = int(self.backbone.num_features)

    def portable_config(self) -> ImageEncoderConfig:
        """The config without the weights path: the saved model carries the weights."""
        return dataclasses.replace(self.config, weights_path=None)

    def forward(self, *, pixels: Tensor, slice_mask: Tensor) -> ModalityTokens:
        """Tokens [B, N, D] of a collated batch (see the class docstring for N)."""
        batch, depth = slice_mask.shape
        # Only real slices go through the backbone: cheaper, and BatchNorm never sees padding.
        tokens = self.slice_tokens(pixels[slice_mask])  # [real slices, P, D]
        n_tokens, width = tokens.shape[1:]
        per_slice = tokens.new_zeros(batch, depth, n_tokens, width)
        per_slice[slice_mask] = tokens
        if self.config.z_mode == "mean":
            weights = slice_mask.to(tokens.dtype)[:, :, None, None]
            embeddings = (per_slice * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            mask = slice_mask.any(1, keepdim=True).expand(batch, n_tokens)
        else:
            embeddings = per_slice.reshape(batch, depth * n_tokens, width)
            mask = slice_mask.repeat_interleave(n_tokens, dim=1)
        return ModalityTokens(embeddings=embeddings, mask=mask)

    def slice_tokens(self, images: Tensor) -> Tensor:
        """Spatial tokens [M, P, D] of M single images [M, C, S, S]."""
        features = self.backbone.forward_features(images)
        if features.dim() == 3:  # ViT-like: [M, prefix + P, D]
            # timm ViTs say how many CLS/register tokens lead; other token models have none
            return features[:, getattr(self.backbone, "num_prefix_tokens", 0) :]
        if features.dim() == 4:
            if features.shape[1] == self.output_dim:  # CNN, NCHW
                return features.flatten(2).transpose(1, 2)
            if features.shape[-1] == self.output_dim:  # NHWC backbones (e.g. Swin)
                return features.flatten(1, 2)
        raise RuntimeError(
            f"timm model {self.config.model_name!r} returned features of shape {tuple(features.shape)}; "
            f"expected [M, N, {self.output_dim}] or a [M, {self.output_dim}, h, w] feature map"
        )


def _create_backbone(config: ImageEncoderConfig) -> torch.nn.Module:
    """``timm.create_model`` without a classifier head, loading ``weights_path`` when set."""
    kwargs: dict[str, Any] = dict(config.model_kwargs)
    kwargs.update(in_chans=config.in_chans, num_classes=0)
    if config.weights_path and Path(config.weights_path).is_dir():
        model = _timm_model(config, kwargs)
        _load_encoder_dir(model, Path(config.weights_path), config.model_name)
        return model
    if config.weights_path:
        path = Path(config.weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"image encoder weights file {str(path)!r} does not exist")
        # timm reads the file (safetensors, or torch.load with weights_only), adapts the first conv
        # to in_chans, resamples a ViT's position embeddings and drops the head. custom_load=False:
        # the file is a state dict, never a model-specific format such as JAX .npz.
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=False))
    model = _timm_model(config, kwargs)
    if config.weights_path:
        _check_weights_cover(model, path, config.model_name)
    return model


def _timm_model(config: ImageEncoderConfig, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm

    try:
        # Transformers take the input size; CNNs do not, and refuse the keyword.
        return timm.create_model(config.model_name, img_size=config.img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(config.model_name, **kwargs)


def _load_encoder_dir(model: torch.nn.Module, directory: Path, model_name: str) -> None:
    """Load the backbone of a kiban image-encoder folder (``kiban pretrain image``) into ``model``."""
    import json

    from safetensors.torch import load_file

    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"image weights_path {str(directory)!r} is a folder but not a kiban encoder folder "
            "(needs config.json and model.safetensors); a timm weights file is given by its file path"
        )
    meta = json.loads(config_file.read_text())
    saved = meta.get("config", {})
    if meta.get("modality") != MODALITY or saved.get("model_name") != model_name:
        raise ValueError(
            f"{str(directory)!r} holds a {meta.get('modality')!r} encoder of model "
            f"{saved.get('model_name')!r}, not an image encoder of {model_name!r}"
        )
    state = {key.removeprefix("backbone."): value for key, value in load_file(str(weights_file)).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise ValueError(f"weights in {str(directory)!r} do not fit this {model_name!r} encoder: {first}") from None


def _check_weights_cover(model: torch.nn.Module, path: Path, model_name: str) -> None:
    """Raise if the weights file left model tensors at their random init.

    timm loads non-strictly once the head is dropped, so a checkpoint of another architecture would
    otherwise load nothing, logging only at INFO level.
    """
    from timm.models import load_state_dict

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:  # reads the keys only
            stored = {key.removeprefix("module.") for key in handle.keys()}  # as timm's clean_state_dict
    else:
        stored = set(load_state_dict(str(path)))
    missing = [key for key in model.state_dict() if key not in stored]
    if missing:
        raise ValueError(
            f"weights file {str(path)!r} does not fit timm model {model_name!r}: {len(missing)} of "
            f"{len(model.state_dict())} tensors are missing, e.g. {', '.join(missing[:5])}"
        )


@register_preset(MODALITY)
def tiny() -> ImageEncoderConfig:
    """A 2-block, 32-wide ViT on 32x32 RGB inputs, 8x8 patches (16 tokens per slice), for tests."""
    return ImageEncoderConfig(
        model_name="vit_tiny_patch16_224",
        in_chans=3,
        img_size=32,
        model_kwargs=(("patch_size", 8), ("depth", 2), ("embed_dim", 32), ("num_heads", 2)),
    )


@register_preset(MODALITY)
def vit_small() -> ImageEncoderConfig:
    """ViT-S/16 on 224x224 RGB: 196 tokens of width 384 per slice."""
    return ImageEncoderConfig(model_name="vit_small_patch16_224", in_chans=3, img_size=224)


@register_preset(MODALITY)
def cell_painting() -> ImageEncoderConfig:
    """ViT-S/16 on 5-channel Cell Painting images (DNA, ER, RNA, AGP, Mito)."""
    return ImageEncoderConfig(model_name="vit_small_patch16_224", in_chans=5, img_size=224)


@register_preset(MODALITY)
def resnet18() -> ImageEncoderConfig:
    """ResNet-18 on 224x224 RGB: 49 tokens (its 7x7 last feature map) of width 512 per slice."""
    return ImageEncoderConfig(model_name="resnet18", in_chans=3, img_size=224)
