"""Protein and DNA sequence readers: FASTA and GenBank through Biopython, and sequence tables.

Each record of a file is cut out by its own lines (``>`` headers; ``LOCUS`` ... ``//``) and parsed
alone with ``Bio.SeqIO.read``, so one broken record is one located reject and the rest of the file
is still read. Plain or gzip (detected by content). Records come out as ``Bio.SeqRecord`` items
holding the cleaned sequence, which the protein and DNA featurizers take as they are.

Residue rule (documented in docs/data.md):

1. whitespace inside the sequence is removed and case is ignored;
2. one ``*`` at the very end (a translation stop) is dropped;
3. the letters the modality's featurizer accepts are kept: for proteins the 20 amino acids and
   X, B, Z, U, O (``kiban.encoders.protein``); for DNA A, C, G, T, U, N and the IUPAC codes
   (``kiban.encoders.dna``);
4. anything else rejects the record, naming the letters and their positions, unless
   ``unknown="mask"``: then other letters A-Z become the unknown residue (X for proteins, N for
   DNA); digits, gaps and stops inside the sequence still reject.

The modality is ``"protein"`` or ``"dna"``; None guesses it from the extension (.faa protein;
.fna/.ffn/.frn and GenBank DNA) or else from the letters of the first records.
"""

from __future__ import annotations

import io
import string
import sys
import warnings
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from kiban.data._io import (
    TruncatedFile,
    csv_rows,
    numbered_lines,
    pick_column,
    row_fits_header,
    row_id,
    strip_gz,
    table_header,
)
from kiban.data.readers import UniqueIds, collector, register_reader
from kiban.data.rejects import Record, Rejects
from kiban.encoders.base import InvalidInput

__all__ = [
    "check_sequence",
    "clean_sequence",
    "fasta_record",
    "read_fasta",
    "read_genbank",
    "read_sequence_table",
]

FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fna", ".ffn", ".frn", ".fas", ".mpfa")
GENBANK_SUFFIXES = (".gb", ".gbk", ".gbff", ".genbank", ".gpff")
_DNA_GUESS = set("ACGTUN")


@cache
def _featurizer(modality: str) -> Any:
    """The modality's own featurizer, with no length limit: the data layer checks letters with it."""
    if modality == "protein":
        from kiban.encoders.protein import ProteinFeaturizer

        return ProteinFeaturizer(max_length=sys.maxsize)
    if modality == "dna":
        from kiban.encoders.dna import DnaFeaturizer

        return DnaFeaturizer(tokenization="base", max_length=sys.maxsize)
    raise ValueError(f"modality must be 'protein' or 'dna', got {modality!r}")


@cache
def _accepted_letters(modality: str) -> frozenset[str]:
    """The upper-case letters the featurizer accepts, asked of the featurizer itself (one rule)."""
    accepted = set()
    for letter in string.ascii_uppercase:
        try:
            _featurizer(modality)(letter, item_id="probe")
        except InvalidInput:
            continue
        accepted.add(letter)
    return frozenset(accepted)


def clean_sequence(sequence: str, *, modality: str, unknown: str = "reject") -> str:
    """Apply steps 1, 2 and (with ``unknown="mask"``) 4 of the residue rule; the featurizer does 3."""
    if unknown not in ("reject", "mask"):
        raise ValueError(f"unknown must be 'reject' or 'mask', got {unknown!r}")
    cleaned = "".join(sequence.split()).upper()
    if cleaned.endswith("*"):
        cleaned = cleaned[:-1]
    if unknown == "mask":
        accepted = _accepted_letters(modality)
        fill = "X" if modality == "protein" else "N"
        cleaned = "".join(c if c in accepted or c not in string.ascii_uppercase else fill for c in cleaned)
    return cleaned


def check_sequence(
    record: SeqRecord, *, modality: str, unknown: str = "reject", location: str, rejects: Rejects
) -> SeqRecord | None:
    """The record with its sequence cleaned by the residue rule, or None after rejecting it."""
    try:
        text = str(record.seq)
    except Exception as error:  # Biopython's UndefinedSequenceError (a GenBank CONTIG record), ...
        rejects.reject(
            id=record.id,
            location=location,
            reason="no sequence",
            detail=f"the record has no sequence ({error})",
        )
        return None
    sequence = clean_sequence(text, modality=modality, unknown=unknown)
    if not sequence:
        rejects.reject(
            id=record.id,
            location=location,
            reason="no sequence",
            detail="the record has an empty sequence (a truncated file, or a header without sequence lines)",
        )
        return None
    try:
        _featurizer(modality)(sequence, item_id=record.id)
    except InvalidInput as error:
        reason = "invalid residues" if "letters" in error.problem else f"invalid {modality} sequence"
        rejects.reject(id=record.id, location=location, reason=reason, detail=str(error))
        return None
    return SeqRecord(Seq(sequence), id=record.id, name=record.name, description=record.description)


