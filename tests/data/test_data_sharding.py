import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from kiban.data import H5adReader, Record, RecordList, Shard, ShardedStream, shard_batches, split_evenly
from kiban.encoders.cell import make_adata


def _ids_seen(stream, *, world_size, num_workers):
    """Ids yielded by every rank, each through its own DataLoader with ``num_workers`` workers."""
    per_rank = []
    for rank in range(world_size):
        stream.set_distributed(rank=rank, world_size=world_size)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        batches = [ids for ids, _ in loader]
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_record_exactly_once_for_any_world_size_and_workers(world_size, num_workers):
    lengths = random.Random(1).choices(range(5, 300), k=101)  # 101: no world size divides it
    records = RecordList([Record(f"r{i}", "text", "x" * n, f"f:line {i + 1}") for i, n in enumerate(lengths)])
    stream = ShardedStream(records, batch_size=4, pool_batches=3, with_ids=True, seed=7)
    stream.set_epoch(2)
    per_rank = _ids_seen(stream, world_size=world_size, num_workers=num_workers)
    seen = Counter(i for batches in per_rank for ids in batches for i in ids)
    assert set(seen) == {r.id for r in records.records} and max(seen.values()) == 1
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of steps on every rank
    assert all(len(ids) <= 4 for batches in per_rank for ids in batches)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 2), (4, 1)])
def test_h5ad_rows_in_shuffled_chunks_each_once(tmp_path, world_size, num_workers):
    make_adata(203, 30, seed=3).write_h5ad(tmp_path / "c.h5ad")
    stream = ShardedStream(
        H5adReader(tmp_path / "c.h5ad", chunk_size=16),
        batch_size=8,
        plan="chunks",
        chunk_size=16,
        with_ids=True,
        even_batches=False,
    )
    seen = Counter(
        i
        for batches in _ids_seen(stream, world_size=world_size, num_workers=num_workers)
        for ids in batches
        for i in ids
    )
    assert sorted(seen) == sorted(f"cell{i}" for i in range(203)) and max(seen.values()) == 1


def test_plans_are_deterministic_and_change_with_the_epoch():
    records = RecordList([Record(f"r{i}", "text", "x" * (i % 17 + 1), "") for i in range(60)])
    a = ShardedStream(records, batch_size=5, seed=3)
    b = ShardedStream(records, batch_size=5, seed=3)
    assert a.plan() == b.plan()
    a.set_epoch(1)
    assert a.plan() != b.plan() and sorted(i for batch in a.plan() for i in batch) == list(range(60))


def test_split_evenly_never_repeats_and_refuses_what_cannot_be_done():
    rng = random.Random(0)
    for _ in range(200):
        n, size, parts = rng.randint(1, 60), rng.randint(1, 9), rng.randint(1, 6)
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        try:
            even = split_evenly(batches, parts)
        except ValueError as error:
            assert "cannot give each" in str(error)
            assert -(-len(batches) // parts) * parts > n
            continue
        assert len(even) % parts == 0 and all(even)
        assert sorted(i for b in even for i in b) == list(range(n))
        shards = [shard_batches(batches, Shard(rank=r, world_size=parts)) for r in range(parts)]
        assert len({len(s) for s in shards}) == 1


def test_uneven_mode_for_inference_just_partitions():
    batches = [[0, 1, 2], [3, 4], [5]]
    shards = [
        shard_batches(batches, Shard(rank=r, world_size=4, worker=w, num_workers=2), even=False)
        for r in range(4)
        for w in range(2)
    ]
    assert sorted(i for s in shards for b in s for i in b) == [0, 1, 2, 3, 4, 5]


def test_inference_over_ranks_neither_drops_nor_duplicates_with_rejects(tmp_path):
    """Every record ends up exactly once: in one rank's output, or in the rejects file."""
    import json

    from kiban.data import InstructionSource, ProcessorTransform, merge_rejects
    from kiban.tiny import tiny_model

    lines = []
    for i in range(37):
        smiles = "C1CC(" if i % 9 == 4 else "C" * (1 + i % 5) + "O"
        lines.append(
            json.dumps(
                {
                    "id": f"m{i}",
                    "messages": [{"role": "user", "content": "<molecule>?"}],
                    "inputs": {"molecule": [smiles]},
                }
            )
        )
    lines.insert(10, "{not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    model = tiny_model(["molecule"])
    stream = ShardedStream(
        InstructionSource(tmp_path / "in.jsonl"),
        transform=ProcessorTransform(model.processor),
        batch_size=4,
        plan="sequential",
        even_batches=False,
        with_ids=True,
        rejects_dir=tmp_path / "shards",
        split="predict",
    )
    seen = Counter(
        i for batches in _ids_seen(stream, world_size=3, num_workers=2) for ids in batches for i in ids
    )
    report = merge_rejects(tmp_path / "shards")
    rejected = [r.id for r in report.first_rejects]
    assert max(seen.values()) == 1 and not set(seen) & set(rejected)
    assert sorted(seen) + sorted(r for r in rejected if r) == sorted(
        f"m{i}" for i in range(37) if i % 9 != 4
    ) + sorted(f"m{i}" for i in range(37) if i % 9 == 4)
    assert (report.read, report.rejected) == (38, 5)  # 4 bad SMILES + the line that is not JSON


class _Upper:
    """A transform that rejects any item with a lower-case letter."""

    def __call__(self, record):
        from kiban.encoders.base import InvalidInput

        if record.item != record.item.upper():
            raise InvalidInput("text", record.id, "lower case")
        return record.item

    def collate(self, values):
        return list(values)


def test_a_rank_whose_whole_batch_is_rejected_stops_instead_of_falling_a_step_behind():
    from kiban.data import DataError

    items = ["AA", "BB", "CC", "DD", "ee", "ff", "GG", "HH"]  # batch 2 (rank 1's first) is all rejects
    records = RecordList([Record(f"r{i}", "text", s, f"f:line {i + 1}") for i, s in enumerate(items)])
    stream = ShardedStream(records, transform=_Upper(), batch_size=2, plan="sequential", with_ids=True)
    stream.set_distributed(rank=0, world_size=2)
    assert len(list(stream)) == 2
    stream.set_distributed(rank=1, world_size=2)
    with pytest.raises(DataError, match=r"r4 \(f:line 5\), r5 \(f:line 6\)"):
        list(stream)
    # inference has no lockstep to keep: it skips the batch and reads on
    stream = ShardedStream(
        records, transform=_Upper(), batch_size=2, plan="sequential", with_ids=True, even_batches=False
    )
    stream.set_distributed(rank=1, world_size=2)
    assert [ids for ids, _ in stream] == [["r6", "r7"]]
