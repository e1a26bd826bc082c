"""The cell encoder's profile token fitted to data (``kiban.encoders.cell_profile``): the statistics
are those of the values the token sees, the fitted token is the chosen genes' z-scores, it survives
save and load, bad statistics are refused, and on real cells it keeps what logistic regression reads
from the expression where random gene vectors lose part of it.
"""

import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import StandardScaler

from kiban.data.cell_profiles import fitted_profile_settings
from kiban.encoders import create_encoder
from kiban.encoders.cell import CellEncoderConfig, make_adata, synthetic_gene_names, vocab_from_adata
from kiban.encoders.cell_profile import chosen_genes, profile_statistics

TARGET_SUM = 10_000.0


def _log_normalised(adata) -> np.ndarray:
    """What the profile token sees of each cell, computed here by hand: log1p(count per 10k)."""
    counts = adata.X.toarray().astype(np.float64)
    return np.log1p(counts / counts.sum(1, keepdims=True) * TARGET_SUM)


def _token_settings(vocab, width):
    return {"preset": "tiny", "gene_vocab": tuple(vocab), "profile_token": "only", "width": width}


def _encoder(settings):
    settings = dict(settings)
    preset = settings.pop("preset")
    return create_encoder("cell", preset=preset, **settings).eval()


def test_statistics_are_the_mean_and_std_of_the_tokens_values_zeros_counted_and_rejects_named():
    adata = make_adata(40, 30, seed=1)
    counts = adata.X.toarray()
    counts[5] = 0  # a cell of zeros: refused by the featurizer, counted, not averaged in
    adata.X = scipy.sparse.csr_matrix(counts)
    encoder = _encoder(_token_settings(synthetic_gene_names(30), 16))
    stats = profile_statistics(encoder.featurizer, (adata[i : i + 1] for i in range(adata.n_obs)))

    kept = np.delete(np.arange(40), 5)
    expected = _log_normalised(adata[kept])
    assert (stats.n_cells, stats.n_rejected) == (39, 1)
    assert stats.rejects[0][0] == "cell 5" and "values are 0" in stats.rejects[0][1]
    np.testing.assert_allclose(stats.mean, expected.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.std, expected.std(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [40, 12])
def test_fitted_token_is_layernorm_of_the_chosen_genes_z_scores(width):
    """40 dims: every varying gene of 30 fits; 12 dims: the 12 of highest dispersion are kept."""
    adata = make_adata(60, 30, seed=2)
    vocab = synthetic_gene_names(30)
    settings = _token_settings(vocab, width)
    settings.update(fitted_profile_settings(settings, adata))
    encoder = _encoder(settings)

    values = _log_normalised(adata)
    mean, std = values.mean(0), values.std(0)
    chosen = chosen_genes(mean, std, width)
    if width >= 30:
        assert chosen.tolist() == [g for g in range(30) if std[g] > 0]
    else:
        dispersion = np.where(std > 0, std**2 / np.maximum(mean, 1e-12), -np.inf)
        assert sorted(chosen.tolist()) == sorted(np.argsort(-dispersion)[:width].tolist())
    z = np.zeros((60, width))
    z[:, : len(chosen)] = (values[:, chosen] - mean[chosen]) / std[chosen]
    z = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-5)

    cells = [adata[i : i + 1] for i in range(60)]
    with torch.no_grad():
        tokens = encoder(**encoder.featurizer.collate([encoder.featurizer(cell) for cell in cells]))
    assert tokens.embeddings.shape == (60, 1, width)
    np.testing.assert_allclose(tokens.embeddings[:, 0].numpy(), z, atol=2e-4)


def test_fitted_token_saves_and_loads_through_its_portable_config():
    adata = make_adata(30, 20, seed=3)
    settings = _token_settings(synthetic_gene_names(20), 24)
    settings.update(fitted_profile_settings(settings, adata))
    encoder = _encoder(settings)
    with torch.no_grad():  # trained weights must win over the fitted start on load
        encoder.profile_bias.add_(0.5)
    rebuilt = create_encoder("cell", config=encoder.portable_config()).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    cells = [adata[i : i + 1] for i in range(5)]
    batch = encoder.featurizer.collate([encoder.featurizer(cell) for cell in cells])
    with torch.no_grad():
        assert torch.equal(encoder(**batch).embeddings, rebuilt(**batch).embeddings)


def test_bad_statistics_are_refused_naming_the_field():
    vocab = synthetic_gene_names(10)
    with pytest.raises(ValueError, match="profile_mean has 3 values for a vocabulary of 10 genes"):
        _encoder({**_token_settings(vocab, 8), "profile_mean": (1.0, 2.0, 3.0), "profile_std": (1.0,) * 10})
    with pytest.raises(ValueError, match="profile_std must be finite and non-negative"):
        _encoder({**_token_settings(vocab, 8), "profile_mean": (1.0,) * 10, "profile_std": (-1.0,) * 10})
    with pytest.raises(ValueError, match="need a profile token"):
        create_encoder("cell", preset="tiny", gene_vocab=vocab, profile_mean=(1.0,) * 10, profile_std=(1.0,) * 10)
    with pytest.raises(ValueError, match="needs a featurizer of an encoder with a profile token"):
        profile_statistics(create_encoder("cell", preset="tiny").featurizer, [])
    with pytest.raises(ValueError, match="no cell to fit the profile token on: 1 cells read, all refused"):
        profile_statistics(_encoder(_token_settings(vocab, 8)).featurizer, [{"genes": ["G9"], "values": [1.0]}])
    assert CellEncoderConfig().profile_mean == ()