def _guess_modality(path: Path, sequences: list[str]) -> str:
    name = strip_gz(path)
    if name.endswith(".faa"):
        return "protein"
    if name.endswith((".fna", ".ffn", ".frn")):
        return "dna"
    letters = set("".join(sequences).upper()) - set("*-. \t")
    return "dna" if letters and letters <= _DNA_GUESS else "protein"


# ----------------------------------------------------------------------------------------------
# FASTA


def _fasta_blocks(path: Path, rejects: Rejects) -> Iterator[tuple[int, list[str]]]:
    """(line number of the header, the record's lines) per record; a truncated tail is rejected."""
    header, lines = 0, []
    junk: list[int] = []
    try:
        for number, line in numbered_lines(path):
            if line.startswith(">"):
                if header:
                    yield header, lines
                elif junk:
                    _reject_junk(path, junk, rejects)
                header, lines = number, [line]
            elif header:
                lines.append(line)
            elif line.strip() and not line.startswith(
                ";"
            ):  # ';' comments before the first record are allowed
                junk.append(number)
    except TruncatedFile as error:
        rejects.reject(
            id=_fasta_id(lines[0]) if header else None,
            location=error.location,
            reason="truncated or corrupt file",
            detail=error.detail + ("; the record in progress was dropped" if header else ""),
        )
        return
    if header:
        yield header, lines
    elif junk:
        _reject_junk(path, junk, rejects)


def _reject_junk(path: Path, junk: list[int], rejects: Rejects) -> None:
    rejects.reject(
        id=None,
        location=f"{path}:line {junk[0]}" + (f"-{junk[-1]}" if len(junk) > 1 else ""),
        reason="text outside a record",
        detail=f"{len(junk)} line(s) before the first '>' header are not FASTA",
    )


def fasta_record(lines: Sequence[str]) -> SeqRecord:
    """One FASTA record (header line first) parsed by Biopython; ValueError when it cannot be."""
    return SeqIO.read(io.StringIO("\n".join(lines) + "\n"), "fasta")


def _fasta_id(header: str) -> str:
    return header[1:].split(maxsplit=1)[0] if header[1:].split() else ""


@register_reader("fasta", suffixes=FASTA_SUFFIXES, description="FASTA, protein or DNA (Biopython SeqIO)")
def read_fasta(
    path: str | Path,
    *,
    modality: str | None = None,
    unknown: str = "reject",
    rejects: Rejects | None = None,
) -> Iterator[Record]:
    """Records of a FASTA file (plain or gzip): id = the first word of the header."""
    path, rejects, ids = Path(path), collector(rejects), UniqueIds()
    blocks = _fasta_blocks(path, rejects)
    if modality is None:
        first = [block for _, block in zip(range(20), blocks, strict=False)]  # the first 20 records
        modality = _guess_modality(path, ["".join(lines[1:]) for _, lines in first])
        blocks = _chain(first, blocks)
    rejects.note("modality", modality)
    for header, lines in blocks:
        location = f"{path}:line {header}"
        try:
            record = fasta_record(lines)
        except ValueError as error:
            rejects.reject(
                id=_fasta_id(lines[0]) or None,
                location=location,
                reason="unreadable record",
                detail=f"Biopython cannot parse the record: {error}",
            )
            continue
        record.id = record.id or f"{path.name}:{header}"
        checked = check_sequence(
            record, modality=modality, unknown=unknown, location=location, rejects=rejects
        )
        if checked is not None and ids.accept(checked.id, location, rejects):
            rejects.accept()
            yield Record(checked.id, modality, checked, location)


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


# ----------------------------------------------------------------------------------------------
# GenBank


def _genbank_blocks(path: Path, rejects: Rejects) -> Iterator[tuple[int, list[str]]]:
    """(line of LOCUS, the record's lines up to ``//``); a record without ``//`` is rejected."""
    start, lines = 0, []
    try:
        for number, line in numbered_lines(path):
            if not start:
                if line.startswith("LOCUS"):
                    start, lines = number, [line]
                elif line.strip():
                    rejects.reject(
                        id=None,
                        location=f"{path}:line {number}",
                        reason="text outside a record",
                        detail="a GenBank record must start with a LOCUS line",
                    )
                continue
            if line.startswith("LOCUS"):  # a new record before the old one ended
                rejects.reject(
                    id=_locus_name(lines[0]),
                    location=f"{path}:line {start}",
                    reason="truncated record",
                    detail=f"the record has no '//' terminator before the next LOCUS at line {number}",
                )
                start, lines = number, [line]
                continue
            lines.append(line)
            if line.startswith("//"):
                yield start, lines
                start, lines = 0, []
    except TruncatedFile as error:
        rejects.reject(
            id=_locus_name(lines[0]) if start else None,
            location=error.location,
            reason="truncated or corrupt file",
            detail=error.detail,
        )
        return
    if start:
        rejects.reject(
            id=_locus_name(lines[0]),
            location=f"{path}:line {start}",
            reason="truncated record",
            detail="the last record has no '//' terminator (a truncated file?)",
        )


