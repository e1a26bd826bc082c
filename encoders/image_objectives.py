"""Masked autoencoding (MAE) for the image encoder's timm ViT backbone.

He, Chen, Xie, Li, Dollár, Girshick 2022, "Masked autoencoders are scalable vision learners" (CVPR),
as used for microscopy by Kraus et al. 2024 ("Masked autoencoders for microscopy are scalable
learners of cellular biology"): every z-slice's patches are shuffled at random and 75% are dropped;
the ViT encodes only the visible 25% (with their position embeddings and its class/register tokens);
a small transformer decoder sees the encoded visible patches plus a learned mask token at every
dropped position (with its own position embeddings) and predicts each dropped patch's pixels,
normalised per patch (MAE's ``norm_pix_loss``). The loss is the mean squared error over dropped
patches only.

The encoder's forward path is timm's own (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``,
``norm``), so what is pretrained is exactly what ``ImageEncoder.slice_tokens`` later runs. Backbones
without patch tokens to drop (CNNs such as ResNet) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kiban.encoders.base import pad_stack
from kiban.encoders.image import ImageEncoder, ImageFeaturizer
from kiban.encoders.pretraining import ObjectiveOutput, PretrainObjective, register_objective

__all__ = ["MaskedAutoencoder", "PatchMasker", "patchify"]


class PatchMasker:
    """Draws each slice's random patch order (MAE's per-sample shuffle). Picklable, weight-free.

    Adds ``patch_order [Z, P]`` to an image's features: a random permutation of its P patches per
    slice; the first ``keep`` of each row stay visible, the rest are masked (``keep = int(P * (1 -
    ratio))``, as in MAE). Randomness comes from the global torch RNG (seeded per record).
    """

    def __init__(self, featurizer: ImageFeaturizer, *, num_patches: int, ratio: float = 0.75) -> None:
        """Mask ``ratio`` of the ``num_patches`` patches of every slice."""
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"MAE mask ratio must be between 0 and 1, got {ratio}")
        self.featurizer = featurizer
        self.num_patches = num_patches
        self.ratio = ratio
        self.keep = max(1, int(num_patches * (1 - ratio)))

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The image's features plus a random patch order per slice."""
        slices = features["pixels"].shape[0]
        order = torch.stack([torch.randperm(self.num_patches) for _ in range(slices)])
        return {**features, "patch_order": order}

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``pixels [B, Z, C, S, S]``, ``slice_mask [B, Z]`` and ``patch_order [B, Z, P]``."""
        batch = self.featurizer.collate([{"pixels": item["pixels"]} for item in items])
        batch["patch_order"], _ = pad_stack([item["patch_order"] for item in items])
        return batch


def patchify(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """[M, C, H, W] -> [M, P, ph * pw * C], patches in the row-major order of timm's patch tokens."""
    m, c, h, w = images.shape
    ph, pw = patch
    grid = images.reshape(m, c, h // ph, ph, w // pw, pw)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(m, (h // ph) * (w // pw), ph * pw * c)


def _check_vit(encoder: ImageEncoder) -> None:
    backbone = encoder.backbone
    needed = ("patch_embed", "_pos_embed", "blocks", "norm")
    missing = [name for name in needed if not hasattr(backbone, name)]
    if missing or getattr(backbone, "global_pool", "token") == "map" or not hasattr(backbone.patch_embed, "grid_size"):
        raise ValueError(
            f"MAE masks the patch tokens of a timm ViT; {encoder.config.model_name!r} is a "
            f"{type(backbone).__name__}, which has no patch tokens to drop (pretrain a ViT, e.g. the "
            "image encoder's 'tiny' or 'cell_painting' preset)"
        )
    if getattr(backbone.patch_embed, "dynamic_img_size", False) or not getattr(backbone.patch_embed, "flatten", True):
        raise ValueError(f"MAE needs a ViT with flattened, fixed-size patch tokens; {encoder.config.model_name!r} is not")


@register_objective("image", "mae")
class MaskedAutoencoder(PretrainObjective):
    """MAE over ``encoder.backbone`` (a timm VisionTransformer) with a small transformer decoder.

    Batch: from ``self.masker`` (see PatchMasker); only real slices are used. Metrics:
    ``n_masked`` (masked patches in the batch), ``mask_ratio``. Options: ``ratio`` (0.75),
    ``decoder_dim`` (128), ``decoder_depth`` (2), ``decoder_heads`` (4), ``norm_pix_loss`` (True).
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        *,
        ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        """Wrap ``encoder`` (a timm ViT) with MAE's mask token and decoder."""
        from timm.models.vision_transformer import Block

        _check_vit(encoder)
        super().__init__(encoder)
        backbone = encoder.backbone
        self.patch = tuple(backbone.patch_embed.patch_size)
        num_patches = int(backbone.patch_embed.num_patches)
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        self.norm_pix_loss = norm_pix_loss
        self.masker = PatchMasker(encoder.featurizer, num_patches=num_patches, ratio=ratio)
        width = encoder.output_dim
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch[0] * self.patch[1] * encoder.config.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def encode_visible(self, images: Tensor, order: Tensor) -> Tensor:
        """ViT states [M, prefix + keep, D] of the visible patches (the first ``keep`` of ``order``)."""
        backbone = self.encoder.backbone
        tokens = backbone._pos_embed(backbone.patch_embed(images))  # prefix tokens first, positions added
        prefix, patches = tokens[:, : self.prefix], tokens[:, self.prefix :]
        visible = order[:, : self.masker.keep]
        patches = torch.gather(patches, 1, visible.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = backbone.norm_pre(torch.cat([prefix, patches], dim=1))
        for block in backbone.blocks:
            x = block(x)
        return backbone.norm(x)

    def decode(self, states: Tensor, order: Tensor) -> Tensor:
        """Predicted pixels [M, P, ph * pw * C] of every patch, in patch order."""
        x = self.decoder_embed(states[:, self.prefix :])
        m, keep, width = x.shape
        hidden = order.shape[1] - keep
        x = torch.cat([x, self.mask_token.expand(m, hidden, width)], dim=1)
        restore = order.argsort(dim=1)  # position in the shuffled sequence of each patch
        x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, width)) + self.decoder_pos
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Mean squared error of the masked patches' (per-patch normalised) pixels."""
        real = batch["slice_mask"]
        images, order = batch["pixels"][real], batch["patch_order"][real]  # [M, C, S, S], [M, P]
        prediction = self.decode(self.encode_visible(images, order), order)
        target = patchify(images, self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        masked = torch.ones_like(order, dtype=torch.bool)
        masked.scatter_(1, order[:, : self.masker.keep], False)
        per_patch = ((prediction - target) ** 2).mean(-1)
        loss = per_patch[masked].mean()
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "n_masked": masked.sum().float(),
                "mask_ratio": masked.float().mean(),
            },
        )
