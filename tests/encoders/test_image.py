"""Tests of the image encoder: real images from scikit-image, channel layouts, multi-channel images
and z-stacks, a CNN backbone, loading timm weights from a local file, and bad inputs.
"""

import pickle

import numpy as np
import pytest
import timm
import torch

from kiban.encoders import InvalidInput, config_from_dict, config_to_dict, create_encoder
from kiban.encoders.image import ImageEncoderConfig, ImageFeaturizer

skimage_data = pytest.importorskip("skimage.data")

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)  # the "tiny" preset's model


def _tiny(**overrides):
    return create_encoder("image", preset="tiny", **overrides).eval()


# ----------------------------------------------------------------------------------------------
# real images and layouts


def test_real_grayscale_microscopy_image():
    cell = skimage_data.cell()  # (660, 550) uint8 light-microscopy image
    encoder = _tiny(in_chans=1)
    pixels = encoder.featurizer(cell, item_id="skimage-cell")["pixels"]
    assert pixels.shape == (1, 1, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    with torch.no_grad():
        tokens = encoder.encode([cell])
    assert tokens.embeddings.shape == (1, 16, 32) and tokens.mask.all()  # (32 / 8)^2 patches
    assert torch.isfinite(tokens.embeddings).all()


def test_real_rgb_image_channel_last_and_channel_first_agree():
    ihc = skimage_data.immunohistochemistry()  # (512, 512, 3) uint8
    featurizer = _tiny().featurizer
    last = featurizer(ihc)["pixels"]
    first = featurizer(np.ascontiguousarray(ihc.transpose(2, 0, 1)))["pixels"]
    as_tensor = featurizer(torch.from_numpy(ihc))["pixels"]
    assert last.shape == (1, 3, 32, 32)
    assert torch.equal(last, first) and torch.equal(last, as_tensor)


def test_ambiguous_layout_is_read_channel_first():
    image = np.random.default_rng(0).random((3, 20, 3)).astype(np.float32)
    pixels = _tiny().featurizer(image)["pixels"]
    expected = _tiny().featurizer(image[None])["pixels"]  # (Z=1, C=3, H=20, W=3)
    assert torch.equal(pixels, expected)


def test_image_files_read_like_arrays(tmp_path):
    import tifffile
    from PIL import Image

    ihc = skimage_data.immunohistochemistry()[:100, :120]
    featurizer = _tiny().featurizer
    Image.fromarray(ihc).save(tmp_path / "ihc.png")
    Image.fromarray(np.dstack([ihc, np.full(ihc.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "ihc.tif", ihc)
    expected = featurizer(ihc)["pixels"]
    for name in ("ihc.png", "rgba.png", "ihc.tif"):  # alpha is dropped
        assert torch.equal(featurizer(str(tmp_path / name))["pixels"], expected), name


# ----------------------------------------------------------------------------------------------
# channels, z-stacks, normalisation


def test_five_channel_image_and_z_stack_pad_over_z_with_a_mask():
    rng = np.random.default_rng(1)
    image = rng.random((5, 40, 50)).astype(np.float32)
    stack = rng.random((3, 5, 36, 36)).astype(np.float32)
    encoder = _tiny(in_chans=5)
    batch = encoder.featurizer.collate([encoder.featurizer(image), encoder.featurizer(stack)])
    assert batch["pixels"].shape == (2, 3, 5, 32, 32)
    assert batch["slice_mask"].tolist() == [[True, False, False], [True, True, True]]
    with torch.no_grad():
        tokens = encoder(**batch)
        alone = encoder.encode([image])
    assert tokens.embeddings.shape == (2, 48, 32)
    assert tokens.mask.sum(1).tolist() == [16, 48] and tokens.mask[0, :16].all()
    torch.testing.assert_close(tokens.embeddings[0, :16], alone.embeddings[0], atol=1e-5, rtol=0)
    assert (tokens.embeddings[0, 16:] == 0).all()


def test_z_mean_mode_averages_the_slice_tokens():
    stack = np.random.default_rng(2).random((3, 5, 32, 32)).astype(np.float32)
    encoder = _tiny(in_chans=5, z_mode="mean")
    pixels = encoder.featurizer(stack)["pixels"]
    with torch.no_grad():
        tokens = encoder.encode([stack, stack[0]])
        per_slice = encoder.slice_tokens(pixels)
    assert tokens.embeddings.shape == (2, 16, 32) and tokens.mask.all()
    torch.testing.assert_close(tokens.embeddings[0], per_slice.mean(0), atol=1e-5, rtol=0)


def test_per_channel_normalisation():
    rng = np.random.default_rng(3)
    image = np.stack([rng.normal(100, 5, (64, 64)), rng.normal(-3, 0.1, (64, 64))]).astype(np.float32)
    image[0, 0, 0] = 1e6  # a hot pixel does not squash the percentile scaling
    percentile = ImageFeaturizer(in_chans=2, img_size=64)(image)["pixels"][0]
    assert percentile.min() == 0.0 and percentile.max() == 1.0
    assert 0.3 < percentile[0].median() < 0.7 and 0.3 < percentile[1].median() < 0.7
    zscore = ImageFeaturizer(in_chans=2, img_size=64, normalize="zscore")(image[:, 1:, 1:])["pixels"][0]
    torch.testing.assert_close(zscore.mean((1, 2)), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(zscore.std((1, 2), correction=0), torch.ones(2), atol=1e-4, rtol=0)
    flat = ImageFeaturizer(in_chans=1, img_size=8)(np.full((10, 10), 7.0))["pixels"]
    assert (flat == 0).all()  # a constant channel carries nothing and stays finite


# ----------------------------------------------------------------------------------------------
# backbones and weights


def test_cnn_backbone_with_five_channels_gives_feature_map_tokens():
    encoder = create_encoder("image", model_name="resnet18", in_chans=5, img_size=64).eval()
    assert encoder.output_dim == 512
    stack = np.random.default_rng(4).random((2, 64, 64, 5)).astype(np.float32)  # (Z, H, W, C)
    with torch.no_grad():
        tokens = encoder.encode([stack[0], stack])
    assert tokens.embeddings.shape == (2, 8, 512)  # 64 / 32 = 2 -> 2 x 2 cells per slice
    assert tokens.mask.sum(1).tolist() == [4, 8]


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_weights_file_loads_into_the_encoder_exactly(tmp_path, suffix):
    source = timm.create_model("vit_tiny_patch16_224", in_chans=3, **TINY_VIT).eval()  # with its head
    path = tmp_path / f"vit.{suffix}"
    if suffix == "safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    encoder = _tiny(weights_path=str(path))
    image = skimage_data.immunohistochemistry()
    pixels = encoder.featurizer(image)["pixels"]
    with torch.no_grad():
        expected = source.forward_features(pixels)[:, source.num_prefix_tokens :]
        tokens = encoder.encode([image])
    torch.testing.assert_close(tokens.embeddings, expected)
    assert encoder.portable_config().weights_path is None


def test_rgb_weights_adapt_to_more_channels_and_wrong_files_fail(tmp_path):
    from safetensors.torch import save_file

    save_file(
        timm.create_model("vit_tiny_patch16_224", **TINY_VIT).state_dict(), tmp_path / "vit.safetensors"
    )
    encoder = _tiny(in_chans=5, weights_path=str(tmp_path / "vit.safetensors"))
    assert encoder.backbone.patch_embed.proj.weight.shape[1] == 5
    with torch.no_grad():
        assert encoder.encode([np.ones((5, 32, 32)) * np.arange(32)]).embeddings.shape == (1, 16, 32)

    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(ValueError, match="does not fit timm model 'vit_tiny_patch16_224'"):
        _tiny(weights_path=str(tmp_path / "resnet.safetensors"))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        _tiny(weights_path=str(tmp_path / "nowhere.safetensors"))


def test_config_round_trips_and_featurizer_pickles():
    config = create_encoder("image", preset="tiny").config
    again = config_from_dict(ImageEncoderConfig, config_to_dict(config))
    assert again == config
    featurizer = create_encoder("image", config_to_dict(config)).featurizer
    image = np.random.default_rng(5).random((3, 20, 20))
    assert torch.equal(pickle.loads(pickle.dumps(featurizer))(image)["pixels"], featurizer(image)["pixels"])


# ----------------------------------------------------------------------------------------------
# bad inputs


BAD_IMAGES = {
    "1-D": (np.ones(10), "has 1 dimension"),
    "5-D": (np.ones((2, 2, 3, 8, 8)), "has 5 dimension"),
    "wrong channel count": (np.ones((4, 20, 20)), r"shape \(4, 20, 20\) has no axis of 3 channels"),
    "2-D for RGB": (np.ones((20, 20)), "one channel .* but in_chans is 3"),
    "NaN": (np.where(np.eye(16, dtype=bool), np.nan, 1.0)[None].repeat(3, 0), "48 non-finite pixel"),
    "empty": (np.ones((3, 0, 20)), r"is empty \(shape \(3, 0, 20\)\)"),
    "text": (np.array([["a", "b"], ["c", "d"]]), "pixel values must be numbers"),
    "a list": ([[1, 2], [3, 4]], "expected a numpy array"),
    "missing file": ("/nonexistent/image.png", "file not found"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_raise_invalid_input_naming_the_item(case):
    item, problem = BAD_IMAGES[case]
    featurizer = _tiny().featurizer
    with pytest.raises(InvalidInput, match=problem) as caught:
        featurizer(item, item_id="plate1/A01")
    assert caught.value.modality == "image" and caught.value.item_id == "plate1/A01"
    assert str(caught.value).startswith("invalid image input 'plate1/A01': ")
    with pytest.raises(InvalidInput, match=problem) as described:  # no id: the item is described
        featurizer(item)
    assert described.value.item_id


def test_unreadable_file_raises_invalid_input(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match="cannot be read as an image") as caught:
        _tiny().featurizer(str(path))
    assert caught.value.item_id == str(path)


def test_default_preset_runs_on_the_registered_examples():
    from kiban.encoders import encoder_spec

    spec = encoder_spec("image")
    encoder = create_encoder("image", preset=spec.default_preset).eval()
    with torch.no_grad():
        tokens = encoder.encode(spec.examples())
    assert tokens.embeddings.shape == (3, 2 * 196, 384)  # ViT-S/16 at 224: 14 x 14 patches per slice
    assert tokens.mask.sum(1).tolist() == [196, 196, 392]
