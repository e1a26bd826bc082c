"""timm weights for a 5-channel (Cell Painting) image encoder: the RGB stem adapted exactly as timm adapts it.

The reference is timm itself: the RGB checkpoint's input convolution put through
``timm.models.adapt_input_conv(5, weight)`` and loaded strictly into ``timm.create_model(..., in_chans=5)``.
kiban loads the same file through ``weights_path``; tokens must agree to 1e-5 on the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from kiban.encoders import create_encoder

CROPS = Path(__file__).resolve().parents[3] / "shared" / "data" / "microscopy" / "bccd_blood_cells" / "crops"
VIT = ("vit_tiny_patch16_224", (("patch_size", 8), ("depth", 2), ("embed_dim", 32), ("num_heads", 2)), "patch_embed.proj")
RESNET = ("resnet18", (), "conv1")


def _five_channel_images() -> list[np.ndarray]:
    """Real blood-cell crops as 5-channel stacks (R, G, B, grey, R - B), or seeded noise without the data."""
    paths = sorted(CROPS.glob("*.png"))[:4]
    if not paths:
        rng = np.random.default_rng(0)
        return [rng.random((5, 48, 48), dtype=np.float32) for _ in range(4)]
    from PIL import Image

    images = []
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        grey = rgb.mean(-1, keepdims=True)
        images.append(np.concatenate([rgb, grey, rgb[..., :1] - rgb[..., 2:]], axis=-1))  # (H, W, 5)
    return images


def _rgb_checkpoint(model_name: str, kwargs: tuple, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(6)
    size = dict(img_size=32) if model_name.startswith("vit") else {}
    source = timm.create_model(model_name, in_chans=3, num_classes=7, **size, **dict(kwargs))
    state = {key: value.detach().clone() for key, value in source.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("architecture", [VIT, RESNET], ids=["vit", "resnet18"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_five_channel_tokens_equal_timms_adapted_model(tmp_path, architecture, suffix):
    model_name, kwargs, first_conv = architecture
    img_size = 32 if model_name.startswith("vit") else 64
    path = tmp_path / f"rgb{suffix}"
    state = _rgb_checkpoint(model_name, kwargs, path)

    extra = dict(kwargs, img_size=img_size) if model_name.startswith("vit") else dict(kwargs)
    reference = timm.create_model(model_name, in_chans=5, num_classes=0, **extra).eval()
    adapted = {key: value for key, value in state.items() if not key.startswith(("head.", "fc."))}
    adapted[f"{first_conv}.weight"] = adapt_input_conv(5, state[f"{first_conv}.weight"])
    reference.load_state_dict(adapted, strict=True)

    encoder = create_encoder(
        "image", model_name=model_name, in_chans=5, img_size=img_size, model_kwargs=kwargs, weights_path=str(path)
    ).eval()
    loaded = encoder.backbone.get_submodule(first_conv).weight
    assert loaded.shape[1] == 5 and torch.equal(loaded, adapted[f"{first_conv}.weight"])

    images = _five_channel_images()
    batch = encoder.featurizer.collate([encoder.featurizer(image) for image in images])
    with torch.no_grad():
        tokens = encoder(**batch)
        features = reference.forward_features(batch["pixels"][:, 0])
    if features.dim() == 4:  # CNN feature map -> h*w tokens
        features = features.flatten(2).transpose(1, 2)
    else:
        features = features[:, reference.num_prefix_tokens :]
    assert tokens.embeddings.shape == features.shape
    assert (tokens.embeddings - features).abs().max().item() <= 1e-5


def test_timms_own_loader_gives_the_same_stem(tmp_path):
    """Kiban's weights_path is timm's load_pretrained with a file overlay: the same tensors as calling timm directly."""
    model_name, kwargs, first_conv = VIT
    path = tmp_path / "rgb.safetensors"
    _rgb_checkpoint(model_name, kwargs, path)
    direct = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=5, num_classes=0,
        img_size=32, **dict(kwargs),
    )  # fmt: skip
    encoder = create_encoder("image", model_name=model_name, in_chans=5, img_size=32, model_kwargs=kwargs, weights_path=str(path))
    for key, value in direct.state_dict().items():
        assert torch.equal(encoder.backbone.state_dict()[key], value), key


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    _rgb_checkpoint(*RESNET[:2], path)
    with pytest.raises(Exception, match="does not fit timm model|size mismatch|Missing key|Unexpected key"):
        create_encoder("image", model_name=VIT[0], in_chans=5, img_size=32, model_kwargs=VIT[1], weights_path=str(path))
