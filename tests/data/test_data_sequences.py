import gzip

import pytest
from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from kiban.data import DataError, Rejects, detect_kind, read, read_fasta, read_genbank, read_sequence_table
from kiban.data.sequences import clean_sequence

FASTA = """>sp|P69905|HBA_HUMAN Hemoglobin subunit alpha
MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF
DLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL*
>bad1 a J and a digit
MKJ1QR
>dup
MKV
>dup
MKT
>empty_at_end
"""


def _counts(rejects):
    report = rejects.report()
    assert report.read == report.accepted + report.rejected
    return report


def test_fasta_records_ids_locations_and_rejects(tmp_path):
    path = tmp_path / "seqs.fa"
    path.write_text(FASTA)
    rejects = Rejects()
    records = list(read(path, rejects=rejects))
    assert detect_kind(path) == "fasta"
    assert [r.id for r in records] == ["sp|P69905|HBA_HUMAN", "dup"]
    assert records[0].location == f"{path}:line 1" and records[0].modality == "protein"
    assert str(records[0].item.seq).endswith("HAHKL")  # lines joined, the terminal stop dropped
    report = _counts(rejects)
    assert report.by_reason == {"invalid residues": 1, "duplicate id": 1, "no sequence": 1}
    where = {r.reason: r.location for r in report.first_rejects}
    assert where["invalid residues"] == f"{path}:line 4"
    assert where["duplicate id"] == f"{path}:line 8"
    assert where["no sequence"] == f"{path}:line 10"  # a truncated last record is reported, not dropped
    assert "'J', '1' at positions 3, 4" in next(
        r.detail for r in report.first_rejects if r.reason == "invalid residues"
    )


def test_without_a_collector_the_first_bad_record_raises(tmp_path):
    path = tmp_path / "seqs.fa"
    path.write_text(FASTA)
    with pytest.raises(DataError, match="line 4"):
        list(read_fasta(path))


def test_residue_rule_masks_unknown_letters_on_request():
    assert clean_sequence(" mkt ayi\n*", modality="protein") == "MKTAYI"
    assert clean_sequence("MKJZ", modality="protein", unknown="mask") == "MKXZ"  # Z is in the ESM alphabet
    assert (
        clean_sequence("ACGJ-1", modality="dna", unknown="mask") == "ACGN-1"
    )  # gaps/digits still reject later
    rejects = Rejects()
    assert len(list(read_fasta(_write(">a\nMKJ\n"), unknown="mask", rejects=rejects))) == 1


def _write(text, name="x.fa", folder=None):
    import tempfile
    from pathlib import Path

    folder = Path(folder or tempfile.mkdtemp())
    (folder / name).write_text(text)
    return folder / name


def test_gzip_fasta_and_a_stream_that_breaks_off(tmp_path):
    body = "".join(f">s{i}\n{'ACGT' * 50}\n" for i in range(400))
    whole = gzip.compress(body.encode())
    (tmp_path / "ok.fna.gz").write_bytes(whole)
    rejects = Rejects()
    records = list(read(tmp_path / "ok.fna.gz", rejects=rejects))
    assert len(records) == 400 and records[0].modality == "dna" and not rejects.rejected

    (tmp_path / "cut.fna.gz").write_bytes(whole[: len(whole) // 2])
    rejects = Rejects()
    records = list(read(tmp_path / "cut.fna.gz", rejects=rejects))
    report = _counts(rejects)
    assert 0 < len(records) < 400 and report.by_reason == {"truncated or corrupt file": 1}
    assert "after line" in report.first_rejects[0].location
    assert all(len(r.item.seq) == 200 for r in records)  # the record in progress was not passed on half-read


def test_genbank_reads_records_and_reports_a_broken_and_an_unterminated_one(tmp_path):
    good = [
        SeqRecord(
            Seq("ATGGCGTACGATCG" * 5),
            id="NC_000001.1",
            name="LOCUS1",
            description="one",
            annotations={"molecule_type": "DNA"},
        ),
        SeqRecord(
            Seq("TTGACAGCTAGCTCAGTCCTAGGTATAATGCTAGC"),
            id="NC_000002.1",
            name="LOCUS2",
            description="two",
            annotations={"molecule_type": "DNA"},
        ),
    ]
    path = tmp_path / "x.gb"
    SeqIO.write(good, path, "genbank")
    text = path.read_text()
    first_end = text.index("//\n") + 3
    broken = "LOCUS       BROKEN 10 bp DNA linear UNK 01-JAN-1980\nORIGIN\n        1 acgtnotdna!\n//\n"
    path.write_text(text[:first_end] + broken + text[first_end:] + "LOCUS       CUT 5 bp    DNA\nORIGIN\n")
    rejects = Rejects()
    records = list(read(path, rejects=rejects))
    assert [r.id for r in records] == ["NC_000001.1", "NC_000002.1"] and records[0].modality == "dna"
    report = _counts(rejects)
    assert report.rejected == 2 and "truncated record" in report.by_reason
    assert all("line" in r.location for r in report.first_rejects)


def test_sequence_tables_of_the_shared_data(shared_data):
    rejects = Rejects()
    proteins = list(
        read(shared_data / "protein/sequences/enzyme_ec_clean_price149_test.tsv", rejects=rejects)
    )
    assert len(proteins) == 149 and proteins[0].modality == "protein" and "EC number" in proteins[0].fields
    promoters = shared_data / "dna/ecoli_promoters_iPromoter2L_benchmark.csv"
    assert detect_kind(promoters) == "sequence-table"
    rejects = Rejects()
    dna = list(read_sequence_table(promoters, rejects=rejects))
    assert len(dna) == 5720 and dna[0].modality == "dna" and dna[0].fields["label"] in ("0", "1")
    assert _counts(rejects).rejected == 0


def test_real_uniprot_fasta_of_the_shared_data(shared_data):
    rejects = Rejects()
    records = list(read(shared_data / "protein/sequences/uniprot_swissprot_61.fasta", rejects=rejects))
    assert len(records) + rejects.rejected == 61 and rejects.notes["modality"] == "protein"
    assert all(r.id.startswith(("sp|", "tr|")) for r in records)


def test_genbank_of_biopython_written_protein(tmp_path):
    record = SeqRecord(Seq("MKTAYIAKQR"), id="XP_1.1", name="XP_1", annotations={"molecule_type": "protein"})
    SeqIO.write([record], tmp_path / "p.gb", "genbank")
    records = list(read_genbank(tmp_path / "p.gb"))
    assert records[0].modality == "protein" and str(records[0].item.seq) == "MKTAYIAKQR"
