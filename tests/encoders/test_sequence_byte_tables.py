"""Protein and DNA tokens from byte lookup tables equal the per-letter tokens, on real sequences."""

import csv
import random
from pathlib import Path

import pytest
import torch

from kiban.encoders.base import InvalidInput
from kiban.encoders.dna import DnaFeaturizer
from kiban.encoders.protein import ProteinFeaturizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _rows(path, column, delimiter=","):
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with path.open() as handle:
        return [row[column] for row in csv.DictReader(handle, delimiter=delimiter)]


def _per_letter_protein(featurizer, sequence):
    ids = [featurizer.cls_idx, *(featurizer.token_ids[letter] for letter in sequence), featurizer.eos_idx]
    return torch.tensor(ids, dtype=torch.long)


def _per_letter_dna(featurizer, sequence):
    """DnaFeaturizer's tokens read letter by letter, greedily from the left."""
    vocab, k = featurizer.vocab, featurizer.k
    if featurizer.tokenization == "base" or len(sequence) < k:
        ids = [vocab[c] for c in sequence]
    elif featurizer.overlapping:
        ids = [vocab.get(sequence[i : i + k], featurizer.unk_id) for i in range(len(sequence) - k + 1)]
    else:
        ids, i = [], 0
        while i < len(sequence):
            window = sequence[i : i + k]
            if len(window) == k and "N" not in window:
                ids.append(vocab[window])
                i += k
            else:
                ids.append(vocab[sequence[i]])
                i += 1
    return torch.tensor([featurizer.cls_id, *ids, featurizer.sep_id], dtype=torch.long)


def test_protein_tokens_equal_the_per_letter_tokens():
    sequences = _rows(SHARED / "protein" / "sequences" / "enzyme_ec_clean_new392_test.tsv", "Sequence", "\t")
    sequences += _rows(SHARED / "protein" / "sequences" / "beta_lactamase_P62593_dms.csv", "sequence")[:300]
    featurizer = ProteinFeaturizer(max_length=100_000)
    for sequence in sequences + ["mktayiakqr", "XBZUO"]:
        got = featurizer(sequence)["tokens"]
        assert got.dtype == torch.long
        assert torch.equal(got, _per_letter_protein(featurizer, sequence.strip().upper()))
    with pytest.raises(InvalidInput, match=r"letters 'J', '1' at positions 4, 5"):
        featurizer("MKTJ1A")
    with pytest.raises(InvalidInput, match="non-amino-acid letters 'É'"):
        featurizer("MKÉ")


@pytest.mark.parametrize(
    "settings",
    [
        {"tokenization": "base"},
        {"tokenization": "kmer", "k": 6},
        {"tokenization": "kmer", "k": 6, "overlapping": True},
        {"tokenization": "kmer", "k": 3},
        {"tokenization": "kmer", "k": 1},
    ],
    ids=lambda s: "-".join(map(str, s.values())),
)
def test_dna_tokens_equal_the_per_letter_tokens(settings):
    promoters = _rows(SHARED / "dna" / "ecoli_promoters_iPromoter2L_benchmark.csv", "sequence")[::4]
    rng = random.Random(0)
    with_n = []  # real promoters with runs of N and ambiguity codes (read as N) put in
    for sequence in promoters[:300]:
        letters = list(sequence)
        for _ in range(rng.randint(1, 4)):
            start = rng.randrange(len(letters))
            letters[start : start + rng.randint(1, 3)] = rng.choice(["N", "NN", "R", "Y"])
        with_n.append("".join(letters))
    featurizer = DnaFeaturizer(max_length=10_000, **settings)
    for sequence in promoters + with_n + ["ACG", "acgun", "N" * 9]:
        assert torch.equal(featurizer(sequence)["tokens"], _per_letter_dna(featurizer, featurizer.sequence(sequence)))