def _locus_name(line: str) -> str | None:
    words = line.split()
    return words[1] if len(words) > 1 else None


@register_reader("genbank", suffixes=GENBANK_SUFFIXES, description="GenBank / GenPept (Biopython SeqIO)")
def read_genbank(
    path: str | Path,
    *,
    modality: str | None = None,
    unknown: str = "reject",
    rejects: Rejects | None = None,
) -> Iterator[Record]:
    """Records of a GenBank file (plain or gzip): id = accession.version (the LOCUS name if none)."""
    path, rejects, ids = Path(path), collector(rejects), UniqueIds()
    for start, lines in _genbank_blocks(path, rejects):
        location = f"{path}:line {start}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Biopython warns about lenient fixes; errors still raise
                record = SeqIO.read(io.StringIO("\n".join(lines) + "\n"), "genbank")
        except Exception as error:  # Biopython's parser raises ValueError and its own error types
            rejects.reject(
                id=_locus_name(lines[0]),
                location=location,
                reason="unreadable record",
                detail=f"Biopython cannot parse the record: {type(error).__name__}: {error}",
            )
            continue
        kind = modality or ("protein" if record.annotations.get("molecule_type") == "protein" else "dna")
        checked = check_sequence(record, modality=kind, unknown=unknown, location=location, rejects=rejects)
        if checked is not None and ids.accept(checked.id, location, rejects):
            rejects.accept()
            yield Record(checked.id, kind, checked, location)


# ----------------------------------------------------------------------------------------------
# Sequence tables


def _sniff_sequence_table(path: Path) -> bool:
    header = [name.lower() for name in table_header(path)]
    return "sequence" in header or "seq" in header


@register_reader(
    "sequence-table",
    suffixes=(".csv", ".tsv"),
    description="CSV/TSV with a sequence column (protein or DNA)",
    sniff=_sniff_sequence_table,
)
def read_sequence_table(
    path: str | Path,
    *,
    modality: str | None = None,
    sequence_column: str | None = None,
    id_column: str | None = None,
    unknown: str = "reject",
    rejects: Rejects | None = None,
) -> Iterator[Record]:
    """Records of a table with one sequence a row; ids from ``id_column`` (or "id", "name", ...,
    else ``file:line``). Comma-separated unless the name ends in .tsv.
    """
    path, rejects, ids = Path(path), collector(rejects), UniqueIds()
    rows = csv_rows(path, delimiter="\t" if strip_gz(path).endswith(".tsv") else ",", rejects=rejects)
    header = next((row for _, row in rows), None)
    if header is None:
        return
    column = pick_column(
        header, wanted=sequence_column, candidates=("sequence", "seq"), what="sequence", path=path
    )
    if column is None:
        raise ValueError(
            f"{path}: no sequence column (looked for 'sequence', 'seq'); columns: {', '.join(header)}"
        )
    id_at = pick_column(
        header,
        wanted=id_column,
        candidates=("id", "entry", "accession", "name", "target_id"),
        what="id",
        path=path,
    )
    pending: list[tuple[int, list[str]]] = []
    if modality is None:
        pending = [row for _, row in zip(range(20), rows, strict=False)]  # the first 20 rows
        modality = _guess_modality(path, [fields[column] for _, fields in pending if len(fields) > column])
    rejects.note("modality", modality)
    for line, row in _chain(pending, rows):
        location = f"{path}:line {line}"
        record_id = row_id(row, id_at, path, line)
        if not row_fits_header(row, header, record_id=record_id, location=location, rejects=rejects):
            continue
        record = SeqRecord(Seq(row[column]), id=record_id, description="")
        checked = check_sequence(
            record, modality=modality, unknown=unknown, location=location, rejects=rejects
        )
        if checked is not None and ids.accept(record_id, location, rejects):
            rejects.accept()
            fields = {
                name.strip(): value
                for i, (name, value) in enumerate(zip(header, row, strict=True))
                if i != column
            }
            yield Record(record_id, modality, checked, location, fields)
