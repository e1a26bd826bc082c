"""Fuzzing the readers: random and mutated FASTA, SMILES and JSONL never crash them.

Collecting, a reader only ever yields records or reports rejects, with read = accepted + rejected;
strict, the only exception is the documented ``DataError``. Accepted items are then accepted by
their modality's featurizer too.
"""

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiban.data import DataError, Rejects, read

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FASTA_TEXT = st.text(
    alphabet=st.sampled_from(list(">\n ;*-.0123456789ACDEFGHIKLMNPQRSTVWYXBZUOJacgtu|\t\r") + ["é", "\x00"]),
    max_size=400,
)
SMILES_TEXT = st.text(
    alphabet=st.sampled_from(list("CNOSPFIBrcl()[]=#@+-123456789%.\\/Hn ,\t\n\"'") + ["\x00"]), max_size=300
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
SEED_FASTA = (
    ">sp|P69905|HBA_HUMAN Hemoglobin\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF\n>x2 second\nMKTAYIAKQRQISFVKSHF*\n"
)
SEED_SMILES = "id,smiles,y\n1,CC(=O)Oc1ccccc1C(=O)O,1\n2,c1ccccc1,0\n3,C[C@H](N)C(=O)O,1\n"


def _mutated(seed: str) -> st.SearchStrategy[bytes]:
    """The seed text with random cuts, insertions and byte flips (and maybe truncated)."""

    @st.composite
    def build(draw):
        data = bytearray(seed.encode())
        for _ in range(draw(st.integers(0, 6))):
            at = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(["insert", "delete", "flip"]))
            if action == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=4))
            elif action == "delete" and data:
                del data[at : at + draw(st.integers(1, 8))]
            elif data:
                data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)

    return build()


def _exercise(content: bytes, name: str, **options):
    """Read once collecting and once strict; check the invariants; return the records."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        rejects = Rejects()
        records = list(read(path, rejects=rejects, **options))
        report = rejects.report()
        assert report.read == report.accepted + report.rejected and report.accepted == len(records)
        assert all(r.id and r.location for r in records) and all(r.location for r in report.first_rejects)
        assert len({r.id for r in records}) == len(records)
        try:
            strict = list(read(path, rejects=None, **options))
        except DataError:
            assert report.rejected
        else:
            assert report.rejected == 0 and len(strict) == len(records)
    return records


@SETTINGS
@given(
    st.one_of(
        FASTA_TEXT.map(str.encode),
        _mutated(SEED_FASTA),
        st.binary(max_size=200),
        st.binary(max_size=100).map(lambda tail: b"\x1f\x8b" + tail),  # claims to be gzip, is not
        st.tuples(st.just(gzip.compress(SEED_FASTA.encode() * 20)), st.integers(0, 200)).map(
            lambda z: z[0][: -1 - z[1]]
        ),
    )
)
def test_fasta(content):
    from kiban.encoders.dna import DnaFeaturizer
    from kiban.encoders.protein import ProteinFeaturizer

    for record in _exercise(content, "x.fa"):
        featurizer = (
            ProteinFeaturizer(max_length=10**6)
            if record.modality == "protein"
            else DnaFeaturizer(max_length=10**6)
        )
        featurizer(record.item)


@SETTINGS
@given(st.one_of(SMILES_TEXT.map(lambda text: ("id,smiles\n" + text).encode()), _mutated(SEED_SMILES)))
def test_smiles_table(content):
    from kiban.encoders.molecule import MoleculeFeaturizer

    try:
        records = _exercise(content, "x.csv", kind="smiles", smiles_column="smiles")
    except ValueError as error:  # a header mutated so that no SMILES column is left: a usage error, stated
        assert "SMILES column" in str(error) and not isinstance(error, DataError)
        return
    for record in records:
        MoleculeFeaturizer()(record.item)


@SETTINGS
@given(SMILES_TEXT.map(str.encode))
def test_smi_lines(content):
    _exercise(content, "x.smi")


def _instruction_lines(values):
    return "".join(json.dumps(v) + "\n" for v in values).encode()


VALID = {
    "id": "a",
    "messages": [
        {"role": "user", "content": "Is <protein> an enzyme? <molecule>"},
        {"role": "assistant", "content": "No."},
    ],
    "inputs": {"protein": [{"fasta": "seqs.fa", "id": "x2"}], "molecule": ["CCO"]},
}


@SETTINGS
@given(
    st.one_of(
        st.lists(JSON, max_size=5).map(lambda values: _instruction_lines([VALID] + values)),
        _mutated(json.dumps(VALID) + "\n" + json.dumps({**VALID, "id": "b"}) + "\n"),
    )
)
def test_instruction_jsonl(content):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "seqs.fa").write_text(SEED_FASTA)
        path = Path(folder) / "data.jsonl"
        path.write_bytes(content)
        rejects = Rejects()
        records = list(read(path, kind="instructions", rejects=rejects))
        report = rejects.report()
        assert (
            report.read
            == report.accepted + report.rejected
            # JSON Lines break on "\n" only: a lone "\r" is whitespace inside a record
            == len([line for line in content.split(b"\n") if line.strip()])
        )
        try:
            list(read(path, kind="instructions"))
        except DataError:
            assert report.rejected
        assert all(set(r.item) == {"id", "messages", "inputs"} for r in records)


@SETTINGS
@given(st.lists(JSON, max_size=6).map(_instruction_lines))
def test_text_jsonl(content):
    _exercise(content, "x.jsonl", kind="text")
