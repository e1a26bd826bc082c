import random

import pytest

from kiban.data.batching import length_bucketed_batches, padding_efficiency


def test_every_index_once_and_padding_below_random_batching():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5.5, 0.6)) + 1 for _ in range(1000)]
    batches = length_bucketed_batches(lengths, batch_size=16, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    random_batches = [list(range(i, min(i + 16, 1000))) for i in range(0, 1000, 16)]
    assert padding_efficiency(lengths, batches) > padding_efficiency(lengths, random_batches) + 0.2
    assert length_bucketed_batches(lengths, batch_size=16, seed=3) == batches


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        length_bucketed_batches([1, 2], batch_size=0)
