"""Splits: no scaffold / group on two sides, strata covered, seeds reproducible."""

import numpy as np
import pandas as pd
import pytest

from kiban.tasks.splits import group_split, length_stratified_split, murcko_scaffold, scaffold_split


def _sides(split):
    return {"train": split.train, "valid": split.valid, "test": split.test}


def _check_partition(split, n):
    rows = np.concatenate([split.train, split.valid, split.test])
    assert sorted(rows.tolist()) == list(range(n))


def test_murcko_scaffold_by_hand():
    assert murcko_scaffold("CCc1ccccc1") == "c1ccccc1"
    assert murcko_scaffold("CCO") == ""
    assert murcko_scaffold("OC(=O)c1ccccc1-c1ccncc1") == "c1ccc(-c2ccncc2)cc1"


def test_scaffold_split_no_scaffold_on_both_sides(shared_data):
    smiles = pd.read_csv(shared_data / "molecules" / "bbbp.csv")["smiles"].str.strip().tolist()[:600]
    from rdkit import Chem

    smiles = [s for s in smiles if Chem.MolFromSmiles(s) is not None]
    split = scaffold_split(smiles, seed=3)
    _check_partition(split, len(smiles))
    scaffolds = {side: {murcko_scaffold(smiles[i]) for i in rows} for side, rows in _sides(split).items()}
    assert not scaffolds["train"] & scaffolds["test"]
    assert not scaffolds["train"] & scaffolds["valid"]
    assert not scaffolds["valid"] & scaffolds["test"]
    assert 0.1 < len(split.test) / len(smiles) < 0.3
    assert split.describe()["seed"] == 3 and split.method == "scaffold"
    again = scaffold_split(smiles, seed=3)
    np.testing.assert_array_equal(again.test, split.test)


def test_group_split_holds_out_whole_groups():
    groups = np.repeat(["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"], [50, 40, 30, 20, 20, 15, 15, 10])
    split = group_split(groups, seed=1)
    _check_partition(split, len(groups))
    sides = {side: set(groups[rows]) for side, rows in _sides(split).items()}
    assert (
        not sides["train"] & sides["test"]
        and not sides["train"] & sides["valid"]
        and not sides["valid"] & sides["test"]
    )
    assert len(split.test)
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        group_split(["a"] * 10)


def test_length_stratified_split_covers_lengths():
    lengths = np.random.default_rng(0).integers(30, 800, 500)
    split = length_stratified_split(lengths, seed=0)
    _check_partition(split, 500)
    # each side's length distribution spans the range: the test median is within 15% of the overall
    assert abs(np.median(lengths[split.test]) - np.median(lengths)) < 0.15 * np.median(lengths)
    assert lengths[split.test].min() < 100 and lengths[split.test].max() > 700