@pytest.fixture(scope="module")
def pbmc_raw():
    """Scanpy's bundled PBMC 68k subset (700 cells x 765 genes) as its log-normalised ``raw``, labels."""
    sc = pytest.importorskip("scanpy")
    adata = sc.datasets.pbmc68k_reduced()
    return adata.raw.to_adata(), adata.obs["bulk_labels"].cat.codes.to_numpy()


def test_on_real_cells_the_fitted_token_keeps_what_the_expression_tells_a_classifier(pbmc_raw):
    """765 genes into 576 dimensions, statistics from the training cells only: logistic regression on
    the fitted token matches logistic regression on the expression (one test cell = 0.007), while
    random gene vectors (this draw) lose part of it.
    """
    from kiban.tasks.splits import random_split

    raw, labels = pbmc_raw
    split = random_split(raw.n_obs, seed=0)
    vocab = vocab_from_adata(raw)
    settings = {"preset": "default", "gene_vocab": vocab, "profile_token": "only", "width": 576}
    matrix = raw.X.toarray()
    cells = [(row, list(vocab)) for row in matrix]

    def accuracy(features: np.ndarray) -> float:
        scaler = StandardScaler().fit(features[split.train])
        fitted = LogisticRegression(max_iter=3000).fit(scaler.transform(features[split.train]), labels[split.train])
        return accuracy_score(labels[split.test], fitted.predict(scaler.transform(features[split.test])))

    def token(encoder) -> np.ndarray:
        with torch.no_grad():
            return encoder(**encoder.featurizer.collate([encoder.featurizer(c) for c in cells])).pooled().numpy()

    expression = accuracy(matrix)
    train_rows = np.concatenate([split.train, split.valid]).tolist()
    fitted = _encoder({**settings, **fitted_profile_settings(settings, raw, rows=train_rows)})
    torch.manual_seed(1)
    random = _encoder(settings)
    fitted_accuracy, random_accuracy = accuracy(token(fitted)), accuracy(token(random))
    assert fitted_accuracy >= expression - 0.015, (fitted_accuracy, expression)
    assert fitted_accuracy > random_accuracy, (fitted_accuracy, random_accuracy)


# ----------------------------------------------------------------------------------------------
# kiban data fit-profile: from training files to a config


def test_fit_profile_command_writes_the_statistics_of_every_files_cells_into_the_config(tmp_path, capsys):
    """Two files with different gene sets (one gene outside the vocabulary, one cell of zeros): the
    statistics equal the per-cell path's over the accepted cells, the refused cell is in the rejects
    folder, read = accepted + rejected, and the written config builds the fitted encoder.
    """
    import json

    import yaml

    from kiban.cli import main
    from kiban.encoders.cell import CellFeaturizer

    vocab = synthetic_gene_names(24)
    first = make_adata(30, 24, seed=4)
    second = make_adata(20, 26, seed=5)  # GENE24, GENE25 are not in the vocabulary
    counts = second.X.toarray()
    counts[3, :24] = 0  # expresses only unknown genes: refused
    second.X = scipy.sparse.csr_matrix(counts)
    second = second[:, list(reversed(second.var_names))].copy()  # another column order
    first.write_h5ad(tmp_path / "a.h5ad")
    second.write_h5ad(tmp_path / "b.h5ad")
    settings = _token_settings(vocab, 16)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"stage": "align", "model": {"encoders": {"cell": {**settings, "gene_vocab": list(vocab)}}}}))

    out = tmp_path / "fitted.yaml"
    code = main(["data", "fit-profile", str(tmp_path / "train.yaml"), "--data", str(tmp_path / "a.h5ad"),
                 str(tmp_path / "b.h5ad"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "read 50 = accepted 49 + rejected 1" in printed and "keeps 16 of 24 vocabulary genes" in printed
    rejected = [json.loads(line) for line in (tmp_path / "fitted.rejects" / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == [second.obs_names[3]]

    fitted = yaml.safe_load(out.read_text())
    assert fitted["stage"] == "align"
    cell = fitted["model"]["encoders"]["cell"]
    featurizer = CellFeaturizer.from_config(CellEncoderConfig(gene_vocab=vocab, profile_token="only"))
    cells = [first[i : i + 1] for i in range(30)] + [second[i : i + 1] for i in range(20) if i != 3]
    expected = profile_statistics(featurizer, cells)
    np.testing.assert_allclose(cell["profile_mean"], expected.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cell["profile_std"], expected.std, rtol=1e-5, atol=1e-8)
    encoder = _encoder(cell)
    assert encoder.profile_bias is not None and int((encoder.profile.weight != 0).sum()) == 16


def test_fit_profile_command_refuses_a_config_without_a_cell_profile_token_in_one_line(tmp_path, capsys):
    import yaml

    from kiban.cli import main

    make_adata(5, 10).write_h5ad(tmp_path / "a.h5ad")
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"model": {"encoders": {"protein": {"preset": "tiny"}}}}))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"model": {"encoders": {"cell": {"preset": "tiny"}}}}))
    for name in ("none.yaml", "plain.yaml", "missing.yaml"):
        args = ["data", "fit-profile", str(tmp_path / name), "--data", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "o.yaml")]
        assert main(args) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "no model.encoders.cell" in errors[0]
    assert "no profile token" in errors[1]
    assert "no such config" in errors[2]
    assert not (tmp_path / "o.yaml").exists() and not (tmp_path / "o.rejects").exists()
