import json
import os

import numpy as np
import pytest
import tifffile
from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from kiban.data import InstructionSource, Rejects, read, read_instructions
from kiban.encoders.cell import make_adata


def _chat(question, answer="ok"):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture
def dataset(tmp_path, nci):
    """A dataset folder with every kind of referenced file, and a secret file outside it."""
    root = tmp_path / "ds"
    (root / "seqs").mkdir(parents=True)
    (root / "seqs" / "targets.fa").write_text(
        ">sp|P23219|PGH1_HUMAN COX-1\nMSRSLLLRFLLFLLLLPPLPVLLA\n>Q1\nMKJ\n"
    )
    SeqIO.write(
        [
            SeqRecord(
                Seq("TTGACAGCTAGCTCAGTCCTAGGTATAATGCTAGC"), id="PROM1.1", annotations={"molecule_type": "DNA"}
            )
        ],
        root / "seqs" / "promoters.gb",
        "genbank",
    )
    make_adata(20, 60, seed=1).write_h5ad(root / "cells.h5ad")
    (root / "img").mkdir()
    tifffile.imwrite(
        root / "img" / "a.tif",
        np.random.default_rng(0).integers(0, 255, (2, 3, 24, 24), dtype=np.uint8),
        metadata={"axes": "ZCYX"},
        imagej=False,
    )
    (root / "mols.sdf").write_text(
        (nci / "first_200.props.sdf").read_text().split("$$$$\n")[0].replace("\n", "aspirin\n", 1) + "$$$$\n"
    )
    (tmp_path / "secret.fa").write_text(">x\nMKT\n")
    os.symlink(tmp_path / "secret.fa", root / "seqs" / "link.fa")
    return root


def _write(root, records):
    path = root / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = [
    {
        "id": "inline",
        "messages": _chat("Does <molecule> bind <protein>? <text>"),
        "inputs": {
            "molecule": ["CC(=O)Oc1ccccc1C(=O)O"],
            "protein": [{"sequence": "MKTAYIAKQR"}],
            "text": ["COX-1 binds aspirin."],
        },
    },
    {
        "id": "refs",
        "messages": _chat("<protein> <dna> <cell> <cell> <image> <molecule>"),
        "inputs": {
            "protein": [{"fasta": "seqs/targets.fa", "id": "P23219"}],
            "dna": [{"genbank": "seqs/promoters.gb", "id": "PROM1.1"}],
            "cell": [{"h5ad": "cells.h5ad", "obs": "cell3"}, {"h5ad": "cells.h5ad", "row": 7}],
            "image": [{"path": "img/a.tif"}],
            "molecule": [{"sdf": "mols.sdf", "id": "aspirin"}],
        },
    },
]


def test_every_input_form_resolves_to_the_raw_item_its_featurizer_takes(dataset):
    records = list(read_instructions(_write(dataset, GOOD)))
    assert [r.id for r in records] == ["inline", "refs"] and records[1].modality == "instruction"
    inputs = records[1].item["inputs"]
    assert str(inputs["protein"][0].seq) == "MSRSLLLRFLLFLLLLPPLPVLLA"
    assert str(inputs["dna"][0].seq).startswith("TTGACA")
    assert set(inputs["cell"][0]) == {"genes", "values"} and inputs["image"][0].shape == (2, 3, 24, 24)
    assert "M  END" in inputs["molecule"][0]

    from kiban.tiny import tiny_model

    model = tiny_model()
    batch = model.prepare([r.item for r in records])
    assert batch.input_ids.shape[0] == 2 and set(batch.features) == {
        "protein",
        "dna",
        "cell",
        "image",
        "molecule",
        "text",
    }


BAD = [
    (
        {
            "id": "escape",
            "messages": _chat("<protein>"),
            "inputs": {"protein": [{"fasta": "../secret.fa", "id": "x"}]},
        },
        "path outside dataset root",
    ),
    (
        {
            "id": "absolute",
            "messages": _chat("<protein>"),
            "inputs": {"protein": [{"fasta": "/etc/hostname", "id": "x"}]},
        },
        "path outside dataset root",
    ),
    (
        {
            "id": "symlink",
            "messages": _chat("<protein>"),
            "inputs": {"protein": [{"fasta": "seqs/link.fa", "id": "x"}]},
        },
        "path outside dataset root",
    ),
    ({"id": "missing", "messages": _chat("<image>"), "inputs": {"image": ["img/nope.tif"]}}, "missing file"),
    (
        {
            "id": "unknown-id",
            "messages": _chat("<protein>"),
            "inputs": {"protein": [{"fasta": "seqs/targets.fa", "id": "P0"}]},
        },
        "unknown reference",
    ),
    (
        {
            "id": "bad-residue",
            "messages": _chat("<protein>"),
            "inputs": {"protein": [{"fasta": "seqs/targets.fa", "id": "Q1"}]},
        },
        "invalid residues",
    ),
    (
        {
            "id": "no-cell",
            "messages": _chat("<cell>"),
            "inputs": {"cell": [{"h5ad": "cells.h5ad", "obs": "cell999"}]},
        },
        "unknown reference",
    ),
    (
        {"id": "count", "messages": _chat("<molecule> and <molecule>"), "inputs": {"molecule": ["CCO"]}},
        "placeholder mismatch",
    ),
    (
        {"id": "smiles", "messages": _chat("<molecule>"), "inputs": {"molecule": ["C1CC("]}},
        "unparseable SMILES",
    ),
    ({"id": "no-messages", "inputs": {}}, "invalid record"),
    ({"id": "modality", "messages": _chat("hi"), "inputs": {"rna": ["ACGU"]}}, "invalid record"),
    ("{broken json", "invalid JSON"),
]


def test_bad_records_are_located_and_the_rest_of_the_file_is_read(dataset):
    lines = [GOOD[0]] + [record for record, _ in BAD] + [GOOD[1]]
    path = _write(dataset, lines)
    rejects = Rejects()
    records = list(read(path, rejects=rejects))
    assert [r.id for r in records] == ["inline", "refs"]
    report = rejects.report()
    assert report.read == report.accepted + report.rejected == len(lines)
    got = [(r.location, r.reason) for r in report.first_rejects]
    assert got == [(f"{path}:line {i + 2}", reason) for i, (_, reason) in enumerate(BAD)]


def test_a_wider_root_allows_paths_into_it(dataset):
    record = {
        "id": "up",
        "messages": _chat("<protein>"),
        "inputs": {"protein": [{"fasta": "../secret.fa", "id": "x"}]},
    }
    path = _write(dataset, [record])
    assert [r.id for r in read_instructions(path, root=dataset.parent)] == ["up"]


def test_random_access_source_matches_the_sequential_reader(dataset):
    path = _write(dataset, [GOOD[0], "", BAD[3][0], GOOD[1]])
    source = InstructionSource(path)
    assert len(source) == 3  # blank lines are not records
    results = source.read_many([2, 0, 1])
    assert [r.id for r in results] == ["refs", "inline", "missing"]
    assert results[2].location == f"{path}:line 3"
    assert list(source.lengths()) == [len(line) + 1 for line in path.read_text().splitlines() if line]
