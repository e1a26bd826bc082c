"""Data layer: readers for the files biologists have, instruction records, datasets and batching.

    from kiban.data import read, Rejects, rejects_log

    with rejects_log("runs/embed") as rejects:               # writes rejects.jsonl + counts.json
        for record in read("proteins.fa.gz", rejects=rejects):
            ...                                               # record.id, .item, .location

Readers (``list_readers()``): fasta, genbank, sequence-table, h5ad, image, smiles, sdf, text,
text-table, instructions. Each yields ``Record``s and reports bad input to a ``Rejects``
collector with its location, then reads on. ``KibanDataModule`` (Lightning; the one data module
that training runs on, resumable mid-epoch) is imported lazily: ``import kiban.data`` does not
import Lightning. See docs/data.md.
"""

from typing import Any

from kiban.data.batching import chunk_shuffled_batches, length_bucketed_batches, padding_efficiency
from kiban.data.cell_batches import CellBatchFeaturizer
from kiban.data.cells import CellPreprocessing, CellRows, H5adReader, read_h5ad
from kiban.data.datasets import (
    FeaturizerTransform,
    ProcessorTransform,
    RecordDataset,
    RecordList,
    Sample,
    ShardedStream,
    collate_samples,
)
from kiban.data.images import read_images
from kiban.data.instructions import InstructionSource, read_instructions
from kiban.data.molecules import read_sdf, read_smiles
from kiban.data.readers import detect_kind, list_readers, read, register_reader
from kiban.data.rejects import DataError, ReadReport, Record, Reject, Rejects, merge_rejects, rejects_log
from kiban.data.resumable import ResumableBatches, SeededRecords, TrainBatch, open_source, seeded
from kiban.data.sequences import read_fasta, read_genbank, read_sequence_table
from kiban.data.sharding import Shard, current_shard, shard_batches, split_evenly
from kiban.data.text import read_text, read_text_table

__all__ = [
    "CellBatchFeaturizer",
    "CellPreprocessing",
    "CellRows",
    "DataError",
    "FeaturizerTransform",
    "H5adReader",
    "InstructionSource",
    "KibanDataModule",
    "ProcessorTransform",
    "ReadReport",
    "Record",
    "RecordDataset",
    "RecordList",
    "Reject",
    "Rejects",
    "ResumableBatches",
    "Sample",
    "SeededRecords",
    "Shard",
    "ShardedStream",
    "TrainBatch",
    "chunk_shuffled_batches",
    "collate_samples",
    "current_shard",
    "detect_kind",
    "length_bucketed_batches",
    "list_readers",
    "merge_rejects",
    "open_source",
    "padding_efficiency",
    "read",
    "read_fasta",
    "read_genbank",
    "read_h5ad",
    "read_images",
    "read_instructions",
    "read_sdf",
    "read_sequence_table",
    "read_smiles",
    "read_text",
    "read_text_table",
    "register_reader",
    "rejects_log",
    "seeded",
    "shard_batches",
    "split_evenly",
]


def __getattr__(name: str) -> Any:
    # The DataModule needs Lightning; the rest of the data layer (and kiban.encoders / fusion) must not.
    if name == "KibanDataModule":
        from kiban.data.datamodule import KibanDataModule

        return KibanDataModule
    raise AttributeError(f"module 'kiban.data' has no attribute {name!r}")
