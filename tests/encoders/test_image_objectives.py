"""Masked autoencoding (MAE) of the image encoder's ViT on real blood-cell crops (BCCD)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from kiban.encoders import create_encoder
from kiban.encoders.image_objectives import patchify
from kiban.encoders.pretraining import create_objective, list_objectives

CROPS = Path(__file__).resolve().parents[3] / "shared" / "data" / "microscopy" / "bccd_blood_cells" / "crops"


@pytest.fixture(scope="module")
def crops() -> list[Path]:
    paths = sorted(CROPS.glob("*.png"))
    if not paths:
        pytest.skip(f"no crops in {CROPS}")
    return paths[::3][:112]  # all three cell types, spread over the folder


def _objective(**options):
    torch.manual_seed(0)
    encoder = create_encoder("image", preset="tiny")  # 32x32 RGB, 8x8 patches: 16 per image
    return create_objective("image", encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, **options)


def _batch(objective, items):
    featurizer = objective.encoder.featurizer
    return objective.masker.collate([objective.masker(featurizer(item)) for item in items])


def test_mae_is_the_image_default():
    assert list_objectives()["image"][0] == "mae"


def test_three_quarters_of_every_slice_are_masked_at_random(crops):
    objective = _objective()
    torch.manual_seed(1)
    batch = _batch(objective, crops[:8])
    order = batch["patch_order"][:, 0]
    assert order.shape == (8, 16) and objective.masker.keep == 4
    assert all(torch.equal(row.sort().values, torch.arange(16)) for row in order)  # a permutation per image
    assert len({tuple(row[:4].sort().values.tolist()) for row in order}) > 1  # different patches per image
    output = objective(batch)
    assert output.metrics["mask_ratio"].item() == 0.75 and output.metrics["n_masked"].item() == 8 * 12
    # z-stacks: each slice gets its own order; padded slices carry none
    stack = torch.rand(3, 3, 32, 32)
    item = objective.masker(objective.encoder.featurizer(stack))
    assert item["patch_order"].shape == (3, 16)
    assert pickle.loads(pickle.dumps(objective.masker)).ratio == 0.75


def test_patchify_follows_timms_patch_token_order():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    patches = patchify(images, (8, 8))
    assert patches.shape == (2, 4, 8 * 8 * 3)
    # patch 1 is the top-right 8x8 block; its first pixel is row 0, column 8, channels last
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 8])


def test_visible_patches_alone_reach_the_encoder(crops):
    objective = _objective().eval()
    images = _batch(objective, crops[:2])["pixels"][:, 0]
    order = torch.stack([torch.randperm(16) for _ in range(2)])
    states = objective.encode_visible(images, order)
    assert states.shape == (2, 1 + 4, objective.encoder.output_dim)  # the CLS token and 4 visible patches
    # changing a masked patch's pixels cannot change the visible states
    hidden = int(order[0, -1])
    row, col = divmod(hidden, 4)
    altered = images.clone()
    altered[0, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 5.0
    assert torch.allclose(objective.encode_visible(altered, order), states, atol=1e-6)


def test_a_few_seeded_steps_lower_the_loss(crops):
    objective = _objective()
    torch.manual_seed(2)
    held = _batch(objective, crops[96:112])
    train = [crops[i : i + 16] for i in range(0, 96, 16)]
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)

    def held_loss() -> float:
        objective.eval()
        with torch.no_grad():
            return objective(held).loss.item()

    before = held_loss()
    torch.manual_seed(3)
    for step in range(20):
        objective.train()
        loss = objective(_batch(objective, train[step % len(train)])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_loss()
    # per-patch normalised targets: predicting each patch's mean gives 1.0, so the drop is the learnt structure
    assert after < 0.92 * before, (before, after)


def test_backbones_without_patch_tokens_are_refused():
    encoder = create_encoder("image", model_name="resnet18", in_chans=3, img_size=32)
    with pytest.raises(ValueError, match="MAE masks the patch tokens of a timm ViT; 'resnet18' is a ResNet"):
        create_objective("image", encoder)


def test_a_pretrained_encoder_folder_loads_through_weights_path(crops, tmp_path):
    import json

    from safetensors.torch import save_model

    from kiban.encoders import config_to_dict

    objective = _objective()
    with torch.no_grad():
        objective.encoder.backbone.norm.bias.add_(1.0)
    directory = tmp_path / "encoder"
    directory.mkdir()
    save_model(objective.encoder, str(directory / "model.safetensors"))
    meta = {"format": "kiban-encoder", "modality": "image", "config": config_to_dict(objective.encoder.portable_config())}
    (directory / "config.json").write_text(json.dumps(meta))
    loaded = create_encoder("image", preset="tiny", weights_path=str(directory)).eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(crops[:3]).embeddings, objective.encoder.eval().encode(crops[:3]).embeddings)
    with pytest.raises(ValueError, match="not an image encoder of 'resnet18'"):
        create_encoder("image", model_name="resnet18", img_size=32, weights_path=str(directory))
