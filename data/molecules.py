"""Molecule readers: SMILES tables (CSV / TSV / .smi) and SDF files, checked with RDKit.

Every molecule is parsed by the molecule encoder's own featurizer (``MoleculeFeaturizer.parse``),
so the data layer accepts exactly what the model can featurize; a molecule RDKit cannot parse or
sanitize is a reject carrying its row and RDKit's reason. Items are SMILES strings (tables) or
mol blocks (SDF), which the featurizer takes as they are; a table's other columns ride along in
``Record.fields`` (labels for fine-tuning).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

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

__all__ = ["read_sdf", "read_smiles"]

SMILES_COLUMNS = ("smiles", "canonical_smiles", "smi", "mol", "smiles_string", "drug")
ID_COLUMNS = ("id", "name", "compound id", "compound_id", "mol_id", "drug_id", "molecule_chembl_id", "cid")


@cache
def molecule_featurizer() -> Any:
    from kiban.encoders.molecule import MoleculeFeaturizer

    return MoleculeFeaturizer()


def _parses(item: str, *, record_id: str, location: str, rejects: Rejects, reason: str) -> bool:
    try:
        molecule_featurizer().parse(item, item_id=record_id)
    except InvalidInput as error:
        rejects.reject(id=record_id, location=location, reason=reason, detail=str(error))
        return False
    return True


def _sniff_smiles_table(path: Path) -> bool:
    return any(name.strip().lower() in SMILES_COLUMNS for name in table_header(path))


@register_reader(
    "smiles",
    suffixes=(".smi", ".smiles", ".csv", ".tsv"),
    description="SMILES: CSV/TSV with a SMILES column, or .smi (SMILES [name] per line); RDKit",
    sniff=_sniff_smiles_table,
)
def read_smiles(
    path: str | Path,
    *,
    smiles_column: str | None = None,
    id_column: str | None = None,
    rejects: Rejects | None = None,
) -> Iterator[Record]:
    """Records of SMILES, one per row; ids from ``id_column`` (or a column such as "id", "name"),
    from the second field of a .smi line, or else ``file:line``.
    """
    path = Path(path)
    if strip_gz(path).endswith((".smi", ".smiles")):
        yield from _read_smi(path, collector(rejects))
    else:
        yield from _read_smiles_table(path, smiles_column, id_column, collector(rejects))


def _read_smi(path: Path, rejects: Rejects) -> Iterator[Record]:
    ids = UniqueIds()
    try:
        for line, text in numbered_lines(path):
            words = text.split(maxsplit=1)
            if not words or text.startswith("#"):
                continue
            if line == 1 and words[0].lower() in SMILES_COLUMNS:
                continue  # a header line
            location = f"{path}:line {line}"
            record_id = words[1].strip() if len(words) > 1 else f"{path.name}:{line}"
            if _parses(
                words[0], record_id=record_id, location=location, rejects=rejects, reason="unparseable SMILES"
            ):
                if ids.accept(record_id, location, rejects):
                    rejects.accept()
                    yield Record(record_id, "molecule", words[0], location)
    except TruncatedFile as error:
        rejects.reject(
            id=None, location=error.location, reason="truncated or corrupt file", detail=error.detail
        )


def _read_smiles_table(
    path: Path, smiles_column: str | None, id_column: str | None, rejects: Rejects
) -> Iterator[Record]:
    ids = UniqueIds()
    rows = csv_rows(path, delimiter="\t" if strip_gz(path).endswith(".tsv") else ",", rejects=rejects)
    header = next((row for _, row in rows), None)
    if header is None:
        return
    column = pick_column(header, wanted=smiles_column, candidates=SMILES_COLUMNS, what="SMILES", path=path)
    if column is None:
        raise ValueError(
            f"{path}: no SMILES column (looked for {', '.join(SMILES_COLUMNS)}); "
            f"columns: {', '.join(header)}; "
            "name it with smiles_column="
        )
    id_at = pick_column(header, wanted=id_column, candidates=ID_COLUMNS, what="id", path=path)
    names = [name.strip() for name in header]
    for line, row in rows:
        location = f"{path}:line {line}"
        record_id = row_id(row, id_at, path, line)
        if not row_fits_header(row, header, record_id=record_id, location=location, rejects=rejects):
            continue
        smiles = row[column].strip()  # e.g. ESOL's first row has a trailing space
        if _parses(
            smiles, record_id=record_id, location=location, rejects=rejects, reason="unparseable SMILES"
        ):
            if ids.accept(record_id, location, rejects):
                fields = {
                    name: value for i, (name, value) in enumerate(zip(names, row, strict=True)) if i != column
                }
                rejects.accept()
                yield Record(record_id, "molecule", smiles, location, fields)


# ----------------------------------------------------------------------------------------------
# SDF


def _sdf_blocks(path: Path, rejects: Rejects) -> Iterator[tuple[int, int, list[str]]]:
    """(1-based record number, line where it starts, its lines up to ``$$$$``)."""
    number, start, lines = 0, 1, []
    try:
        for line_number, line in numbered_lines(path):
            if line.startswith("$$$$"):
                number += 1
                yield number, start, lines
                start, lines = line_number + 1, []
            else:
                lines.append(line)
    except TruncatedFile as error:
        rejects.reject(
            id=None, location=error.location, reason="truncated or corrupt file", detail=error.detail
        )
        return
    if any(line.strip() for line in lines):  # the last record may lack its $$$$ terminator
        yield number + 1, start, lines


def _sdf_properties(lines: list[str]) -> dict[str, str]:
    """The ``>  <NAME>`` data fields after ``M  END``: name -> value (multi-line values joined)."""
    properties: dict[str, str] = {}
    name = None
    for line in lines[next((i for i, text in enumerate(lines) if text.startswith("M  END")), len(lines)) :]:
        if line.startswith(">") and "<" in line and ">" in line[line.index("<") :]:
            name = line[line.index("<") + 1 : line.index(">", line.index("<"))]
            properties[name] = ""
        elif name is not None and line.strip():
            properties[name] = (properties[name] + "\n" + line).strip()
    return properties


@register_reader("sdf", suffixes=(".sdf", ".sd"), description="SDF / MDL mol blocks (RDKit)")
def read_sdf(
    path: str | Path, *, id_property: str | None = None, rejects: Rejects | None = None
) -> Iterator[Record]:
    """Records of an SDF file: id = ``id_property``'s value, else the title line, else ``file:record``.

    Items are the mol blocks; the data fields travel in ``Record.fields``.
    """
    path, rejects, ids = Path(path), collector(rejects), UniqueIds()
    for number, start, lines in _sdf_blocks(path, rejects):
        location = f"{path}:record {number} (line {start})"
        properties = _sdf_properties(lines)
        record_id = (
            properties.get(id_property or "", "").strip()
            or (lines[0].strip() if lines else "")
            or f"{path.name}:{number}"
        )
        if not any(line.startswith("M  END") for line in lines):
            rejects.reject(
                id=record_id,
                location=location,
                reason="truncated record",
                detail="the mol block has no 'M  END' line",
            )
            continue
        block = (
            "\n".join(lines[: next(i for i, text in enumerate(lines) if text.startswith("M  END")) + 1])
            + "\n"
        )
        if _parses(
            block, record_id=record_id, location=location, rejects=rejects, reason="unreadable mol block"
        ):
            if ids.accept(record_id, location, rejects):
                rejects.accept()
                yield Record(record_id, "molecule", block, location, properties)
