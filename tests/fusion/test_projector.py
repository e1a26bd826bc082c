import pytest
import torch

from kiban.encoders import ModalityTokens
from kiban.fusion import ProjectorConfig, create_projector, list_projectors


def _tokens(lengths, dim=12):
    n = max(lengths)
    embeddings = torch.randn(len(lengths), n, dim)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ModalityTokens(embeddings, mask)


@pytest.mark.parametrize("kind", list_projectors())
def test_projector_maps_to_llm_width_and_ignores_padding(kind):
    projector = create_projector(ProjectorConfig(kind=kind, num_tokens=5, depth=1, num_heads=4), in_dim=12, out_dim=16)
    projector.eval()
    batch = _tokens([3, 7])
    out = projector(batch)
    assert out.embeddings.shape[0] == 2 and out.embeddings.shape[-1] == 16
    if kind == "resampler":
        assert out.embeddings.shape[1] == 5 and out.mask.all()
    else:
        assert torch.equal(out.mask, batch.mask)
    # the short item alone gives the same projected tokens as inside the padded batch
    alone = projector(ModalityTokens(batch.embeddings[:1, :3], batch.mask[:1, :3]))
    valid = out.mask[0]
    torch.testing.assert_close(alone.embeddings[0][alone.mask[0]], out.embeddings[0][valid], atol=1e-5, rtol=1e-5)


def test_unknown_projector_kind_names_the_choices():
    with pytest.raises(KeyError, match="linear"):
        create_projector(ProjectorConfig(kind="transformer"), in_dim=4, out_dim=4)


def test_orthogonal_linear_projector_keeps_every_direction_at_its_gain():
    # what the quickstart's cell path relies on: a token comes out rotated and scaled, not mixed
    # down, so a linear read-out of the projected token equals one of the encoder's
    projector = create_projector(ProjectorConfig(kind="linear", init="orthogonal", gain=8.0), in_dim=12, out_dim=16)
    weight = projector.proj.weight.detach()
    torch.testing.assert_close(weight.T @ weight, 64.0 * torch.eye(12), atol=1e-4, rtol=1e-4)
    assert not projector.proj.bias.detach().any()
    tokens = _tokens([4])
    out = projector(tokens)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), 8.0 * tokens.embeddings.norm(dim=-1))


def test_projector_init_refusals_name_the_setting():
    with pytest.raises(ValueError, match="'xavier'"):
        create_projector(ProjectorConfig(kind="linear", init="xavier"), in_dim=4, out_dim=4)
    with pytest.raises(ValueError, match="linear' only, not 'mlp2'"):
        create_projector(ProjectorConfig(kind="mlp2", init="orthogonal", gain=4.0), in_dim=4, out_dim=4)
