"""Projectors: map an encoder's tokens (width D) into the LLM's token space (width H).

Three kinds, created by name from a small registry:

- ``linear``: one linear map per token (LLaVA, Liu et al. 2023);
- ``mlp2``: Linear -> GELU -> Linear per token (LLaVA-1.5, Liu et al. 2024);
- ``resampler``: K learned latent queries cross-attend to the tokens and come out as exactly K
  tokens, whatever the input length (Perceiver Resampler of Flamingo, Alayrac et al. 2022) -- a
  1,000-residue protein then costs the LLM K positions, not 1,000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kiban.encoders.base import ModalityTokens

__all__ = ["ProjectorConfig", "create_projector", "list_projectors", "register_projector"]


@dataclass
class ProjectorConfig:
    """A projector's plain settings: its registered ``kind`` and the resampler's shape."""
    kind: str = "mlp2"
    num_tokens: int = 32  # resampler only: K output tokens
    depth: int = 2  # resampler only: cross-attention blocks
    num_heads: int = 4  # resampler only
    dropout: float = 0.0
    # linear only: "default" is PyTorch's uniform init; "orthogonal" starts as a (semi-)orthogonal
    # map times ``gain`` with zero bias, so a token arrives with all its directions intact and at a
    # norm the backbone's residual stream keeps through its first layers (see LinearProjector)
    init: str = "default"
    gain: float = 1.0


_PROJECTORS: dict[str, Callable[..., nn.Module]] = {}


def register_projector(kind: str) -> Callable:
    """Class decorator registering a projector under ``kind``."""
    def wrap(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _PROJECTORS[kind] = cls
        return cls

    return wrap


def list_projectors() -> list[str]:
    """The registered projector kinds, sorted."""
    return sorted(_PROJECTORS)


def create_projector(config: ProjectorConfig, *, in_dim: int, out_dim: int) -> nn.Module:
    """Build the projector ``config.kind`` mapping width ``in_dim`` to ``out_dim``."""
    try:
        cls = _PROJECTORS[config.kind]
    except KeyError:
        raise KeyError(f"no projector kind {config.kind!r}; known: {', '.join(list_projectors())}") from None
    if (config.init, config.gain) != ("default", 1.0) and config.kind != "linear":
        raise ValueError(f"projector init={config.init!r}, gain={config.gain} applies to kind 'linear' only, not {config.kind!r}")
    return cls(config, in_dim=in_dim, out_dim=out_dim)


@register_projector("linear")
class LinearProjector(nn.Module):
    def __init__(self, config: ProjectorConfig, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(in_dim, out_dim)
        if config.init == "orthogonal":
            # PyTorch's default init shrinks a whole-profile cell token (norm ~24, after its
            # LayerNorm) to a norm of ~14 and mixes its directions; the backbone's first layers then
            # write over it. An
            # orthogonal map keeps every direction (logistic regression on the projected cell equals
            # that on the encoder's token), and the gain sets how much of it survives to layer 2
            # (benchmarks/cell_fusion_variants.py).
            nn.init.orthogonal_(self.proj.weight, gain=config.gain)
            nn.init.zeros_(self.proj.bias)
        elif config.init != "default":
            raise ValueError(f"projector init {config.init!r}: expected 'default' or 'orthogonal'")

    def forward(self, tokens: ModalityTokens) -> ModalityTokens:
        return ModalityTokens(self.proj(tokens.embeddings), tokens.mask)


@register_projector("mlp2")
class MLPProjector(nn.Module):
    def __init__(self, config: ProjectorConfig, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(out_dim, out_dim)
        )

    def forward(self, tokens: ModalityTokens) -> ModalityTokens:
        return ModalityTokens(self.net(tokens.embeddings), tokens.mask)


class _ResamplerBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.norm_inputs = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # Flamingo: keys/values are the inputs concatenated with the latents themselves, so a latent
        # can also attend to the other latents, and an all-padding row still has something to read.
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_inputs(inputs), q], dim=1)
        kv_pad = torch.cat([pad, pad.new_zeros(pad.shape[0], q.shape[1])], dim=1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return latents + self.ff(latents)


@register_projector("resampler")
class ResamplerProjector(nn.Module):
    def __init__(self, config: ProjectorConfig, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.config = config
        if out_dim % config.num_heads:
            raise ValueError(f"resampler: LLM width {out_dim} is not divisible by num_heads {config.num_heads}")
        self.inputs = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.randn(config.num_tokens, out_dim) * out_dim**-0.5)
        self.blocks = nn.ModuleList(
            _ResamplerBlock(out_dim, config.num_heads, config.dropout) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: ModalityTokens) -> ModalityTokens:
        inputs = self.inputs(tokens.embeddings)
        latents = self.latents.unsqueeze(0).expand(inputs.shape[0], -1, -1)
        pad = ~tokens.mask
        for block in self.blocks:
            latents = block(latents, inputs, pad)
        out = self.norm(latents)
        return ModalityTokens(out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device))
