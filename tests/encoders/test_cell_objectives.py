"""The cell encoder's pretraining objectives on real cells: masking statistics and a falling loss.

Real data: Tabula Muris FACS (``../shared/data/single_cell``); the tests skip where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiban.encoders import create_encoder
from kiban.encoders.cell import vocab_from_adata
from kiban.encoders.pretraining import create_objective, list_objectives

TABULA_MURIS = Path(__file__).resolve().parents[3] / "shared" / "data" / "single_cell" / "tabula_muris_facs_actinn_5k.h5ad"
SMALL = dict(width=32, num_layers=2, num_heads=2, ffn_dim=64, dropout=0.0)


@pytest.fixture(scope="module")
def cells():
    if not TABULA_MURIS.is_file():
        pytest.skip(f"{TABULA_MURIS} is absent")
    import anndata

    adata = anndata.read_h5ad(TABULA_MURIS)
    return adata[adata.obs["split"] == "train"][:160].copy()


def _encoder(cells, preset: str, **overrides):
    torch.manual_seed(0)
    options = dict(SMALL, gene_vocab=vocab_from_adata(cells), max_genes=96)
    if preset == "geneformer":
        options.update(max_position=98, attention_dropout=0.0)
    options.update(overrides)
    return create_encoder("cell", preset=preset, **options)


def _features(encoder, cells):
    return [encoder.featurizer(cells[i : i + 1]) for i in range(cells.n_obs)]


def test_cell_objectives_are_registered_with_masked_expression_first(cells):
    assert list_objectives()["cell"] == ["masked_expression", "rank_mlm"]
    objective = create_objective("cell", _encoder(cells, "tiny"))
    assert objective.name == "masked_expression"
    with pytest.raises(ValueError, match="use objective 'rank_mlm'"):
        create_objective("cell", _encoder(cells, "geneformer"))
    with pytest.raises(ValueError, match="needs a <mask> token"):
        create_objective("cell", _encoder(cells, "tiny", tokenization="rank"), name="rank_mlm")


def test_masked_expression_hides_the_set_fraction_of_expressed_values_and_keeps_the_rest(cells):
    encoder = _encoder(cells, "scgpt", profile_token="first")
    masker = create_objective("cell", encoder, mask_ratio=0.25).masker
    n_bins = encoder.config.n_bins
    torch.manual_seed(1)
    for features in _features(encoder, cells[:40]):
        out = masker(features)
        gene = features["gene_ids"] != encoder.config.cls_id
        masked = out["masked"]
        assert masked.sum().item() == max(1, round(0.25 * gene.sum().item()))
        assert not masked[~gene].any()  # the CLS token is never hidden
        assert (out["value_ids"][masked] == n_bins + 1).all()
        assert torch.equal(out["value_ids"][~masked], features["value_ids"][~masked])
        assert torch.equal(out["target_values"][masked], features["value_ids"][masked].float())
        assert torch.equal(out["gene_ids"], features["gene_ids"])  # gene identities stay visible
        # the hidden genes are out of the profile token, the others untouched
        hidden = set(features["gene_ids"][masked].tolist())
        profile_ids = encoder.featurizer.token_ids[features["profile_index"].numpy()]
        is_hidden = torch.as_tensor(np.isin(profile_ids, list(hidden)))
        assert (out["profile_values"][is_hidden] == 0).all()
        assert torch.equal(out["profile_values"][~is_hidden], features["profile_values"][~is_hidden])


def test_a_profile_only_encoder_hides_genes_from_its_profile(cells):
    encoder = _encoder(cells, "tiny", profile_token="only")
    masker = create_objective("cell", encoder, mask_ratio=0.3).masker
    torch.manual_seed(4)
    for features in _features(encoder, cells[:40]):
        out = masker(features)
        hidden = out["profile_masked"]
        assert hidden.sum().item() == max(1, round(0.3 * len(hidden)))
        assert (out["profile_values"][hidden] == 0).all()
        assert torch.equal(out["profile_values"][~hidden], features["profile_values"][~hidden])
        assert torch.equal(out["profile_targets"], features["profile_values"])


def test_rank_mlm_selects_15_percent_of_gene_tokens_80_10_10(cells):
    encoder = _encoder(cells, "geneformer", cls_id=2, eos_id=3)
    masker = create_objective("cell", encoder, name="rank_mlm").masker
    torch.manual_seed(2)
    selected = masked = random = kept = total = 0
    for features in _features(encoder, cells):
        out = masker(features)
        ids, labels = features["gene_ids"], out["labels"]
        chosen = labels != -100
        genes = (ids != 2) & (ids != 3)
        assert not chosen[~genes].any()  # <cls> and <eos> are never selected
        assert chosen.sum().item() == max(1, round(0.15 * genes.sum().item()))
        assert torch.equal(labels[chosen], ids[chosen])
        selected += chosen.sum().item()
        total += genes.sum().item()
        masked += (out["gene_ids"][chosen] == 1).sum().item()
        kept += (out["gene_ids"][chosen] == ids[chosen]).sum().item()
        random += ((out["gene_ids"][chosen] != 1) & (out["gene_ids"][chosen] != ids[chosen])).sum().item()
        assert torch.equal(out["gene_ids"][~chosen], ids[~chosen])
    assert selected / total == pytest.approx(0.15, abs=0.005)
    assert masked / selected == pytest.approx(0.8, abs=0.03)
    assert random / selected == pytest.approx(0.1, abs=0.03)
    assert kept / selected == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize(
    ("preset", "name", "overrides", "fraction"),
    [
        ("tiny", "masked_expression", {}, 0.8),
        ("scgpt", "masked_expression", {"profile_token": "first"}, 0.8),
        # the quickstart's cell path: one profile token, its hidden genes predicted from it (GEPC)
        ("tiny", "masked_expression", {"profile_token": "only"}, 0.8),
        # cross-entropy over 2,000 genes starts near ln(2000) = 7.6; 25 steps learn about a nat
        ("geneformer", "rank_mlm", {"cls_id": 2, "eos_id": 3}, 0.9),
    ],
    ids=["kiban-binning", "scgpt-with-profile", "profile-only", "geneformer-rank"],
)
def test_a_few_seeded_steps_lower_the_loss_on_real_cells(cells, preset, name, overrides, fraction):
    encoder = _encoder(cells, preset, **overrides)
    objective = create_objective("cell", encoder, name=name)
    features = _features(encoder, cells)
    torch.manual_seed(3)
    held_out = objective.masker.collate([objective.masker(f) for f in features[:32]])
    train = features[32:]

    def held_out_loss() -> float:
        objective.eval()
        with torch.no_grad():
            return objective(held_out).loss.item()

    before = held_out_loss()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    objective.train()
    for step in range(25):
        torch.manual_seed(100 + step)
        chosen = torch.randperm(len(train))[:16].tolist()
        batch = objective.masker.collate([objective.masker(train[i]) for i in chosen])
        output = objective(batch)
        assert torch.isfinite(output.loss)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < fraction * before, (before, after)
